"""The DPO method's spec (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="dpo",
    maturity="stable",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language plumbing)
    summary="Direct Preference Optimization on prompt/chosen/rejected pairs, with 15 loss types (IPO, SLiC, EXO, NCA, APO, ...) and a frozen reference.",
    family="preference",
    trainer="posttrain_dpo.trainer:DPOTrainer",
    config="posttrain_dpo.config:DPOConfig",
    data_format="preference",
    tiny_run={"max_length": 32},  # a few steps on a tiny model (the conformance suite)
    signals={"preference_margin": "rewards/margins", "preference_accuracy": "rewards/accuracies"},  # roles the diagnostics read
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), raise `beta` (stay closer to the "
                                 "reference), use IPO (`loss_type=['ipo']`), whose loss does not push margins without "
                                 "bound, or add more preference pairs.",
    },
    papers=(
        "Block and Zhang 2025, EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes (BEMA), arXiv:2508.00180",
        "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model, arXiv:2305.18290",
        "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback, arXiv:2305.10425",
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (IPO), arXiv:2310.12036",
        "Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO), arXiv:2402.00856",
        "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (NCA), arXiv:2402.05369",
        "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback, arXiv:2403.00409",
        "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO), arXiv:2404.04656",
        "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (SPPO), arXiv:2405.00675",
        "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (AOT), arXiv:2406.05882",
        "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions (APO), arXiv:2408.06266",
        "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language Models (DiscoPOP), arXiv:2406.08414",
        "Pang et al. 2024, Iterative Reasoning Preference Optimization (RPO), arXiv:2404.19733",
        "Wang et al. 2024, Enhancing the Reasoning Ability of Multimodal Large Language Models via Mixed Preference Optimization (MPO), arXiv:2411.10442",
        "Lambert et al. 2024, Tulu 3: Pushing Frontiers in Open Language Model Post-Training, arXiv:2411.15124",
        "Wang et al. 2023, Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints (f-DPO), arXiv:2309.16240",
        "Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization, arXiv:2406.11827",
        "Liu et al. 2024, Length Desensitization in Directed Preference Optimization (LD-DPO), arXiv:2409.06411",
        "Gorbatovski et al. 2024, Learn Your Reference Model for Real Good Alignment (TR-DPO), arXiv:2404.09656",
    ),
    presets={
        "dpo": Preset(
            summary="DPO: -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)), beta=0.1 (the default).",
            overrides={"loss_type": ["sigmoid"], "beta": 0.1},
            paper="Rafailov et al. 2023, arXiv:2305.18290 (Eq. 7)",
        ),
        "slic_hf": Preset(
            summary="SLiC-HF rank-calibration hinge loss relu(1 - beta * delta); the margin is 1/beta.",
            overrides={"loss_type": ["hinge"]},
            paper="Zhao et al. 2023, arXiv:2305.10425 (Eq. 1)",
        ),
        "ipo": Preset(
            summary="IPO squared loss (delta_avg - 1/(2 tau))^2 on per-token-averaged log-ratios; beta plays tau.",
            overrides={"loss_type": ["ipo"]},
            paper="Azar et al. 2023, arXiv:2310.12036 (Eq. 17)",
        ),
        "exo": Preset(
            summary="EXO-pref: reverse KL between softmax(beta * log-ratios) and the smoothed labels [1-eps, eps], eps=1e-3.",
            overrides={"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
            paper="Ji et al. 2024, arXiv:2402.00856 (Eq. 16)",
        ),
        "nca": Preset(
            summary="NCA pairwise loss on the absolute (not relative) chosen/rejected rewards.",
            overrides={"loss_type": ["nca_pair"]},
            paper="Chen et al. 2024, arXiv:2402.05369 (Eq. 11, K=2)",
        ),
        "robust_dpo": Preset(
            summary="Robust DPO: label-flip-debiased sigmoid loss with flip rate label_smoothing=0.1.",
            overrides={"loss_type": ["robust"], "label_smoothing": 0.1},
            paper="Chowdhury et al. 2024, arXiv:2403.00409 (Eq. 6)",
        ),
        "bco_pair": Preset(
            summary="BCO on pairs: chosen as positive, rejected as negative binary-classifier examples.",
            overrides={"loss_type": ["bco_pair"]},
            paper="Jung et al. 2024, arXiv:2404.04656",
        ),
        "sppo": Preset(
            summary="SPPO with hard win probabilities: (lr_c - 1/(2 beta))^2 + (lr_r + 1/(2 beta))^2.",
            overrides={"loss_type": ["sppo_hard"]},
            paper="Wu et al. 2024, arXiv:2405.00675 (Eq. 4.7, P=1/0)",
        ),
        "aot": Preset(
            summary="AOT (paired): sigmoid loss on sorted policy and reference chosen-rejected gaps (batch-coupled).",
            overrides={"loss_type": ["aot"]},
            paper="Melnyk et al. 2024, arXiv:2406.05882",
        ),
        "apo_zero": Preset(
            summary="APO-zero: raise chosen and lower rejected likelihood (chosen outputs better than the model's).",
            overrides={"loss_type": ["apo_zero"]},
            paper="D'Oosterlinck et al. 2024, arXiv:2408.06266 (Eq. 7)",
        ),
        "apo_down": Preset(
            summary="APO-down: lower both likelihoods, rejected more (chosen outputs worse than the model's).",
            overrides={"loss_type": ["apo_down"]},
            paper="D'Oosterlinck et al. 2024, arXiv:2408.06266 (Eq. 8)",
        ),
        "discopop": Preset(
            summary="DiscoPOP log-ratio modulated loss (logistic/exponential blend), tau=0.05.",
            overrides={"loss_type": ["discopop"], "discopop_tau": 0.05},
            paper="Lu et al. 2024, arXiv:2406.08414 (Eq. 5)",
        ),
        "rpo": Preset(
            summary="RPO: DPO plus the NLL of the chosen completion with weight alpha=1.",
            overrides={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
            paper="Pang et al. 2024, arXiv:2404.19733 (Eq. 1)",
        ),
        "mpo": Preset(
            summary="MPO: 0.8 * DPO (preference) + 0.2 * BCO (quality) + 1.0 * SFT (generation).",
            overrides={"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
            paper="Wang et al. 2024, arXiv:2411.10442 (Sec. 3.2)",
        ),
        "tulu3_length_normalized": Preset(
            summary="Tulu 3 length-normalized DPO (sigmoid on per-token-averaged log-ratios), beta=5, lr 5e-7 (8B recipe).",
            overrides={"loss_type": ["sigmoid_norm"], "beta": 5.0, "learning_rate": 5e-7},
            paper="Lambert et al. 2024, arXiv:2411.15124 (Eq. 6, Table 16)",
        ),
        "f_dpo": Preset(
            summary="f-DPO with the Jensen-Shannon divergence (also: forward_kl, alpha_divergence via f_divergence_type).",
            overrides={"f_divergence_type": "js_divergence"},
            paper="Wang et al. 2023, arXiv:2309.16240 (Thm. 1, Table 1)",
        ),
        "wpo": Preset(
            summary="WPO: weight each pair by the policy's length-normalized probability of chosen and rejected.",
            overrides={"use_weighting": True},
            paper="Zhou et al. 2024, arXiv:2406.11827 (Eq. 2)",
        ),
        "ld_dpo": Preset(
            summary="LD-DPO: down-weight the log-probs of tokens past the shorter completion's length by alpha=0.5 (tuned per model in the paper).",
            overrides={"ld_alpha": 0.5},
            paper="Liu et al. 2024, arXiv:2409.06411 (Eq. 9)",
        ),
        "tr_dpo": Preset(
            summary="TR-DPO: every 512 steps the reference becomes 0.6 * policy + 0.4 * reference (soft update).",
            overrides={"sync_ref_model": True, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512},
            paper="Gorbatovski et al. 2024, arXiv:2404.09656 (Eq. 6)",
        ),
        "bema_ref": Preset(
            summary="BEMA reference: every 400 steps the reference takes the policy's bias-corrected EMA weights (TRL's bema_for_ref_model).",
            overrides={"bema_ref_model": True, "bema_ref_model_update_freq": 400, "bema_update_freq": 400, "bema_ema_power": 0.5, "bema_bias_power": 0.2, "bema_lag": 10},
            paper="arXiv:2508.00180",
        ),
    },
)
