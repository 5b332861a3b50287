"""The GMPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="gmpo",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models)
    summary="Geometric-Mean Policy Optimization: GRPO whose sequence weight is the geometric mean of log-space-clipped token ratios (stabler, wider clip range).",
    family="online-rl",
    trainer="posttrain_gmpo.trainer:GMPOTrainer",
    config="posttrain_gmpo.config:GMPOConfig",
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
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "reward_std_collapse": "raise `num_generations` or `temperature`, use easier/harder prompts, or give the reward "
                               "function partial credit.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or reuse each "
                            "generation for several updates (`num_iterations` > 1).",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or "
                          "`num_generations`, or make the reward give partial credit.",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or widen the log-space clip range `epsilon` "
                           "(and `epsilon_high`); the paper uses 0.4.",
        "kl_blowup": "set or raise `beta` (the sequence-averaged KL to the reference), lower `learning_rate`, or check the "
                     "reward for exploits.",
        "reward_hacking": "raise `beta` (KL penalty), cap `max_completion_length`, check the reward function for "
                          "exploits, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, widen `epsilon` / `epsilon_high`, or raise `beta` "
                            "(GMPO has no entropy bonus).",
        "length_drift": "check the reward for a length bias; lower `max_completion_length` or add a length penalty to the reward.",
    },
    papers=(
        "Zhao, Liu, Liu, Chen, Wu, Hao, Lv, Huang, Cui, Ye, Wan and Wei 2025, Geometric-Mean Policy Optimization, arXiv:2507.20673",
    ),
    presets={
        "gmpo": Preset(
            summary="GMPO as the paper recommends it: token log-ratios clipped to (-0.4, 0.4), i.e. ratios in (e^-0.4, e^0.4); no KL term.",
            overrides={"epsilon": 0.4, "epsilon_high": 0.4, "beta": 0.0},
            paper="arXiv:2507.20673",
        ),
    },
)
