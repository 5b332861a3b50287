"""The ORPO method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="orpo",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models; 1.5: MethodSpec.actions)
    summary="ORPO: NLL on the chosen response plus an odds-ratio preference term, in one stage and without a reference model.",
    family="preference",
    trainer="posttrain_orpo.trainer:ORPOTrainer",
    config="posttrain_orpo.config:ORPOConfig",
    data_format="preference",
    tiny_run={"max_length": 32, "learning_rate": 1e-3},  # a few steps on a tiny model (the conformance suite)
    signals={"preference_margin": "rewards/margins", "preference_accuracy": "rewards/accuracies"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), lower `beta` (the odds-ratio term's "
                                 "weight against the NLL), or add more preference pairs.",
    },
    papers=("Hong, Lee and Thorne 2024, ORPO: Monolithic Preference Optimization without Reference Model, arXiv:2403.07691",),
    presets={
        "orpo": Preset(
            summary="The paper's setting: lambda (beta) = 0.1, learning rate 8e-6, max length 1024.",
            overrides={"beta": 0.1, "learning_rate": 8e-6, "max_length": 1024},
            paper="arXiv:2403.07691",
        ),
    },
)
