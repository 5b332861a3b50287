"""The GOLD method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="gold",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="GOLD: on-policy logit distillation from a teacher, across tokenizers with universal logit distillation (byte-span alignment, merged split tokens, vocabulary mapping).",
    family="distillation",
    trainer="posttrain_gold.trainer:GOLDTrainer",
    config="posttrain_gold.config:GOLDConfig",
    data_format="conversational_prompt_completion",
    # a few steps on a tiny model (the conformance suite). Its trainer gets no teacher, so the teacher is TRL's default, a frozen copy
    # of the student, whose divergence to the student is 0: a student temperature of 2 in the ULD loss gives it something to learn.
    tiny_run={"max_completion_length": 8, "max_length": 128, "lmbda": 0.5, "use_uld_loss": True, "uld_student_temperature": 2.0},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "divergence",
        "entropy": "entropy",  # the student's, at temperature 1 over the scored completion positions
        "teacher_entropy": "teacher_entropy",
        "completion_length": "completions/mean_length",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step samples the on-policy completions
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate` (TRL's GOLD default 1e-7 is for large models), raise `lmbda` so more micro-batches are "
                                  "the student's own samples, or check the teacher (with `use_uld_loss`, its tokenizer: `teacher_tokenizer_name_or_path`).",
        "teacher_mode_collapse": "lower `beta` toward 0 (forward KL covers the teacher's modes instead of seeking one), raise `temperature`, or lower `learning_rate`.",
        "throughput_bound": "lower `max_completion_length` or `lmbda` (on-policy micro-batches generate; off-policy ones do not).",
        "completions_truncated": "raise `max_completion_length`.",
        "length_drift": "lower `max_completion_length`, or lower `lmbda` to train more on the dataset's completions.",
    },
    papers=(
        "Patiño, Rasul, Gallouédec, Burtenshaw, Paniego, Srivastav, Frere, Beeching, Tunstall, von Werra and Wolf 2025, Unlocking On-Policy "
        "Distillation for Any Model Family, Hugging Face blog (https://huggingface.co/spaces/HuggingFaceH4/general-on-policy-logit-distillation)",
        "Boizard, El Haddad, Hudelot and Colombo 2024, Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs, arXiv:2402.12030",
        "Agarwal, Vieillard, Zhou, Stanczyk, Ramos Garea, Geist and Bachem 2024, On-Policy Distillation of Language Models: Learning from "
        "Self-Generated Mistakes, ICLR 2024, arXiv:2306.13649",
    ),
    presets={
        "gold_cross_tokenizer": Preset(
            summary="GOLD across tokenizers (TRL's GOLD recipe): ULD loss with byte-span alignment of the two tokenizations and merged split tokens.",
            overrides={"use_uld_loss": True, "use_extended_uld": True},
            paper="https://huggingface.co/spaces/HuggingFaceH4/general-on-policy-logit-distillation",
        ),
        "gold_hybrid": Preset(
            summary="GOLD's hybrid loss: generalized JSD on the tokens both vocabularies share, sorted ULD on the rest, weighted by the overlap.",
            overrides={"use_uld_loss": True, "use_extended_uld": True, "uld_use_hybrid_loss": True},
            paper="https://huggingface.co/spaces/HuggingFaceH4/general-on-policy-logit-distillation",
        ),
        "uld": Preset(
            summary="ULD as in Boizard et al.: cross-entropy plus the sorted-probability (Wasserstein-1) distance, tokens paired by position, on the dataset's (teacher-generated) completions.",
            overrides={"use_uld_loss": True, "use_extended_uld": False, "uld_crossentropy_weight": 1.0, "lmbda": 0.0},
            paper="arXiv:2402.12030",
        ),
        "gkd_on_policy": Preset(
            summary="GKD's on-policy distillation (Agarwal et al.): every micro-batch sampled by the student (lambda=1), generalized JSD.",
            overrides={"lmbda": 1.0},
            paper="arXiv:2306.13649",
        ),
    },
)
