"""The XPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="xpo",
    maturity="experimental",  # "stable" needs version >= 1.0 and a committed api_snapshot.json
    plugin_api="1.6",
    summary="Exploratory Preference Optimization: online DPO of policy samples against reference samples plus an exploration bonus alpha * log pi(y_ref).",
    family="online-preference",
    trainer="posttrain_xpo.trainer:XPOTrainer",
    config="posttrain_xpo.config:XPOConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "max_new_tokens": 8},  # a few steps on a tiny model (the conformance suite)
    signals={  # posttrain.SignalRole -> this method's metric name
        "reward": "objective/model_scores",
        "kl": "kl",  # per-token, on the policy's samples (objective/kl is TRL's sequence-level mean over both samples)
        "preference_margin": "rewards/margins",
        "preference_accuracy": "rewards/accuracies",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: the producer generates both samples
    },
    actions={
        "completions_truncated": "raise `max_new_tokens`, or set `missing_eos_penalty` so unfinished completions lose.",
        "throughput_bound": "lower `max_new_tokens` (each step samples the policy AND the reference), or use a GPU.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or `alpha` (more exploration).",
        "kl_blowup": "raise `beta`, lower `learning_rate` or `alpha` (the exploration bonus pushes away from the reference's samples).",
        "reward_hacking": "raise `beta`, set `missing_eos_penalty`, lower `max_new_tokens`, and check the reward for exploits.",
        "preference_saturation": "stop earlier (`max_steps`), raise `beta`, or use IPO (`loss_type='ipo'`).",
        "length_drift": "check the reward for a length bias; lower `max_new_tokens` or set `missing_eos_penalty`.",
    },
    papers=(
        "Xie et al. 2024, Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF, arXiv:2405.21046",
    ),
    presets={
        "xpo": Preset(
            summary="XPO as in Xie et al. (Algorithm 1): the DPO (sigmoid) objective on (policy sample, reference sample) pairs plus the exploration bonus alpha * log pi(y_ref).",
            overrides={"loss_type": "sigmoid"},
            paper="arXiv:2405.21046",
        ),
    },
)
