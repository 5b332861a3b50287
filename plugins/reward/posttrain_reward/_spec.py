"""The reward method's spec (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="reward",
    maturity="stable",
    plugin_api="1.5",  # the plugin API it is written against (1.5: posttrain.load_pretrained)
    summary="Outcome reward model: Bradley-Terry loss on chosen/rejected pairs (sequence-classification head).",
    family="reward",
    trainer="posttrain_reward.trainer:RewardTrainer",
    config="posttrain_reward.config:RewardConfig",
    data_format="preference",
    tiny_run={"max_length": 32},  # a few steps on a tiny model (the conformance suite)
    signals={"preference_margin": "margin", "preference_accuracy": "accuracy"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier: reward models overfit past about one epoch (`num_train_epochs=1`, or a "
                                 "lower `max_steps`); lower `learning_rate`, or add more preference pairs.",
    },
    papers=(
        "Ouyang et al. 2022, Training language models to follow instructions with human feedback (InstructGPT), arXiv:2203.02155",
        "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models, arXiv:2307.09288",
        "Eisenstein et al. 2023, Helping or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking, arXiv:2312.09244",
    ),
    presets={
        "bradley_terry": Preset(
            summary="Plain Bradley-Terry pairwise loss -log sigmoid(r_chosen - r_rejected) (the default).",
            overrides={},
            paper="Ouyang et al. 2022, arXiv:2203.02155 (Eq. 1)",
        ),
        "llama2_margin": Preset(
            summary="Llama 2 reward model: loss with a per-pair margin m(r) read from the dataset's `margin` column; "
            "lr 1e-5, cosine schedule, 3% warm-up, one epoch.",
            overrides={"learning_rate": 1e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.03, "num_train_epochs": 1.0},
            paper="Touvron et al. 2023, arXiv:2307.09288 (Eq. 2, Sec. 3.2.2)",
        ),
        "centered_rewards": Preset(
            summary="Add 0.01 * (r_chosen + r_rejected)^2 so rewards stay centred on zero.",
            overrides={"center_rewards_coefficient": 0.01},
            paper="Eisenstein et al. 2023, arXiv:2312.09244 (Eq. 2)",
        ),
    },
)
