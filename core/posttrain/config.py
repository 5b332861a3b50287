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

from posttrain._errors import PosttrainError

__all__ = ["TrainingConfig", "config_fields", "closest_field_names", "ConfigError", "as_config"]


class ConfigError(PosttrainError, ValueError):
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
    trust_remote_code: bool = field(default=False, metadata=_help("Allow models and tokenizers loaded by name to run code from their repository (TRL's trust_remote_code)."))
    freeze_vision_tower: bool = field(default=False, metadata=_help("A vision-language model: freeze its vision encoder (visual / vision_tower / vision_model); the projector and the language model train. Refused for a text-only model."))
    logprob_chunk_size: int | None = field(default=256, metadata=_help("Rows (tokens) per chunk when log-probs, entropies and losses are computed from the hidden states and the LM head, never materializing the (B, T, V) logits (posttrain.causal_lm_states); 0 or None: the model's own full logits."))

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
    logging_first_step: bool = field(default=False, metadata=_help("Also log after the first step (transformers' and TRL's default: off)."))
    report_to: list[str] | str = field(default="none", metadata=_help("Trackers: 'none', 'all', or names such as tensorboard, wandb, mlflow, trackio."))
    eval_strategy: str = field(default="no", metadata=_help("'no', 'steps' (every eval_steps) or 'epoch'. An eval dataset is always scored at the end."))
    eval_steps: int | None = field(default=None, metadata=_help("Evaluate every N steps when eval_strategy='steps' (default: logging_steps)."))
    diagnostics_window: int = field(default=20, metadata=_help("Logged training steps a trend diagnostic looks back over (reward plateau, length drift, ...); see docs/diagnostics.md."))
    diagnostics_thresholds: dict | None = field(default=None, metadata=_help("Overrides of the diagnostics' thresholds by name (e.g. {'memory_headroom': 0.3}); names in docs/diagnostics.md."))
    disable_tqdm: bool = field(default=False, metadata=_help("Hide the progress bar."))

    # > Parameters that control checkpoints
    save_strategy: str = field(default="steps", metadata=_help("'steps' (every save_steps), 'epoch', or 'no'. The final model is always saved to output_dir."))
    save_steps: int = field(default=500, metadata=_help("Save a checkpoint every N optimizer steps."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most N checkpoints of this run (its oldest deleted first; another run's are never touched)."))
    resume_from_checkpoint: str | bool | None = field(default=None, metadata=_help("Checkpoint directory to resume from, or true for the latest in output_dir."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Start a fresh run in an output_dir that holds another run: delete that run's checkpoints, metrics.jsonl, "
        "diagnostics.jsonl and manifest first. Without it such a start is refused (one run per directory)."))
    push_to_hub: bool = field(default=False, metadata=_help("Upload the final model to the Hub."))
    hub_model_id: str | None = field(default=None, metadata=_help("Repository id for push_to_hub (default: output_dir's name)."))

    # > Parameters that control the maturity gate
    allow_experimental: bool = field(default=False, metadata=_help("Opt in to an experimental method from Python (CLI: --allow-experimental NAME)."))

    # > Parameters of transformers.TrainingArguments that posttrain's loop honours (same names and defaults)
    logging_strategy: str = field(default="steps", metadata=_help("'steps' (every logging_steps), 'epoch' or 'no'."))
    eval_on_start: bool = field(default=False, metadata=_help("Evaluate once before the first step (a sanity check of the eval set)."))
    load_best_model_at_end: bool = field(default=False, metadata=_help("Load the checkpoint with the best metric_for_best_model at the end (needs matching eval and save strategies)."))
    metric_for_best_model: str | None = field(default=None, metadata=_help("Eval metric that ranks checkpoints ('loss' or 'eval_loss', a method metric such as 'eval_mean_token_accuracy')."))
    greater_is_better: bool | None = field(default=None, metadata=_help("Whether a larger metric_for_best_model is better; default: False for metrics ending in 'loss', True otherwise."))
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata=_help("Extra keyword arguments of the learning-rate schedule (e.g. {'num_cycles': 0.5})."))
    optim: str = field(default="adamw_torch_fused", metadata=_help("Optimizer: adamw_torch_fused, adamw_torch, adamw_hf, sgd or adagrad."))
    optim_args: str | None = field(default=None, metadata=_help("Extra optimizer arguments as 'key=value,key=value'."))
    gradient_checkpointing_kwargs: dict | str | None = field(default=None, metadata=_help("Keyword arguments of model.gradient_checkpointing_enable (default {'use_reentrant': False})."))
    use_cpu: bool = field(default=False, metadata=_help("Train on the CPU even when an accelerator is present."))
    data_seed: int | None = field(default=None, metadata=_help("Seed of the data order (default: seed)."))
    full_determinism: bool = field(default=False, metadata=_help("Call transformers.enable_full_determinism(seed): deterministic kernels, slower."))
    tf32: bool | None = field(default=None, metadata=_help("Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU)."))
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile before training."))
    torch_compile_backend: str | None = field(default=None, metadata=_help("torch.compile backend (default inductor)."))
    torch_compile_mode: str | None = field(default=None, metadata=_help("torch.compile mode (default, reduce-overhead, max-autotune)."))
    torch_empty_cache_steps: int | None = field(default=None, metadata=_help("Empty the CUDA cache every N steps (lower peak memory, slower)."))
    neftune_noise_alpha: float | None = field(default=None, metadata=_help("NEFTune (arXiv:2310.05914): uniform noise of scale alpha/sqrt(L*d) on input embeddings while training."))
    use_liger_kernel: bool = field(default=False, metadata=_help("Use Liger kernels where installed and supported (CUDA); otherwise a one-line warning and the PyTorch path."))
    liger_kernel_config: dict | None = field(default=None, metadata=_help("Options for Liger kernels (used with use_liger_kernel)."))
    save_only_model: bool = field(default=False, metadata=_help("Checkpoints hold only the model (no optimizer/scheduler/RNG): smaller, but they cannot be resumed exactly."))
    ddp_find_unused_parameters: bool | None = field(default=None, metadata=_help("DDP find_unused_parameters (default False; True with gradient checkpointing off and unused branches)."))
    ddp_bucket_cap_mb: int | None = field(default=None, metadata=_help("DDP gradient bucket size in MB."))
    ddp_broadcast_buffers: bool | None = field(default=None, metadata=_help("DDP broadcast_buffers."))
    ddp_static_graph: bool | None = field(default=None, metadata=_help("DDP static_graph."))
    ddp_timeout: int = field(default=1800, metadata=_help("Timeout of the process group in seconds."))
    ddp_backend: str | None = field(default=None, metadata=_help("Process-group backend (nccl, gloo, ...; default: accelerate's choice)."))
    hub_token: str | None = field(default=None, metadata=_help("Token for push_to_hub (default: the logged-in token)."))
    hub_private_repo: bool | None = field(default=None, metadata=_help("Create the Hub repository as private."))
    hub_revision: str | None = field(default=None, metadata=_help("Branch to push to."))
    hub_strategy: str = field(default="every_save", metadata=_help("'end' pushes once at the end; 'every_save' also pushes each checkpoint save (like transformers)."))
    hub_always_push: bool = field(default=False, metadata=_help("Accepted for TrainingArguments compatibility (pushes are synchronous here)."))

    # > Parameters of transformers.TrainingArguments accepted so TRL configs load; they change nothing in posttrain's loop
    do_train: bool = field(default=False, metadata=_help("Accepted, no effect (as in transformers' Trainer: a flag for scripts)."))
    do_eval: bool = field(default=False, metadata=_help("Accepted, no effect (as in transformers' Trainer: a flag for scripts)."))
    do_predict: bool = field(default=False, metadata=_help("Accepted, no effect (as in transformers' Trainer: a flag for scripts)."))
    dataloader_num_workers: int = field(default=0, metadata=_help("Processes that collate micro-batches ahead of the training step (a torch DataLoader; 0 = collate in the training process). The batches and their order are the same either way, so resume stays exact."))
    dataloader_pin_memory: bool = field(default=True, metadata=_help("Pin the workers' batches in page-locked memory (with dataloader_num_workers > 0 on a CUDA device)."))
    dataloader_persistent_workers: bool = field(default=False, metadata=_help("Accepted, no effect: the workers are started once per epoch (and at the resume position)."))
    dataloader_prefetch_factor: int | None = field(default=None, metadata=_help("Micro-batches each worker collates ahead (with dataloader_num_workers > 0; default torch's 2)."))
    dataloader_multiprocessing_context: str | None = field(default=None, metadata=_help("How workers start ('fork', 'spawn', 'forkserver'; with dataloader_num_workers > 0; default: the platform's)."))
    dataloader_in_order: bool = field(default=True, metadata=_help("Accepted, no effect: data order is a seeded permutation per epoch."))
    accelerator_config: dict | str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain shards data itself, so accelerate's dataloader options do not apply."))
    remove_unused_columns: bool = field(default=True, metadata=_help("Accepted, no effect: methods keep the columns they need (e.g. reward-function inputs)."))
    label_names: list[str] | None = field(default=None, metadata=_help("Accepted, no effect: each method knows its label columns."))
    train_sampling_strategy: str = field(default="random", metadata=_help("Accepted, no effect: training order is a seeded random permutation per epoch."))
    length_column_name: str = field(default="length", metadata=_help("Accepted, no effect (no group_by_length sampler)."))
    average_tokens_across_devices: bool = field(default=True, metadata=_help("Accepted: posttrain always normalizes losses over the items of every process."))
    include_num_input_tokens_seen: str | bool = field(default="no", metadata=_help("Accepted: posttrain always counts input tokens (state.num_input_tokens_seen)."))
    label_smoothing_factor: float = field(default=0.0, metadata=_help("Accepted, no effect: each method defines its own loss (see its label_smoothing option, if any)."))
    auto_find_batch_size: bool = field(default=False, metadata=_help("Accepted, no effect: batch size is never changed behind your back; lower per_device_train_batch_size on OOM."))
    eval_delay: float = field(default=0, metadata=_help("Accepted, no effect."))
    eval_accumulation_steps: int | None = field(default=None, metadata=_help("Accepted, no effect: evaluation reduces metrics on the device."))
    prediction_loss_only: bool = field(default=False, metadata=_help("Accepted, no effect."))
    eval_do_concat_batches: bool = field(default=True, metadata=_help("Accepted, no effect."))
    eval_use_gather_object: bool = field(default=False, metadata=_help("Accepted, no effect."))
    include_for_metrics: list[str] = field(default_factory=list, metadata=_help("Accepted, no effect."))
    batch_eval_metrics: bool = field(default=False, metadata=_help("Accepted, no effect."))
    bf16_full_eval: bool = field(default=False, metadata=_help("Accepted, no effect: evaluation runs in the training precision."))
    fp16_full_eval: bool = field(default=False, metadata=_help("Accepted, no effect: evaluation runs in the training precision."))
    activation_checkpointing: bool | None = field(default=None, metadata=_help("Accepted, no effect: use gradient_checkpointing."))
    activation_checkpointing_kwargs: dict | str | None = field(default=None, metadata=_help("Accepted, no effect: use gradient_checkpointing_kwargs."))
    use_cache: bool = field(default=False, metadata=_help("Accepted, no effect: training forwards never use the KV cache; generation does."))
    optim_target_modules: str | list[str] | None = field(default=None, metadata=_help("Accepted, no effect (GaLore-style optimizers are not offered)."))
    fsdp: str | None = field(default=None, metadata=_help("Accepted, no effect: configure FSDP with `accelerate launch --use_fsdp` or an accelerate config file."))
    fsdp_config: dict | str | None = field(default=None, metadata=_help("Accepted, no effect: configure FSDP with `accelerate launch --use_fsdp` or an accelerate config file."))
    parallelism_config: Any = field(default=None, metadata=_help("Accepted, no effect: configure parallelism with accelerate."))
    save_on_each_node: bool = field(default=False, metadata=_help("Accepted, no effect: the main process writes shared files."))
    enable_jit_checkpoint: bool = field(default=False, metadata=_help("Accepted, no effect."))
    ignore_data_skip: bool = field(default=False, metadata=_help("Accepted, no effect: resume restores the exact data position without replaying batches."))
    restore_callback_states_from_checkpoint: bool = field(default=False, metadata=_help("Accepted, no effect."))
    log_level: str = field(default="passive", metadata=_help("Accepted, no effect."))
    log_level_replica: str = field(default="warning", metadata=_help("Accepted, no effect."))
    log_on_each_node: bool = field(default=True, metadata=_help("Accepted, no effect: the main process logs."))
    logging_nan_inf_filter: bool = field(default=True, metadata=_help("Accepted, no effect: non-finite losses are logged as they are (and raise a non_finite_loss diagnostic)."))
    project: str = field(default="huggingface", metadata=_help("Accepted, no effect (tracker project names come from run_name)."))
    trackio_space_id: str | None = field(default=None, metadata=_help("Accepted, no effect."))
    trackio_bucket_id: str | None = field(default=None, metadata=_help("Accepted, no effect."))
    trackio_static_space_id: str | None = field(default=None, metadata=_help("Accepted, no effect."))
    debug: str | list = field(default="", metadata=_help("Accepted, no effect."))
    skip_memory_metrics: bool = field(default=True, metadata=_help("Accepted, no effect."))
    local_rank: int = field(default=-1, metadata=_help("Accepted, no effect: the rank comes from the launcher's environment."))

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
        if self.logprob_chunk_size is not None and (isinstance(self.logprob_chunk_size, bool) or not isinstance(self.logprob_chunk_size, int) or self.logprob_chunk_size < 0):
            raise ConfigError(f"logprob_chunk_size={self.logprob_chunk_size!r} is invalid: use a positive number of rows per chunk, or 0/None for the unchunked logits.")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit={self.save_total_limit} is invalid: use None or >= 1.")
        self._check_trainingarguments_fields()
        self._check_diagnostics_fields()

    def _check_diagnostics_fields(self) -> None:
        if self.diagnostics_window < 3:
            raise ConfigError(f"diagnostics_window={self.diagnostics_window} is invalid: a trend needs at least 3 logged steps.")
        if isinstance(self.diagnostics_thresholds, str) and self.diagnostics_thresholds.strip().startswith("{"):
            import json

            try:
                self.diagnostics_thresholds = json.loads(self.diagnostics_thresholds)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"diagnostics_thresholds={self.diagnostics_thresholds!r} is not valid JSON ({exc.msg}): give a dict.") from None
        if self.diagnostics_thresholds is not None:
            from posttrain._diagnostic_codes import DEFAULT_THRESHOLDS

            if not isinstance(self.diagnostics_thresholds, dict):
                raise ConfigError(f"diagnostics_thresholds={self.diagnostics_thresholds!r} is invalid: give a dict of threshold name -> number.")
            for name, value in self.diagnostics_thresholds.items():
                if name not in DEFAULT_THRESHOLDS:
                    close = difflib.get_close_matches(str(name), list(DEFAULT_THRESHOLDS), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else f" Known: {', '.join(DEFAULT_THRESHOLDS)}."
                    raise ConfigError(f"diagnostics_thresholds has unknown threshold {name!r}.{hint}")
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                    raise ConfigError(f"diagnostics_thresholds[{name!r}]={value!r} is invalid: give a number >= 0.")

    def _check_trainingarguments_fields(self) -> None:
        """Validate the transformers.TrainingArguments fields and say once which accepted ones do nothing here."""
        for name in ("eval_strategy", "save_strategy", "logging_strategy", "hub_strategy", "lr_scheduler_type", "optim"):
            value = getattr(self, name)
            if hasattr(value, "value"):  # transformers' str enums (IntervalStrategy.STEPS, ...)
                setattr(self, name, value.value)
        if self.logging_strategy not in ("no", "steps", "epoch"):
            raise ConfigError(f"logging_strategy={self.logging_strategy!r} is invalid: use 'no', 'steps' or 'epoch'.")
        if self.hub_strategy not in ("end", "every_save", "checkpoint", "all_checkpoints"):
            raise ConfigError(f"hub_strategy={self.hub_strategy!r} is invalid: use 'end', 'every_save', 'checkpoint' or 'all_checkpoints'.")
        if self.optim not in OPTIMIZERS:
            raise ConfigError(f"optim={self.optim!r} is not offered: use one of {', '.join(OPTIMIZERS)}.")
        for name in ("model_init_kwargs", "lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "accelerator_config", "fsdp_config", "activation_checkpointing_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().startswith("{"):
                import json

                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{name}={value!r} is not valid JSON ({exc.msg}): give a dict or a JSON object string.") from None
        if self.load_best_model_at_end:
            if self.save_strategy == "no" or self.eval_strategy != self.save_strategy:
                raise ConfigError(
                    f"load_best_model_at_end=True needs eval_strategy and save_strategy to match (got eval_strategy={self.eval_strategy!r}, "
                    f"save_strategy={self.save_strategy!r}): set both to 'steps' or both to 'epoch'."
                )
            if self.eval_strategy == "steps" and self.save_steps % self.eval_steps != 0:
                raise ConfigError(
                    f"load_best_model_at_end=True needs save_steps to be a multiple of eval_steps (got save_steps={self.save_steps}, "
                    f"eval_steps={self.eval_steps}): a checkpoint must exist at every evaluated step you may want back."
                )
            if self.metric_for_best_model is None:
                self.metric_for_best_model = "loss"
        if self.metric_for_best_model is not None and self.greater_is_better is None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        defaults = _no_effect_defaults(type(self))
        ignored = [
            name for name, default in defaults.items()
            if getattr(self, name) != default and getattr(self, name) not in (None, False, "", [], {})
            and not (name == "accelerator_config" and not isinstance(self.accelerator_config, (dict, str)))  # TrainingArguments always builds one
        ]
        if ignored:
            _warn_once(
                "posttrain: these TrainingArguments fields are accepted but change nothing in posttrain's loop: "
                + ", ".join(f"{n}={getattr(self, n)!r}" for n in ignored)
                + " (see `posttrain info <method>` for why)."
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-friendly dict (for manifests and trackers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: The optimizers ``optim`` accepts (transformers' names).
OPTIMIZERS = ("adamw_torch_fused", "adamw_torch", "adamw_hf", "adamw", "sgd", "adagrad")

_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        import warnings

        warnings.warn(message, UserWarning, stacklevel=4)


def _no_effect_defaults(config_cls: type) -> dict[str, Any]:
    """Return ``{field: default}`` of the fields of ``config_cls`` whose help starts with 'Accepted, no effect'.

    A method config documents a TRL field it cannot honour the same way, and gets the same
    one-time warning when a user sets it.
    """
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("help", "").startswith("Accepted, no effect"):
            out[f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return out


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


def as_config(args: Any, config_cls: type, *, default_output_dir: str | None = None) -> Any:
    """Return ``args`` as a ``config_cls`` instance (what a trainer does with its ``args=``).

    ``None`` gives the defaults; an instance of ``config_cls`` is returned as is; a
    ``transformers.TrainingArguments``, another config dataclass or a dict is converted field by
    field (fields ``config_cls`` does not have are dropped, as TRL does when it turns
    ``TrainingArguments`` into its own config).

    Raises:
        ConfigError: ``args`` is of another kind, or a value is invalid for ``config_cls``.
    """
    if args is None:
        return config_cls(**({"output_dir": default_output_dir} if default_output_dir else {}))
    if isinstance(args, config_cls):
        return args
    if isinstance(args, dict):
        values = dict(args)
    elif dataclasses.is_dataclass(args):
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
    else:
        raise ConfigError(f"args is a {type(args).__name__}: pass a {config_cls.__name__}(...) (or a transformers.TrainingArguments / dict of its fields).")
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    kept = {k: v for k, v in values.items() if k in names}
    if kept.get("output_dir") is None:
        kept.pop("output_dir", None)
    return config_cls(**kept)
