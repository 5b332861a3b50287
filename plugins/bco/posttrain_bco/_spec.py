"""The BCO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="bco",
    maturity="experimental",
    plugin_api="1.5",  # the plugin API it is written against (1.5: MethodSpec.actions)
    summary="BCO: a binary classifier (logit = implied reward minus a running mean) on unpaired thumbs-up/down data, optional density-ratio weights (UDM).",
    family="preference",
    trainer="posttrain_bco.trainer:BCOTrainer",
    config="posttrain_bco.config:BCOConfig",
    data_format="unpaired_preference",
    tiny_run={"max_length": 32, "learning_rate": 1e-3},  # a few steps on a tiny model (the conformance suite)
    signals={"preference_margin": "rewards/margins"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), raise `beta` (stay closer to the "
                                 "reference), or add more examples.",
    },
    papers=("Jung, Han, Nam and On 2024, Binary Classifier Optimization for Large Language Model Alignment, arXiv:2404.04656",),
    presets={
        "bco": Preset(
            summary="BCO with the reward shift (the running mean of the implied rewards): beta=0.1 (TRL's default), no UDM.",
            overrides={"beta": 0.1},
            paper="Jung et al. 2024, arXiv:2404.04656 (binary classifier loss with reward shift)",
        ),
        "bco_udm": Preset(
            summary="BCO with underlying distribution matching: density-ratio weights clamped to [0.5, 10] "
            "from a classifier on prompt embeddings (needs udm_embedding_model or an embedding_func).",
            overrides={"beta": 0.1, "prompt_sample_size": 1024, "min_density_ratio": 0.5, "max_density_ratio": 10.0},
            paper="Jung et al. 2024, arXiv:2404.04656 (underlying distribution matching)",
        ),
    },
)
