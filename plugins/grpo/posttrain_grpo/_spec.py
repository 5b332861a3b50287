"""The GRPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="grpo",
    maturity="stable",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models: processors, images, model_inputs)
    summary="Group Relative Policy Optimization: online RL from reward functions with group-normalized advantages.",
    family="online-rl",
    trainer="posttrain_grpo.trainer:GRPOTrainer",
    config="posttrain_grpo.config:GRPOConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "num_generations": 2, "max_completion_length": 8},  # a few steps on a tiny model (the conformance suite)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "reward": "reward",
        "group_reward_zero_std": "frac_reward_zero_std",
        "kl": "kl",
        "entropy": "entropy",
        "clip_fraction": "clip_ratio/region_mean",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
        "tool_call_rate": "tools/call_frequency",  # tools= / environment_factory= runs only
        "tool_failure_rate": "tools/failure_frequency",
        "turns_per_episode": "tools/mean_turns",
        "turn_limit_rate": "tools/turn_limit_ratio",
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "reward_std_collapse": "raise `num_generations` or `temperature`, use easier/harder prompts, or give the reward "
                               "function partial credit.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "tool_calls_failing": "read the failing calls' error messages in the logged completions (`log_completions=True`); fix the tools or "
                              "their docstrings (the schema the model reads), raise `tool_call_timeout` if they time out, or reward "
                              "well-formed calls.",
        "turn_limit_reached": "raise `max_tool_calling_iterations` (or `max_completion_length`), or reward episodes that end with an answer.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`, with `vllm_mode='colocate'` or `vllm_mode='server'`), "
                            "lower `max_completion_length`, or reuse each generation for several updates "
                            "(`num_iterations` > 1).",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or "
                          "`num_generations`, or make the reward give partial credit.",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or raise `epsilon` (and `epsilon_high`).",
        "kl_blowup": "raise `beta`, lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `beta` (KL penalty), add a length penalty or cap `max_completion_length`, check the "
                          "reward function for exploits, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, add an entropy bonus (`entropy_coef` > 0, or "
                            "`use_adaptive_entropy=True`) or raise `beta`.",
        "length_drift": "check the reward for a length bias; use the length-unbiased `loss_type='dr_grpo'`, lower "
                        "`max_completion_length`, or add a length penalty.",
    },
    papers=(
        "Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models, arXiv:2402.03300",
        "DeepSeek-AI 2025, DeepSeek-R1: Incentivizing Reasoning Capability in LLMs via Reinforcement Learning, arXiv:2501.12948",
        "Liu et al. 2025, Understanding R1-Zero-Like Training: A Critical Perspective (Dr. GRPO), arXiv:2503.20783",
        "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale, arXiv:2503.14476",
        "Zheng et al. 2025, Group Sequence Policy Optimization (GSPO), arXiv:2507.18071",
        "MiniMax 2025, MiniMax-M1 (CISPO), arXiv:2506.13585",
        "Gao et al. 2025, Soft Adaptive Policy Optimization (SAPO), arXiv:2511.20347",
        "LUSPO: Length-Unbiased Sequence Policy Optimization, arXiv:2602.05261",
        "VESPO: Variational Sequence-Level Soft Policy Optimization, arXiv:2602.10693",
        "Xiao et al. 2025, BNPO: Beta Normalization Policy Optimization, arXiv:2506.02864",
        "Wu et al. 2025, It Takes Two: Your GRPO Is Secretly DPO (2-GRPO), arXiv:2510.00977",
        "Liu et al. 2025, Tricks or Traps? A Deep Dive into RL for LLM Reasoning (Lite PPO), arXiv:2508.08221",
        "GDPO: Group reward-Decoupled Normalization Policy Optimization for Multi-reward RL, arXiv:2601.05242",
        "INTELLECT-2 technical report (two-sided clipping, delta), arXiv:2505.07291",
        "DeepSeek-AI 2025, DeepSeek-V3.2 (unbiased KL estimate), arXiv:2512.02556",
        "Cui et al. 2025, The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models (Clip-Cov, KL-Cov), arXiv:2505.22617",
        "Hu et al. 2025, REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage Normalization, arXiv:2501.03262",
        "Ling Team 2025, Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model (Ring-1T, IcePop), arXiv:2510.18855",
    ),
    presets={
        "grpo": Preset(
            summary="Original GRPO: per-sequence mean loss, group std scaling, eps=0.2, k3 KL with beta=0.04.",
            overrides={"loss_type": "grpo", "scale_rewards": "group", "epsilon": 0.2, "beta": 0.04},
            paper="arXiv:2402.03300",
        ),
        "deepseek_r1": Preset(
            summary="DeepSeek-R1-Zero recipe: GRPO with beta=0.001 and rule-based accuracy + format rewards.",
            overrides={"loss_type": "grpo", "beta": 0.001, "epsilon": 0.2, "reward_funcs": ["accuracy", "format"]},
            paper="arXiv:2501.12948",
        ),
        "dr_grpo": Preset(
            summary="Dr. GRPO: constant normalizer (max_completion_length) and no std scaling (removes length/difficulty bias).",
            overrides={"loss_type": "dr_grpo", "scale_rewards": "none", "beta": 0.0},
            paper="arXiv:2503.20783",
        ),
        "dapo": Preset(
            summary="DAPO: token-level loss over the global batch, clip-higher (eps_high=0.28), overlong filtering and penalty, no KL.",
            overrides={
                "loss_type": "dapo",
                "epsilon": 0.2,
                "epsilon_high": 0.28,
                "mask_truncated_completions": True,
                "beta": 0.0,
                "reward_funcs": ["accuracy", "overlong_penalty"],
                "max_completion_length": 256,  # the built-in overlong_penalty reaches -1 at 256 tokens: generate up to there
            },
            paper="arXiv:2503.14476",
        ),
        "dapo_dynamic_sampling": Preset(
            summary="Full DAPO: the dapo preset plus dynamic sampling (drop zero-std groups, refill from further prompts, at most 10 rounds).",
            overrides={"loss_type": "dapo", "epsilon": 0.2, "epsilon_high": 0.28, "mask_truncated_completions": True, "beta": 0.0,
                       "reward_funcs": ["accuracy", "overlong_penalty"], "max_completion_length": 256,
                       "dynamic_sampling": True, "max_num_gen_batches": 10},  # the DAPO recipe's cap on generation rounds per step
            paper="arXiv:2503.14476",
        ),
        "gspo": Preset(
            summary="GSPO: sequence-level importance ratio (length-normalized) with tight clipping (3e-4 / 4e-4).",
            overrides={"importance_sampling_level": "sequence", "loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.0},
            paper="arXiv:2507.18071",
        ),
        "cispo": Preset(
            summary="CISPO (MiniMax-M1): clipped, detached IS weight times A log pi; eps_max=5.0 as in ScaleRL.",
            overrides={"loss_type": "cispo", "epsilon_high": 5.0, "beta": 0.0},
            paper="arXiv:2506.13585",
        ),
        "sapo": Preset(
            summary="SAPO: soft sigmoid gate instead of hard clipping (tau_pos=1.0, tau_neg=1.05).",
            overrides={"loss_type": "sapo", "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
            paper="arXiv:2511.20347",
        ),
        "luspo": Preset(
            summary="LUSPO: GSPO with each sequence's loss scaled by its length.",
            overrides={"loss_type": "luspo", "importance_sampling_level": "sequence"},
            paper="arXiv:2602.05261",
        ),
        "vespo": Preset(
            summary="VESPO: gamma-shaped soft weight on the sequence ratio (k+=2, lambda+=3, k-=3, lambda-=2).",
            overrides={"loss_type": "vespo", "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
            paper="arXiv:2602.10693",
        ),
        "bnpo": Preset(
            summary="BNPO-style token normalization over the local (per-process) batch.",
            overrides={"loss_type": "bnpo"},
            paper="arXiv:2506.02864",
        ),
        "two_grpo": Preset(
            summary="2-GRPO: only two rollouts per prompt (num_generations=2).",
            overrides={"num_generations": 2},
            paper="arXiv:2510.00977",
        ),
        "lite_ppo": Preset(
            summary="Lite PPO: group-mean baseline with batch-level std scaling and token-level (dapo) loss.",
            overrides={"scale_rewards": "batch", "loss_type": "dapo"},
            paper="arXiv:2508.08221",
        ),
        "clip_cov": Preset(
            summary="Clip-Cov: detach the gradient of a random 2e-4 of the tokens whose log-prob/advantage covariance is in [1, 5].",
            overrides={"cov_regularization": "clip_cov", "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0},
            paper="arXiv:2505.22617",
        ),
        "kl_cov": Preset(
            summary="KL-Cov: penalize |log pi - log pi_old| (coefficient 1) on the top 2e-3 of the tokens by log-prob/advantage covariance; "
                    "each rollout trains 2 updates (the penalty is 0 on a rollout's first update; the paper's PPO takes several).",
            overrides={"cov_regularization": "kl_cov", "kl_cov_ratio": 2e-3, "kl_cov_coef": 1.0, "num_iterations": 2},
            paper="arXiv:2505.22617",
        ),
        "reinforce_pp_baseline": Preset(
            summary="REINFORCE++-baseline: subtract the group mean, then standardize over the global batch; k2 KL in the loss.",
            overrides={"scale_rewards": "none", "normalize_advantages": True, "kl_estimator": "k2"},
            paper="arXiv:2501.03262",
        ),
        "icepop": Preset(
            summary="IcePop: per-token trainer/sampler ratio kept inside [0.5, 5] and zeroed outside (two-sided token masking).",
            overrides={"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "token_mask",
                       "vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_clip_max": 5.0},
            paper="arXiv:2510.18855",
        ),
        "gdpo": Preset(
            summary="GDPO: normalize each reward within its group, then sum and normalize over the batch.",
            overrides={"multi_objective_aggregation": "normalize_then_sum"},
            paper="arXiv:2601.05242",
        ),
    },
)
