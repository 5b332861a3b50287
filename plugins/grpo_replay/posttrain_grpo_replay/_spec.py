"""The GRPO-with-replay-buffer method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="grpo_replay",
    maturity="experimental",
    plugin_api="1.6",
    summary="GRPO with a replay buffer: groups whose rewards are all equal are replaced by past high-variance groups; the old TRL's trl.experimental.grpo_with_replay_buffer.",
    family="online-rl",
    trainer="posttrain_grpo_replay.trainer:GRPOWithReplayBufferTrainer",
    config="posttrain_grpo_replay.config:GRPOWithReplayBufferConfig",
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
        "reward_std_collapse": "raise `replay_buffer_size` (zero-variance groups are replaced from it), raise "
                               "`num_generations` or `temperature`, use easier/harder prompts, or give the reward function partial credit.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or reuse each "
                            "generation for several updates (`num_iterations` > 1).",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or "
                          "`num_generations`, or make the reward give partial credit.",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or raise `epsilon` (and `epsilon_high`).",
        "kl_blowup": "raise `beta`, lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `beta` (KL penalty), cap `max_completion_length`, check the reward function for "
                          "exploits, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or add an entropy bonus (`entropy_coef` > 0).",
        "length_drift": "check the reward for a length bias; use the length-unbiased `loss_type='dr_grpo'`, or lower "
                        "`max_completion_length`.",
    },
    papers=(
        "Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models, arXiv:2402.03300",
    ),
    presets={
        "grpo_replay": Preset(
            summary="GRPO (the paper's objective: per-sequence mean loss, group std scaling, eps=0.2, k3 KL with beta=0.04) with "
                    "TRL's replay buffer of 64 groups (the buffer has no paper: TRL's default).",
            overrides={"loss_type": "grpo", "scale_rewards": "group", "epsilon": 0.2, "beta": 0.04, "replay_buffer_size": 64},
            paper="Shao et al. 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models, arXiv:2402.03300",
        ),
    },
)
