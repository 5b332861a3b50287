"""The CPO family's spec: CPO, SimPO, AlphaPO (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="cpo",
    maturity="experimental",  # "stable" needs version >= 1.0 and a committed api_snapshot.json
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models; 1.5: MethodSpec.actions)
    summary="Reference-free preference optimization: CPO (preference loss + NLL), SimPO (length-normalized, margin) and AlphaPO (reward shape).",
    family="preference",
    trainer="posttrain_cpo.trainer:CPOTrainer",
    config="posttrain_cpo.config:CPOConfig",
    data_format="preference",
    tiny_run={"max_length": 32},  # config overrides for the conformance suite's few-step tiny run
    signals={"preference_margin": "rewards/margins", "preference_accuracy": "rewards/accuracies"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), raise `label_smoothing` (with "
                                 "`loss_type='sigmoid'` or `loss_type='simpo'`) or `cpo_alpha` (more weight on the chosen"
                                 " completions' NLL), or add more preference pairs.",
    },
    papers=(
        "Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation (CPO), arXiv:2401.08417",
        "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward, arXiv:2405.14734",
        "Gupta et al. 2025, AlphaPO: Reward Shape Matters for LLM Alignment, arXiv:2501.03884",
    ),
    presets={
        "cpo": Preset(
            summary="CPO (ALMA-R): sigmoid preference loss on summed log-probs, beta=0.1, plus the chosen NLL (cpo_alpha=1.0); lr 1e-4, inverse-sqrt schedule, 1% warm-up, max_length 512.",
            overrides={
                "loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0, "learning_rate": 1e-4, "lr_scheduler_type": "inverse_sqrt",
                "warmup_ratio": 0.01, "num_train_epochs": 1, "max_length": 512,
            },
            paper="Xu et al. 2024, arXiv:2401.08417 (Section 3, Eq. 3 + L_NLL; Section 4.2)",
        ),
        "simpo": Preset(
            summary="SimPO: length-normalized log-prob reward, margin gamma, no NLL; beta=2.5, gamma=1.375 (gamma/beta=0.55), lr 1e-6, 1 epoch.",
            overrides={"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.5, "simpo_gamma": 1.375, "learning_rate": 1e-6, "num_train_epochs": 1},
            paper="Meng et al. 2024, arXiv:2405.14734 (Eq. 6; Appendix B, Llama-3-Instruct)",
        ),
        "alphapo": Preset(
            summary="AlphaPO: SimPO with the reward (1 - p^-alpha) / alpha of the length-normalized probability; alpha=0.25, beta=2.5, gamma=0.1, lr 7e-7.",
            overrides={"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5, "simpo_gamma": 0.1, "learning_rate": 7e-7},
            paper="Gupta et al. 2025, arXiv:2501.03884 (Table 3, Mistral-Instruct)",
        ),
    },
)
