"""The GKD method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_PAPER = "arXiv:2306.13649"

SPEC = MethodSpec(
    name="gkd",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="GKD: distill a teacher into a student with a generalized JSD on dataset, teacher or the student's own (on-policy) completions, mixed by lmbda.",
    family="distillation",
    trainer="posttrain_gkd.trainer:GKDTrainer",
    config="posttrain_gkd.config:GKDConfig",
    data_format="messages",  # TRL's GKD rows: a conversation whose last (assistant) message is the completion
    # a few steps on a tiny model (the conformance suite). Its teacher is the tiny model itself (the suite's default for a
    # teacher_model_name_or_path field), whose divergence to the student would be 0: loaded in bfloat16 (a teacher in its own
    # dtype, as large teachers run), its distributions differ from the float32 student's and give a gradient.
    tiny_run={"max_length": 48, "max_new_tokens": 8, "lmbda": 0.5},  # the conformance run gives it a tiny teacher (posttrain.conformance.tiny)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "divergence",
        "entropy": "entropy",
        "teacher_entropy": "teacher_entropy",
        "completion_length": "completions/mean_length",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate`, or raise `lmbda` (more on-policy batches: the student learns where it "
                              "actually goes wrong); if the student is much smaller than the teacher, try `beta` towards 1 "
                              "(reverse KL, mode seeking) instead of covering every mode of the teacher.",
        "teacher_mode_collapse": "lower `beta` (towards 0: forward KL covers the teacher's modes), raise the sampling "
                                 "`temperature`, or lower `lmbda` (more dataset/teacher completions).",
        "throughput_bound": "lower `max_new_tokens` or `lmbda` (fewer generated batches), or raise `generation_batch_size`.",
    },
    papers=(
        "Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem 2024, On-Policy Distillation of Language Models: "
        "Learning from Self-Generated Mistakes, ICLR 2024, arXiv:2306.13649",
    ),
    presets={
        "on_policy_gkd": Preset(
            summary="On-policy GKD (the paper's Algorithm 1 with student data fraction lambda=1): every batch is sampled from the student "
                    "itself (temperature 1), generalized JSD(beta=0.5) to the teacher on those tokens.",
            overrides={"lmbda": 1.0, "beta": 0.5, "temperature": 1.0, "seq_kd": False},
            paper=_PAPER,
        ),
        "on_policy_reverse_kl": Preset(
            summary="On-policy GKD with the reverse KL (lambda=1, beta=1): mode-seeking distillation on the student's own samples at temperature 1.",
            overrides={"lmbda": 1.0, "beta": 1.0, "temperature": 1.0, "seq_kd": False},
            paper=_PAPER,
        ),
        "mixed_gkd": Preset(
            summary="Mixed GKD (student data fraction lambda=0.5): half the batches on-policy, half the dataset's completions, JSD(0.5).",
            overrides={"lmbda": 0.5, "beta": 0.5, "temperature": 1.0, "seq_kd": False},
            paper=_PAPER,
        ),
        "supervised_kd": Preset(
            summary="Supervised KD, the paper's baseline (lambda=0, forward KL beta=0): token-level teacher distributions on the dataset's fixed completions.",
            overrides={"lmbda": 0.0, "beta": 0.0, "seq_kd": False},
            paper=_PAPER,
        ),
        "seq_kd": Preset(
            summary="Sequence-level KD data (lambda=0, seq_kd=True): completions sampled from the teacher (temperature 1), forward KL (beta=0) to it on them.",
            overrides={"lmbda": 0.0, "beta": 0.0, "seq_kd": True, "temperature": 1.0},
            paper=_PAPER,
        ),
    },
)
