"""The distill method spec and its presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="distill",
    maturity="stable",
    plugin_api="1.8",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer; 1.8: ToolCallingRollout, the tool signal roles)
    summary="On-policy distillation: the student samples, a teacher scores every token; generalized JSD (reverse KL by default), one or several local teachers or a served one.",
    family="distillation",
    trainer="posttrain_distill.trainer:DistillationTrainer",
    config="posttrain_distill.config:DistillationConfig",
    data_format="prompt_only",
    # a few steps on a tiny model (the conformance suite): the student is its own teacher's copy, loaded by name
    tiny_run={"max_completion_length": 8},  # the conformance run gives it a tiny teacher (posttrain.conformance.tiny)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "loss",  # the loss IS the per-token divergence to the teacher
        "entropy": "entropy",
        "teacher_entropy": "teacher_entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: the producer generates
        "tool_call_rate": "tools/call_frequency",  # tools= runs only
        "tool_failure_rate": "tools/failure_frequency",
        "turns_per_episode": "tools/mean_turns",
        "turn_limit_rate": "tools/turn_limit_ratio",
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate` (TRL's default 1e-6 is meant for large models), sample more prompts per step "
                              "(`per_device_train_batch_size`, `gradient_accumulation_steps`), or try another divergence (`beta`: 0 forward "
                              "KL covers the teacher's modes, 1 reverse KL seeks one).",
        "teacher_mode_collapse": "the reverse KL (`beta`=1) is mode-seeking: lower `beta` toward 0 (forward KL, mass-covering) or 0.5 (JSD), "
                                 "or raise `temperature`.",
        "entropy_collapse": "lower `beta` (reverse KL is mode-seeking), raise `temperature`, or lower `learning_rate`.",
        "completions_truncated": "raise `max_completion_length` (the divergence is taken on the truncated completions too).",
        "length_drift": "check the teacher's own answer lengths on these prompts; cap `max_completion_length`.",
        "tool_calls_failing": "read the failing calls' error messages in the logged completions (`log_completions=True`); fix the tools or "
                              "their docstrings (the schema the student reads), or raise `tool_call_timeout` if they time out.",
        "turn_limit_reached": "raise `max_tool_calling_iterations` (or `max_completion_length`): the divergence is taken on episodes cut "
                              "before their answer.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or sample more completions at once "
                            "(`generation_batch_size`).",
    },
    papers=(
        "Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes, arXiv:2306.13649",
    ),
    presets={
        "reverse_kl": Preset(
            summary="Reverse KL(student || teacher) on the student's own samples (TRL's default, beta=1; mode-seeking).",
            overrides={"beta": 1.0},
            paper="arXiv:2306.13649",
        ),
        "forward_kl": Preset(
            summary="Forward KL(teacher || student) on the student's own samples (beta=0; mass-covering, as supervised KD's loss).",
            overrides={"beta": 0.0},
            paper="arXiv:2306.13649",
        ),
        "jsd": Preset(
            summary="Generalized JSD with beta=0.5 (the symmetric Jensen-Shannon divergence, Eq. 1 of Agarwal et al.).",
            overrides={"beta": 0.5},
            paper="arXiv:2306.13649",
        ),
    },
)
