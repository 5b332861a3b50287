"""The SDPO method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="sdpo",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="SDPO: RL via self-distillation; the model shown a successful rollout of its group (or feedback) teaches the model without it.",
    family="distillation",
    trainer="posttrain_sdpo.trainer:SDPOTrainer",
    config="posttrain_sdpo.config:SDPOConfig",
    data_format="prompt_only",  # plus reward columns; an optional 'privileged_context' is environment feedback
    # a threshold every reward meets: every sample gets a demonstration, so a few steps always distill
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "num_generations": 2, "max_completion_length": 8,
              "success_reward_threshold": 0.0, "learning_rate": 1e-3},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "sdpo/distillation_loss",
        "reward": "self_distillation/reward_mean",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "check that rollouts succeed (`success_reward_threshold`; metric self_distillation/reprompt_sample_fraction), "
                              "raise `learning_rate`, or use `distillation_mode='full_logits'`.",
        "teacher_mode_collapse": "raise `temperature`, keep the teacher slower (`teacher_update_rate` lower, or `teacher_model_kind='base'`), "
                                 "or blend in the policy gradient (`distillation_weight` < 1).",
        "reward_std_collapse": "raise `num_generations` or `temperature`, or give the reward partial credit; with flat rewards SDPO only "
                               "distills from 'privileged_context' feedback (`include_environment_feedback`).",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate` or `num_generations`.",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "lower `max_completion_length` or `num_generations`, generate with vLLM (`use_vllm=True`), or reuse each "
                            "rollout for several updates (`num_iterations` > 1).",
        "length_drift": "lower `max_completion_length`, or set `mask_truncated_completions=True`.",
    },
    papers=(
        "Hübotter, Lübeck, Behric, Baumann, Bagatella, Marta, Hakimi, Shenfeld, Kleine Buening, Guestrin and Krause 2026, "
        "Reinforcement Learning via Self-Distillation, arXiv:2601.20802",
    ),
    presets={
        "sdpo": Preset(
            summary="SDPO as in Hübotter et al. (TRL's defaults): pure self-distillation (distillation_weight 1) with reverse KL on the "
                    "sampled tokens, an EMA teacher (rate 0.05) reprompted with another successful rollout of the group, "
                    "importance-ratio cap 2.",
            overrides={"distillation_weight": 1.0, "distillation_mode": "sampled_token", "distillation_alpha": 1.0, "teacher_model_kind": "ema",
                       "teacher_update_rate": 0.05, "distillation_is_clip": 2.0, "use_successful_as_teacher": True,
                       "dont_reprompt_on_self_success": True},
            paper="arXiv:2601.20802",
        ),
    },
)
