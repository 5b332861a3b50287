"""The RLOO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="rloo",
    maturity="stable",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models: processors, images, model_inputs)
    summary="REINFORCE Leave-One-Out: online RL from reward functions with a leave-one-out baseline and a KL penalty in the reward.",
    family="online-rl",
    trainer="posttrain_rloo.trainer:RLOOTrainer",
    config="posttrain_rloo.config:RLOOConfig",
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
        "kl_blowup": "raise `beta` (the KL penalty in the reward), lower `learning_rate`, or check the reward for "
                     "exploits.",
        "reward_hacking": "raise `beta` (KL penalty), add a length penalty or cap `max_completion_length`, clip the "
                          "reward (`reward_clip_range`), check the reward function for exploits, and compare with a "
                          "held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or raise `beta` (RLOO has no entropy bonus).",
        "length_drift": "check the reward for a length bias; lower `max_completion_length`, set "
                        "`mask_truncated_completions=True`, or add a length penalty to the reward.",
    },
    papers=(
        "Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs, arXiv:2402.14740",
        "Kool et al. 2019, Buy 4 REINFORCE Samples, Get a Baseline for Free!, ICLR 2019 workshop",
        "Hu et al. 2025, REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage Normalization, arXiv:2501.03262",
        "Yu et al. 2025, DAPO: An Open-Source LLM Reinforcement Learning System at Scale, arXiv:2503.14476",
        "Ling Team 2025, Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking Model (Ring-1T, IcePop), arXiv:2510.18855",
    ),
    presets={
        "rloo": Preset(
            summary="RLOO as in Ahmadian et al.: k=2 samples per prompt, leave-one-out baseline, KL penalty beta=0.05 in the reward.",
            overrides={"num_generations": 2, "beta": 0.05, "normalize_advantages": False},
            paper="arXiv:2402.14740",
        ),
        "reinforce_pp": Preset(
            summary="REINFORCE++-style: advantages standardized over the batch, KL penalty in the reward, PPO clipping eps=0.2.",
            overrides={"normalize_advantages": True, "beta": 0.05, "epsilon": 0.2},
            paper="arXiv:2501.03262",
        ),
        "dynamic_sampling": Preset(
            summary="DAPO's dynamic sampling on RLOO: drop groups whose rewards are all equal and refill from further prompts (at most 10 rounds).",
            overrides={"dynamic_sampling": True, "max_num_gen_batches": 10},
            paper="arXiv:2503.14476",
        ),
        "icepop": Preset(
            summary="IcePop: per-token trainer/sampler ratio kept inside [0.5, 5] and zeroed outside (two-sided token masking).",
            overrides={"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "token_mask",
                       "vllm_importance_sampling_clip_min": 0.5, "vllm_importance_sampling_clip_max": 5.0},
            paper="arXiv:2510.18855",
        ),
    },
)
