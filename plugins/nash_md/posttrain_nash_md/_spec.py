"""The Nash-MD method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="nash_md",
    maturity="experimental",  # "stable" needs version >= 1.0 and a committed api_snapshot.json
    plugin_api="1.6",
    summary="Nash-MD (Nash learning from human feedback): policy gradient of the policy's samples played against a geometric mixture of policy and reference, with a KL penalty.",
    family="online-preference",
    trainer="posttrain_nash_md.trainer:NashMDTrainer",
    config="posttrain_nash_md.config:NashMDConfig",
    data_format="prompt_only",
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "max_new_tokens": 8},  # a few steps on a tiny model (the conformance suite)
    signals={  # posttrain.SignalRole -> this method's metric name
        "reward": "objective/model_scores",
        "kl": "kl",  # per-token k1 KL on the policy's samples (loss/kl is TRL's sequence-level log-ratio)
        "entropy": "objective/entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: the producer generates both samples
    },
    actions={
        "completions_truncated": "raise `max_new_tokens`, or set `missing_eos_penalty` so unfinished completions lose.",
        "throughput_bound": "lower `max_new_tokens` (each step samples the policy AND the mixture, two forwards a token), or use a GPU.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate`, or lower `mixture_coef` (a stronger opponent).",
        "kl_blowup": "raise `beta` (the KL weight), lower `learning_rate`, or raise `mixture_coef` (an opponent closer to the reference).",
        "reward_hacking": "raise `beta`, set `missing_eos_penalty`, lower `max_new_tokens`, and check the reward for exploits.",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or raise `beta`.",
        "length_drift": "check the reward for a length bias; lower `max_new_tokens` or set `missing_eos_penalty`.",
    },
    papers=(
        "Munos et al. 2023, Nash Learning from Human Feedback, arXiv:2312.00886",
    ),
    presets={
        "nash_md": Preset(
            summary="Nash-MD-PG as in Munos et al.: the policy plays against the geometric mixture pi_ref^c * pi^(1-c) with the 1/2 preference baseline and a KL term (c = mixture_coef, tau = beta).",
            overrides={"mixture_coef": 0.5},
            paper="arXiv:2312.00886",
        ),
        "self_play": Preset(
            summary="Self-play, the special case of Munos et al. with no regularization: the opponent is the current policy itself (mixture_coef=0) and no KL term (beta=0).",
            overrides={"mixture_coef": 0.0, "beta": 0.0},
            paper="arXiv:2312.00886",
        ),
    },
)
