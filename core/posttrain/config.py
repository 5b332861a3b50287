"""The training configuration every method config extends (light: imports no torch).

Field names follow TRL/transformers (``learning_rate``, ``per_device_train_batch_size``,
``gradient_accumulation_steps``, ``logging_steps``, ...) so that moving from TRL is an import
change. A method's config subclasses :class:`TrainingConfig` with ``@dataclass(kw_only=True)``,
adds its own fields with ``field(metadata={"help": ...})`` and may override defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainingConfig", "config_fields", "closest_field_names", "ConfigError"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _help(text: str, **kw: Any) -> dict:
    return {"help": text, **kw}


@dataclass(kw_only=True)
class TrainingConfig:
    """Settings shared by every method: the loop, optimizer, logging, checkpoints and model loading."""

    # > Parameters that control where results go
    output_dir: str = field(default="outputs/run", metadata=_help("Where checkpoints, metrics.jsonl and run_manifest.json are written."))
    run_name: str | None = field(default=None, metadata=_help("Name of the run for trackers; defaults to the output_dir's name."))

    # > Parameters that control the model
    model_name_or_path: str | None = field(default=None, metadata=_help("Hub id or local directory of the model; used when the trainer gets no model object (CLI)."))
    model_init_kwargs: dict | None = field(default=None, metadata=_help("Keyword arguments for from_pretrained when the model is given by name (e.g. {'dtype': 'bfloat16'})."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations in backward to save memory (slower)."))

    # > Parameters that control PEFT (used when the trainer gets no peft_config)
    use_peft: bool = field(default=False, metadata=_help("Train a LoRA adapter instead of all weights."))
    lora_r: int = field(default=16, metadata=_help("LoRA rank."))
    lora_alpha: int = field(default=32, metadata=_help("LoRA scaling alpha."))
    lora_dropout: float = field(default=0.05, metadata=_help("Dropout on the LoRA branch."))
    lora_target_modules: list[str] | None = field(default=None, metadata=_help("Module names to adapt; defaults to all linear layers."))

    # > Parameters that control the data
    dataset_name: str | None = field(default=None, metadata=_help("Hub id, or a local .json/.jsonl/.parquet file or directory (CLI)."))
    dataset_split: str = field(default="train", metadata=_help("Split used for training (CLI)."))
    eval_dataset_split: str | None = field(default=None, metadata=_help("Split used for evaluation, if any (CLI)."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Micro-batch size per process."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Evaluation batch size per process."))
    dataloader_drop_last: bool = field(default=False, metadata=_help("Drop the last incomplete micro-batch of each epoch."))

    # > Parameters that control the optimization
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not applied to biases and norms)."))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Clip the global gradient norm to this value (0 disables clipping)."))
    lr_scheduler_type: str = field(default="linear", metadata=_help("Schedule name from transformers.get_scheduler: linear, cosine, constant, constant_with_warmup, ..."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of the steps spent warming up linearly."))
    warmup_steps: int = field(default=0, metadata=_help("Warm-up steps; overrides warmup_ratio when > 0."))
    num_train_epochs: float = field(default=3.0, metadata=_help("Epochs to train when max_steps <= 0."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps to train; overrides num_train_epochs when > 0."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step; losses are normalized so 8x1 equals 1x8."))
    seed: int = field(default=42, metadata=_help("Seed for initialization, data order and sampling."))
    bf16: bool | None = field(default=None, metadata=_help("bfloat16 mixed precision; None = on when the GPU supports it, off on CPU."))
    fp16: bool = field(default=False, metadata=_help("float16 mixed precision (CUDA only)."))
    deepspeed: str | dict | None = field(default=None, metadata=_help("DeepSpeed config (path to JSON or a dict); run under accelerate launch or torchrun."))

    # > Parameters that control logging and evaluation
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps (to metrics.jsonl, trackers and the progress bar)."))
    logging_first_step: bool = field(default=True, metadata=_help("Also log after the first step."))
    report_to: list[str] | str = field(default="none", metadata=_help("Trackers: 'none', 'all', or names such as tensorboard, wandb, mlflow, trackio."))
    eval_strategy: str = field(default="no", metadata=_help("'no', 'steps' (every eval_steps) or 'epoch'. An eval dataset is always scored at the end."))
    eval_steps: int | None = field(default=None, metadata=_help("Evaluate every N steps when eval_strategy='steps' (default: logging_steps)."))
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bar."))

    # > Parameters that control checkpoints
    save_strategy: str = field(default="steps", metadata=_help("'steps' (every save_steps), 'epoch', or 'no'. The final model is always saved to output_dir."))
    save_steps: int = field(default=500, metadata=_help("Save a checkpoint every N optimizer steps."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most N checkpoints (oldest deleted first)."))
    resume_from_checkpoint: str | bool | None = field(default=None, metadata=_help("Checkpoint directory to resume from, or true for the latest in output_dir."))
    push_to_hub: bool = field(default=False, metadata=_help("Upload the final model to the Hub."))
    hub_model_id: str | None = field(default=None, metadata=_help("Repository id for push_to_hub (default: output_dir's name)."))

    # > Parameters that control the maturity gate
    allow_experimental: bool = field(default=False, metadata=_help("Opt in to an experimental method from Python (CLI: --allow-experimental NAME)."))

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                raise ConfigError(f"{name}={value} is invalid: it must be {'>= 0' if allow_zero else '> 0'}.")

        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            positive(name)
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps"):
            positive(name, allow_zero=True)
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(f"warmup_ratio={self.warmup_ratio} is invalid: use a fraction in [0, 1].")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("max_steps <= 0 and num_train_epochs <= 0: set max_steps > 0 or num_train_epochs > 0.")
        if self.eval_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"eval_strategy={self.eval_strategy!r} is invalid: use 'no', 'steps' or 'epoch'.")
        if self.save_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"save_strategy={self.save_strategy!r} is invalid: use 'no', 'steps' or 'epoch'.")
        if self.bf16 and self.fp16:
            raise ConfigError("bf16=True and fp16=True: choose one mixed-precision mode.")
        if self.eval_steps is None:
            self.eval_steps = self.logging_steps
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit={self.save_total_limit} is invalid: use None or >= 1.")

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-friendly dict (for manifests and trackers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def config_fields(config_cls: type) -> list[dict[str, Any]]:
    """Return ``[{"name", "type", "default", "help"}]`` for every field of a config dataclass."""
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        type_ = hints.get(f.name, f.type)
        type_name = type_.__name__ if isinstance(type_, type) else str(type_).replace("typing.", "")
        out.append({"name": f.name, "type": type_name, "default": default, "help": f.metadata.get("help", "")})
    return out


def closest_field_names(config_cls: type, name: str, n: int = 3) -> list[str]:
    """Return up to ``n`` field names of ``config_cls`` closest to ``name`` (for error messages)."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)
