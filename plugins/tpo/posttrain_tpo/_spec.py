"""The TPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_PAPER = "arXiv:2405.16681"

SPEC = MethodSpec(
    name="tpo",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models; 1.5: MethodSpec.actions)
    summary="TPO / TPO-L: a reference-free chosen-vs-rejected preference loss plus the NLL of a gold 'reference' response, in one stage.",
    family="preference",
    trainer="posttrain_tpo.trainer:TPOTrainer",
    config="posttrain_tpo.config:TPOConfig",
    # TRL's TPO rows (prompt/chosen/rejected + a gold 'reference'): the conformance run trains both
    # terms, the preference loss and the gold response's NLL (tpo_alpha at its default 1.0)
    data_format="triple_preference",
    tiny_run={"max_length": 48, "learning_rate": 1e-3, "beta": 0.1},
    signals={"preference_margin": "rewards/margins", "preference_accuracy": "rewards/accuracies", "token_accuracy": "mean_token_accuracy"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), raise `tpo_alpha` (the gold response's"
                                 " NLL weight) or `label_smoothing` (with `loss_type='sigmoid'` or `loss_type='tpo-l'`), "
                                 "or add more preference pairs.",
    },
    papers=(
        "Saeidi, Verma, RRV, Rasul and Baral 2024 (rev. 2025), Triple Preference Optimization: Achieving Better Alignment "
        "using a Single Step Optimization, arXiv:2405.16681",
    ),
    presets={
        "tpo": Preset(
            summary="TPO as TRL 1.16 ships it: sigmoid loss, beta 0.01, NLL weight tpo_alpha 1.0 on the gold response, learning rate 5e-7.",
            overrides={"loss_type": "sigmoid", "beta": 0.01, "tpo_alpha": 1.0, "learning_rate": 5e-7, "max_length": 1024},
            paper=_PAPER,
        ),
        "tpo_l": Preset(
            summary="TPO-L (length-normalized, target margin): loss_type 'tpo-l', beta 0.01, gamma 0.5, tpo_alpha 1.0, learning rate 5e-7.",
            overrides={"loss_type": "tpo-l", "beta": 0.01, "tpo_l_gamma": 0.5, "tpo_alpha": 1.0, "learning_rate": 5e-7, "max_length": 1024},
            paper=_PAPER,
        ),
    },
)
