"""The SSD method spec and its paper preset (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="ssd",
    maturity="experimental",
    plugin_api="1.5",  # the plugin API it is written against
    summary="Simple Self-Distillation: sample the model's own completions at a training-time temperature and truncation, "
            "then fine-tune on them with plain cross-entropy (no teacher, reward or verifier).",
    family="online-distillation",
    trainer="posttrain_ssd.trainer:SSDTrainer",
    config="posttrain_ssd.config:SSDConfig",
    data_format="prompt_only",
    tiny_run={"max_completion_length": 8, "filter_empty": False},  # the conformance suite's few-step tiny run
    signals={  # posttrain.SignalRole -> this method's metric name
        "entropy": "entropy",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: the producer samples
    },
    actions={  # diagnostic code -> what to try, naming this method's config fields
        "entropy_collapse": "SSD sharpens the model on its own samples: stop earlier (`max_steps`, `num_train_epochs`), "
                            "lower `learning_rate`, or raise the training-time `temperature` (the paper trains at T_train > 1 "
                            "with `top_k` / `top_p` truncation).",
        "completions_truncated": "raise `max_completion_length` (truncated samples teach the model to stop mid-answer).",
        "throughput_bound": "sampling is most of each step: lower `max_completion_length`, sample with vLLM "
                            "(`use_vllm=True`), or reuse each rollout for several updates (`num_iterations` > 1).",
        "length_drift": "SSD trains on whatever it samples: lower `temperature` or tighten `top_k` / `top_p`, lower "
                        "`max_completion_length`, or keep `filter_empty=True`.",
    },
    papers=(
        "Zhang, Bai, Zheng, Jaitly, Collobert, Zhang 2026, Embarrassingly Simple Self-Distillation Improves Code Generation, arXiv:2604.01193",
    ),
    presets={
        "ssd_paper": Preset(
            summary="The SSD recipe for Qwen3-4B-Instruct-2507 on rStar-Coder prompts: one sample per prompt at T_train=1.6 "
                    "with top_k=20 / top_p=0.8 truncation, AdamW at peak lr 5e-6 with cosine decay, 32 samples per step, "
                    "65,536-token completions (paper section 3; decoding values as in TRL's examples/scripts/ssd.py).",
            overrides={"temperature": 1.6, "top_k": 20, "top_p": 0.8, "learning_rate": 5e-6, "lr_scheduler_type": "cosine",
                       "per_device_train_batch_size": 1, "gradient_accumulation_steps": 32, "max_prompt_length": 1024,
                       "max_completion_length": 65536, "num_train_epochs": 1},
            paper="arXiv:2604.01193",
        ),
    },
)
