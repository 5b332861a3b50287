"""The ReMax method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="remax",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models)
    summary="ReMax: online RL from reward functions, REINFORCE with the reward of the greedy completion as each prompt's baseline.",
    family="online-rl",
    trainer="posttrain_remax.trainer:ReMaxTrainer",
    config="posttrain_remax.config:ReMaxConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "num_generations": 2, "max_completion_length": 8},  # a few steps on a tiny model (the conformance suite)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "reward": "reward",
        "group_reward_zero_std": "frac_reward_zero_std",  # here: prompts whose every sample scored exactly the greedy baseline
        "kl": "kl",
        "entropy": "entropy",
        "clip_fraction": "clip_ratio/region_mean",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates (sampled + greedy)
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "reward_std_collapse": "the samples score the same as the greedy baseline: raise `temperature` or `num_generations`, "
                               "use prompts of the right difficulty, or give the reward function partial credit.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or reuse each generation "
                            "for several updates (`num_iterations` > 1); ReMax generates one greedy completion per prompt on top of the samples.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or "
                          "`num_generations`, or make the reward give partial credit.",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or raise `epsilon` (and `epsilon_high`).",
        "kl_blowup": "raise `beta` (the KL penalty in the reward), lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `beta` (KL penalty), cap `max_completion_length`, clip the reward (`reward_clip_range`), "
                          "check the reward function for exploits, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or raise `beta` (ReMax has no entropy bonus).",
        "length_drift": "check the reward for a length bias; lower `max_completion_length`, set "
                        "`mask_truncated_completions=True`, or add a length penalty to the reward.",
    },
    papers=(
        "Li, Xu, Zhang, Lin, Yu, Sun and Luo 2023, ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language Models, arXiv:2310.10505",
    ),
    presets={
        "remax": Preset(
            summary="ReMax as in Algorithm 1 of Li et al.: one sampled completion per prompt, its baseline the reward of the "
                    "greedy completion, one plain REINFORCE gradient step per rollout (no reuse, so the ratio is 1 and never clipped).",
            overrides={"num_generations": 1, "num_iterations": 1},
            paper="arXiv:2310.10505",
        ),
    },
)
