"""The SDFT method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="sdft",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="SDFT: on-policy self-distillation; the model shown privileged context (a demonstration) teaches the model without it.",
    family="distillation",
    trainer="posttrain_sdft.trainer:SDFTTrainer",
    config="posttrain_sdft.config:SDFTConfig",
    # prompt/completion rows: without a 'privileged_context' column the completion is the teacher's demonstration
    data_format="prompt_completion",
    tiny_run={"num_generations": 2, "max_completion_length": 8, "distillation_topk": 20, "learning_rate": 1e-3},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "sdft/distillation_loss",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate`, check that 'privileged_context' really changes the teacher's answers "
                                  "(`teacher_prompt_template`), or use `distillation_mode='full_logits'`.",
        "teacher_mode_collapse": "raise `temperature` or `distillation_alpha` toward 0 (forward KL covers the teacher's modes), keep the "
                         "teacher fixed (`teacher_model_kind='base'`), or lower `learning_rate`.",
        "completions_truncated": "raise `max_completion_length`.",
        "throughput_bound": "lower `max_completion_length` or `num_generations`, generate with vLLM (`use_vllm=True`), or reuse each "
                            "rollout for several updates (`num_iterations` > 1).",
        "length_drift": "lower `max_completion_length`, or skip the first completion tokens (`num_loss_tokens_to_skip`).",
    },
    papers=(
        "Shenfeld, Damani, Hübotter and Agrawal 2026, Self-Distillation Enables Continual Learning, arXiv:2601.19897",
    ),
    presets={
        "sdft": Preset(
            summary="SDFT as in Shenfeld et al. (TRL's defaults): a fixed teacher (the initial model) with the demonstration in its "
                    "prompt, JSD (alpha 0.5) on the student's top-100 tokens, importance-ratio cap 2.",
            overrides={"teacher_model_kind": "base", "distillation_mode": "topk_logits", "distillation_topk": 100,
                       "distillation_alpha": 0.5, "distillation_is_clip": 2.0},
            paper="arXiv:2601.19897",
        ),
    },
)
