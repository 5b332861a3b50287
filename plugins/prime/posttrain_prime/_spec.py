"""The PRIME method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="prime",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models; loop.add_trainable_model)
    summary="PRIME: online RL with implicit process rewards from an implicit PRM trained online on outcome labels, RLOO returns and PPO clipping.",
    family="online-rl",
    trainer="posttrain_prime.trainer:PRIMETrainer",
    config="posttrain_prime.config:PRIMEConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "num_generations": 2, "max_completion_length": 8},  # a few steps on a tiny model (the conformance suite)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "reward": "reward",
        "group_reward_zero_std": "frac_reward_zero_std",
        "entropy": "entropy",
        "clip_fraction": "clip_ratio/region_mean",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "reward_std_collapse": "raise `num_generations` or `temperature`, filter prompts by difficulty (`accuracy_filter_range`, "
                               "e.g. [0.2, 0.8]), or give the outcome reward partial credit.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or reuse each generation "
                            "for several updates (`num_iterations` > 1); PRIME also runs the PRM and the reference on every rollout.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or "
                          "`num_generations`, or filter prompts by difficulty (`accuracy_filter_range`).",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or raise `epsilon` (and `epsilon_high`).",
        "reward_hacking": "lower `process_reward_coef` (the implicit PRM's share of the advantage) or `prm_learning_rate`, cap "
                          "`max_completion_length`, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate` or raise `temperature` (PRIME has no entropy bonus nor KL penalty).",
        "length_drift": "check the outcome reward for a length bias; the process return sums per-token rewards, so lower "
                        "`process_reward_coef` or `max_completion_length`, or set `mask_truncated_completions=True`.",
    },
    papers=(
        "Cui et al. 2025, Process Reinforcement through Implicit Rewards, arXiv:2502.01456",
    ),
    presets={
        "prime": Preset(
            summary="PRIME as in Cui et al.: 4 rollouts per prompt, implicit reward beta=0.05, PRM learning rate 1e-6, prompts "
                    "kept when their accuracy is in [0.2, 0.8], outcome RLOO plus implicit process returns, PPO clip 0.2.",
            overrides={"num_generations": 4, "beta": 0.05, "prm_learning_rate": 1e-6, "accuracy_filter_range": [0.2, 0.8],
                       "process_reward_coef": 1.0, "outcome_reward_coef": 1.0, "epsilon": 0.2},
            paper="arXiv:2502.01456",
        ),
    },
)
