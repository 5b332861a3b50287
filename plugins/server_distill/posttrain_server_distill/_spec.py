"""The server_distill method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_GKD = "arXiv:2306.13649"

SPEC = MethodSpec(
    name="server_distill",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="On-policy distillation from a teacher served over HTTP (vLLM / posttrain serve-teacher): generalized JSD on the teacher's top-k log-probs.",
    family="distillation",
    trainer="posttrain_server_distill.trainer:ServerDistillationTrainer",
    config="posttrain_server_distill.config:ServerDistillationConfig",
    data_format="prompt_only",
    # the conformance run: the teacher server the tests' conftest starts ($POSTTRAIN_TEACHER_SERVER_URL)
    tiny_run={"max_completion_length": 8},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "divergence",
        "entropy": "entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates and asks the teacher
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "completions_truncated": "raise `max_completion_length` (the teacher then scores whole answers).",
        "throughput_bound": "lower `max_completion_length`, generate with vLLM (`use_vllm=True`), or serve the teacher on a GPU "
                            "(vllm serve TEACHER --logprobs-mode processed_logprobs) instead of `posttrain serve-teacher`.",
        "entropy_collapse": "lower `learning_rate`, raise `temperature`, or move `beta` towards 0 (forward KL covers the teacher's modes "
                            "instead of picking one) with a larger `loss_top_k`.",
        "length_drift": "lower `max_completion_length`, or check that the teacher server scores with the student's tokenizer and chat template.",
    },
    papers=(
        "Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes, arXiv:2306.13649",
    ),
    presets={
        "gkd_jsd": Preset(
            summary="GKD's on-policy generalized JSD with beta=0.5 (student samples only, lambda=1) at temperature 1, on the served top-1 support.",
            overrides={"beta": 0.5, "loss_top_k": 1, "temperature": 1.0},
            paper=_GKD,
        ),
        "gkd_forward_kl": Preset(
            summary="GKD's on-policy forward KL (beta=0) at temperature 1, on the teacher's top-20 tokens plus the tail.",
            overrides={"beta": 0.0, "loss_top_k": 20, "loss_add_tail": True, "temperature": 1.0},
            paper=_GKD,
        ),
        "gkd_reverse_kl": Preset(
            summary="GKD's on-policy reverse KL (beta=1, mode-seeking) at temperature 1, on the sampled token plus the tail.",
            overrides={"beta": 1.0, "loss_top_k": 1, "temperature": 1.0},
            paper=_GKD,
        ),
    },
)
