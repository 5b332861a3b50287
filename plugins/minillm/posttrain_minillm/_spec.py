"""The MiniLLM method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_PAPER = "arXiv:2306.08543"

SPEC = MethodSpec(
    name="minillm",
    maturity="experimental",
    plugin_api="1.9",  # the plugin API it is written against (1.9: vision-language models; 1.6: the teacher_entropy role, the distillation diagnostics, TeacherServer)
    summary="MiniLLM: on-policy distillation of a teacher by reverse-KL policy gradient (single-step decomposition, length normalization).",
    family="distillation",
    trainer="posttrain_minillm.trainer:MiniLLMTrainer",
    config="posttrain_minillm.config:MiniLLMConfig",
    data_format="prompt_only",
    # the conformance run: tests/test_minillm_conformance.py names the tiny model itself as the teacher
    # (the student is its own teacher there: zero divergence, so a toy reward gives the update to check)
    tiny_run={"num_generations": 2, "max_completion_length": 8, "reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"]},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "teacher_divergence": "reverse_kl",
        "teacher_entropy": "teacher_entropy",
        "entropy": "entropy",
        "clip_fraction": "clip_ratio/region_mean",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "divergence_stalled": "raise `learning_rate` or train longer (`max_steps`); keep `single_step_decomposition=True` "
                              "(the exact per-token reverse KL, the low-variance part of the gradient); try `gamma` > 0 with "
                              "`length_normalization=True` (the paper's long-horizon reward); check that student and teacher "
                              "share the chat template.",
        "teacher_mode_collapse": "reverse KL is mode-seeking: raise `temperature` or `kd_temperature`, lower `learning_rate`, "
                                 "or move to a forward-KL/JSD distillation method (distill, gkd).",
        "completions_truncated": "raise `max_completion_length`, or set `mask_truncated_completions=True`.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), lower `max_completion_length`, or reuse each generation "
                            "for several updates (`num_iterations` > 1).",
        "high_clip_ratio": "lower `learning_rate` or `num_iterations`, or raise `epsilon` (and `epsilon_high`).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature` or `kd_temperature`.",
        "length_drift": "set `length_normalization=True` with `gamma` > 0, lower `max_completion_length`, or set "
                        "`mask_truncated_completions=True`.",
    },
    papers=(
        "Gu, Dong, Wei and Huang 2024, MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024, arXiv:2306.08543",
    ),
    presets={
        "minillm_trl": Preset(
            summary="MiniLLM as TRL 1.14.2 shipped it: per-token reverse-KL reward (gamma 0), single-step decomposition, kd_temperature 1, DAPO aggregation.",
            overrides={"gamma": 0.0, "length_normalization": True, "single_step_decomposition": True, "rkl_advantage": True, "kd_temperature": 1.0,
                       "loss_type": "dapo", "disable_dropout": True},
            paper=_PAPER,
        ),
        "minillm_paper": Preset(
            summary="The paper's long-horizon reward: R_t the undiscounted (gamma 1) sum of future log-ratios, length-normalized, plus single-step decomposition "
                    "(the paper's teacher-mixed sampling is not offered: see docs/methods/minillm.md).",
            overrides={"gamma": 1.0, "length_normalization": True, "single_step_decomposition": True, "rkl_advantage": True},
            paper=_PAPER,
        ),
    },
)
