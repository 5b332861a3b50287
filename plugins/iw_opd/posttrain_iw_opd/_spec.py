"""The IW-OPD method spec and its presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_PAPER = "arXiv:2606.22600"

SPEC = MethodSpec(
    name="iw_opd",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="IW-OPD: on-policy distillation from a frozen teacher on the student's own samples, each token's signal weighted by the "
            "teacher-student discrepancy accumulated over its prefix.",
    family="distillation",
    trainer="posttrain_iw_opd.trainer:IWOPDTrainer",
    config="posttrain_iw_opd.config:IWOPDConfig",
    data_format="prompt_only",
    # the conformance run distills the tiny model from a tiny trained teacher (posttrain.testing)
    tiny_run={"max_completion_length": 8, "max_length": 64},  # the conformance run gives it a tiny teacher (posttrain.conformance.tiny)
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "teacher_kl",
        "teacher_entropy": "teacher_entropy",
        "entropy": "entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate`, lower `iw_opd_gamma` (late tokens then count more), or raise `max_completion_length` "
                              "if the completions are cut before the teacher's answer ends.",
        "teacher_mode_collapse": "raise `temperature` (sampling and loss), lower `learning_rate`, or switch to `distillation_objective='jsd'` "
                                 "with `beta` < 1 (forward KL covers the teacher's other modes).",
        "completions_truncated": "raise `max_completion_length` (IW-OPD weights a sequence's tokens by its whole prefix).",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), or lower `max_completion_length` or `num_generations`.",
        "entropy_collapse": "lower `learning_rate` or raise `temperature`.",
        "length_drift": "lower `max_completion_length`; check that the teacher ends its answers with the EOS token.",
    },
    papers=(
        "Xie, Zhu, Wen, Chen and Wang 2026, On the Position Bias of On-Policy Distillation, arXiv:2606.22600",
    ),
    presets={
        "iw_opd": Preset(
            summary="IW-OPD (Algorithm 1) as TRL 1.16 ships it: sampled-token objective, importance-weight amplification gamma 0.5, fully on-policy.",
            overrides={"distillation_objective": "iw_opd", "iw_opd_gamma": 0.5, "lmbda": 1.0, "temperature": 1.0},
            paper=_PAPER,
        ),
        "opd": Preset(
            summary="The paper's baseline, standard on-policy distillation: the same sampled-token reverse-KL signal with uniform token weights (gamma 0).",
            overrides={"distillation_objective": "iw_opd", "iw_opd_gamma": 0.0, "lmbda": 1.0},
            paper=_PAPER,
        ),
    },
)
