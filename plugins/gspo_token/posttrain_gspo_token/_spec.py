"""The GSPO-token method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="gspo_token",
    maturity="experimental",
    plugin_api="1.6",
    summary="GSPO-token: GSPO's length-normalized sequence ratio as a token-level weight (value of the sequence ratio, gradient of each token); the old TRL's trl.experimental.gspo_token.",
    family="online-rl",
    trainer="posttrain_gspo_token.trainer:GSPOTokenTrainer",
    config="posttrain_gspo_token.config:GSPOTokenConfig",
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
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or widen the sequence clip range (`epsilon`, "
                           "`epsilon_high`; the paper's 3e-4 / 4e-4 are tight on purpose).",
        "kl_blowup": "raise `beta`, lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `beta` (KL penalty), cap `max_completion_length`, check the reward function for "
                          "exploits, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or add an entropy bonus (`entropy_coef` > 0).",
        "length_drift": "check the reward for a length bias; use `loss_type='grpo'` (a per-sequence mean, the "
                        "paper's setup), or lower `max_completion_length`.",
    },
    papers=(
        "Zheng et al. 2025, Group Sequence Policy Optimization, arXiv:2507.18071",
    ),
    presets={
        "gspo_token": Preset(
            summary="GSPO-token (the paper's token-level variant): token weight sg[s_i] pi(y_t)/sg[pi(y_t)], per-sequence mean loss, "
                    "clip ranges 3e-4 / 4e-4 (the paper's experiments), no KL term.",
            overrides={"importance_sampling_level": "sequence_token", "loss_type": "grpo", "epsilon": 3e-4,
                       "epsilon_high": 4e-4, "beta": 0.0},
            paper="Zheng et al. 2025, Group Sequence Policy Optimization, arXiv:2507.18071",
        ),
    },
)
