"""The RLOO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="rloo",
    maturity="stable",
    plugin_api="1.2",  # the plugin API it is written against: a literal, so the gate can refuse a core without it
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
    },
    papers=(
        "Ahmadian et al. 2024, Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs, arXiv:2402.14740",
        "Kool et al. 2019, Buy 4 REINFORCE Samples, Get a Baseline for Free!, ICLR 2019 workshop",
        "Hu 2025, REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models, arXiv:2501.03262",
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
    },
)
