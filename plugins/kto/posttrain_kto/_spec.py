"""The KTO method's spec (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="kto",
    maturity="stable",
    plugin_api="1.5",  # the plugin API it is written against (1.5: MethodSpec.actions)
    summary="KTO: prospect-theoretic loss on unpaired desirable/undesirable completions against a frozen reference.",
    family="preference",
    trainer="posttrain_kto.trainer:KTOTrainer",
    config="posttrain_kto.config:KTOConfig",
    data_format="unpaired_preference",
    tiny_run={"max_length": 32},  # a few steps on a tiny model (the conformance suite)
    signals={"preference_margin": "rewards/margins", "kl": "kl"},  # roles the diagnostics read (kl: the batch KL reference point)
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "kl_blowup": "raise `beta` (stay closer to the reference) or lower `learning_rate`.",
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), raise `beta` (stay closer to the "
                                 "reference), or add more examples.",
    },
    papers=(
        "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization, arXiv:2402.01306",
        "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions, arXiv:2408.06266",
    ),
    presets={
        "kto": Preset(
            summary="KTO loss (Eq. 7) with beta=0.1 and equal class weights (the default).",
            overrides={"loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
            paper="Ethayarajh et al. 2024, arXiv:2402.01306 (Eq. 7-8)",
        ),
        "apo_zero_unpaired": Preset(
            summary="Unpaired APO-zero: push desirable likelihoods up and undesirable ones down, no KL estimate.",
            overrides={"loss_type": "apo_zero_unpaired", "beta": 0.1},
            paper="D'Oosterlinck et al. 2024, arXiv:2408.06266 (Eq. 7, unpaired variant)",
        ),
        "kto_imbalanced": Preset(
            summary="KTO for 1 desirable : 10 undesirable examples: desirable_weight=10 so that "
            "desirable_weight*n_D / (undesirable_weight*n_U) = 1, inside the paper's recommended [1, 4/3].",
            overrides={"loss_type": "kto", "beta": 0.1, "desirable_weight": 10.0, "undesirable_weight": 1.0},
            paper="Ethayarajh et al. 2024, arXiv:2402.01306 (Eq. 8, Sec. 4.3 data imbalance)",
        ),
    },
)
