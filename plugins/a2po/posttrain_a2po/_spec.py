"""The A*-PO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="a2po",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against
    summary="A*-PO: estimate the optimal value V* offline from reference samples, then regress beta2 * log(pi/pi_ref) onto r - V* with one sample per prompt.",
    family="online-rl",
    trainer="posttrain_a2po.trainer:A2POTrainer",
    config="posttrain_a2po.config:A2POConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "num_value_samples": 2, "max_completion_length": 8},  # the conformance suite's tiny runs
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "reward": "reward",
        "kl": "kl",
        "entropy": "entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "completions_truncated": "raise `max_completion_length`.",
        "throughput_bound": "lower `max_completion_length` or `num_value_samples` (Stage 1's cost), or raise `generation_batch_size`.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or lower `beta2` "
                          "(a looser KL lets the policy move further), or make the reward give partial credit.",
        "kl_blowup": "raise `beta2` (the regression's KL temperature), lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `beta2`, cap `max_completion_length`, check the reward function for exploits, and compare with a "
                          "held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or raise `beta2`.",
        "length_drift": "check the reward for a length bias; lower `max_completion_length`.",
    },
    papers=(
        "Brantley, Chen, Gao, Lee, Sun, Zhan and Zhang 2025, Accelerating RL for LLM Reasoning with Optimal Advantage Regression, arXiv:2505.20686",
    ),
    presets={
        "a2po": Preset(
            summary="A*-PO's two temperatures and sample count as TRL 1.16 ships them from the paper: N=8 reference samples, beta1=0.5, beta2=1e-3, all-incorrect prompts dropped.",
            overrides={"num_value_samples": 8, "beta1": 0.5, "beta2": 1e-3, "filter_all_incorrect": True},
            paper="arXiv:2505.20686",
        ),
    },
)
