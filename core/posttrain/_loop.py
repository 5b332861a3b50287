"""The training-loop shell every method runs on (built on accelerate).

A method plugin owns its data processing and loss; the loop owns everything else: devices, mixed
precision, DDP/FSDP/DeepSpeed, optimizer and schedule, gradient accumulation, clipping, logging,
evaluation, checkpoints and resume. The method is any object with:

Required:
    train_dataset: a sequence of processed examples (``len`` and ``__getitem__``).
    collate(examples) -> dict: a batch of CPU tensors (the loop moves tensors to the device).
    compute_loss(model, batch, num_items_in_batch) -> (loss, metrics): ``loss`` must be the
        micro-batch's SUM of per-item losses divided by ``num_items_in_batch``, the number of
        items in the whole optimizer step (every micro-batch of the accumulation window, every
        process). That is what makes per-device batch 8 x accumulation 1 equal 1 x 8 and a
        2-process run equal a 1-process run with the same global batch. ``metrics`` maps names
        to scalar tensors (means over the micro-batch).
    count_items(batch) -> int: the batch's number of loss items (tokens for a token-level loss,
        sequences for a sequence-level one), computed on the CPU.

Optional:
    eval_dataset: scored at ``eval_steps`` and at the end.
    prepare_step(micro_batches, state) -> list[dict]: called once per optimizer step with the
        step's raw micro-batches (online methods generate rollouts here).
    on_step_end(model, state): after each optimizer step (reference sync, rollout weight update).
    state_dict() / load_state_dict(state): method state saved in checkpoints (tensors, numbers,
        strings, lists and dicts only: it is loaded with ``weights_only=True``).
    evaluate(model, dataloader) -> dict[str, float]: replaces the default evaluation (mean loss).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain import API_VERSION, __version__
from posttrain._checkpoint import find_latest_checkpoint, load_checkpoint, save_checkpoint
from posttrain._registry import ensure_activated
from posttrain.config import ConfigError, TrainingConfig

__all__ = ["TrainingLoop", "TrainingState", "TrainOutput"]


@dataclass
class TrainingState:
    """The loop's own resumable counters (saved as trainer_state.json)."""

    global_step: int = 0  #: optimizer steps done
    epoch: int = 0  #: current epoch index
    batches_in_epoch: int = 0  #: micro-batches of the current epoch already consumed
    max_steps: int = 0  #: total optimizer steps of the run
    num_input_tokens_seen: int = 0  #: tokens consumed (when the method reports ``num_tokens``)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainOutput:
    """What ``train()`` returns."""

    global_step: int
    training_loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


class TrainingLoop:
    """Run optimizer steps for a method on accelerate, with checkpoints, logging and resume.

    Args:
        args: The method's config (a :class:`~posttrain.TrainingConfig` subclass).
        method: The method id as registered (``"sft"``). The maturity gate runs here, so a
            trainer of an experimental method cannot be constructed without an opt-in.
        allow_experimental: Python opt-in for experimental methods.

    Raises:
        posttrain.MethodNotAllowedError: the method is experimental and not opted in.
        posttrain.ConfigError: an option is impossible on this machine (e.g. fp16 on CPU).
    """

    def __init__(self, args: TrainingConfig, *, method: str, allow_experimental: bool = False) -> None:
        self.activation = ensure_activated(method, allow_experimental=allow_experimental or args.allow_experimental)
        self.args = args
        self.method_name = method
        from accelerate.utils import set_seed

        set_seed(args.seed)
        self.accelerator = self._build_accelerator(args)
        from posttrain._plugins import get_plugin_manager

        self.plugin_manager = get_plugin_manager()
        from posttrain.diagnostics import Diagnostics

        #: structured training diagnostics (diagnostics.jsonl), fed by the on_log hook like any plugin
        self.diagnostics = Diagnostics(args.output_dir, is_main_process=self.accelerator.is_main_process)
        self.plugin_manager.register(self.diagnostics, name="posttrain.diagnostics")
        self.state = TrainingState()
        self.model = None  # the prepared (possibly wrapped) model, set in setup()
        self.optimizer = None
        self.scheduler = None
        self.processing_class = None
        self.manifest: dict = {}

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _build_accelerator(args: TrainingConfig):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        cuda = torch.cuda.is_available()
        if args.fp16 and not cuda:
            raise ConfigError("fp16=True needs a CUDA GPU; on CPU train in float32 (default) or set bf16=True.")
        bf16 = args.bf16
        if bf16 is None:
            bf16 = cuda and torch.cuda.is_bf16_supported()
        elif bf16 and cuda and not torch.cuda.is_bf16_supported():
            raise ConfigError("bf16=True but this GPU does not support bfloat16; set fp16=True or bf16=False.")
        args.bf16 = bf16
        mixed = "bf16" if bf16 else ("fp16" if args.fp16 else "no")
        ds_plugin = None
        if args.deepspeed:
            ds_config = args.deepspeed
            if isinstance(ds_config, str):
                with open(ds_config) as fh:
                    ds_config = json.load(fh)
            ds_config = _fill_deepspeed_config(dict(ds_config), args)
            ds_plugin = DeepSpeedPlugin(hf_ds_config=ds_config)
        from accelerate.state import AcceleratorState

        if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
            # a trainer built earlier in this process fixed another precision; accelerate refuses to
            # change it in place, so reset that part of its (process-wide) state.
            AcceleratorState._reset_state(reset_partial_state=False)
        log_with = args.report_to if args.report_to else None
        if log_with == ["all"]:
            log_with = "all"
        # Without an accelerator device, say so: accelerate then runs torchrun/`accelerate launch`
        # processes as a gloo process group instead of silently training each process alone.
        mps = getattr(torch.backends, "mps", None)
        cpu_only = not cuda and not (mps is not None and mps.is_available())
        accelerator = Accelerator(
            cpu=cpu_only,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=mixed,
            log_with=log_with,
            project_dir=args.output_dir,
            deepspeed_plugin=ds_plugin,
        )
        _install_fast_unwrap(accelerator)
        return accelerator

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def is_deepspeed(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def load_model(self, model, *, processing_class=None, peft_config=None, auto_class=None):
        """Return ``(model, processing_class)``: load by name if needed, apply PEFT and gradient checkpointing.

        Args:
            model: A model object, or a Hub id / local directory (then ``args.model_init_kwargs``
                are passed to ``from_pretrained``; ``None`` falls back to ``args.model_name_or_path``).
            processing_class: Tokenizer; loaded from the model's path when None.
            peft_config: A ``peft.PeftConfig``; when None and ``args.use_peft``, a LoRA config is
                built from the ``lora_*`` fields.
            auto_class: The transformers auto class (default ``AutoModelForCausalLM``).
        """
        import transformers

        args = self.args
        auto_class = auto_class or transformers.AutoModelForCausalLM
        model = model if model is not None else args.model_name_or_path
        if model is None:
            raise ConfigError("no model given: pass model=... to the trainer or set model_name_or_path.")
        if isinstance(model, str):
            name = model
            kwargs = dict(args.model_init_kwargs or {})
            dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
            if isinstance(dtype, str) and dtype != "auto":
                dtype = getattr(torch, dtype)
            model = auto_class.from_pretrained(name, dtype=dtype or torch.float32, **kwargs)
            if processing_class is None:
                processing_class = transformers.AutoTokenizer.from_pretrained(name)
        elif processing_class is None:
            name = getattr(model.config, "_name_or_path", None)
            if not name:
                raise ConfigError("the model object has no _name_or_path: pass processing_class=tokenizer to the trainer.")
            processing_class = transformers.AutoTokenizer.from_pretrained(name)
        if getattr(processing_class, "pad_token", None) is None and hasattr(processing_class, "eos_token"):
            processing_class.pad_token = processing_class.eos_token
        if peft_config is None and args.use_peft:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules or "all-linear",
                task_type="SEQ_CLS" if auto_class is transformers.AutoModelForSequenceClassification else "CAUSAL_LM",
            )
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if peft_config is not None:
                model.enable_input_require_grads()
            model.config.use_cache = False
        self.processing_class = processing_class
        return model, processing_class

    def prepare_frozen(self, model):
        """Return a frozen copy-free model (reference, reward, teacher) on the right device, in eval mode."""
        model.eval()
        model.requires_grad_(False)
        if self.is_deepspeed:
            return model.to(self.device)
        return model.to(self.device)

    # ------------------------------------------------------------------ data order
    def _epoch_indices(self, n: int, epoch: int) -> list[int]:
        """Return this process's example indices for ``epoch``: a seeded permutation, strided across processes."""
        generator = torch.Generator().manual_seed(self.args.seed + epoch)
        perm = torch.randperm(n, generator=generator).tolist()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        if world > 1:
            total = math.ceil(n / world) * world
            perm = perm + perm[: total - n]  # pad so every process gets the same number of examples
            perm = perm[rank::world]
        return perm

    def _micro_batches(self, indices: list[int], batch_size: int) -> list[list[int]]:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if self.args.dataloader_drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        return batches

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ optimizer
    def _build_optimizer(self, model):
        args = self.args
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(param)
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if not decay and not no_decay:
            raise ConfigError("the model has no trainable parameters: check peft_config / requires_grad.")
        # The fused kernel updates every parameter in one call (what transformers' Trainer uses by
        # default). torch's default for CPU tensors is a Python loop of ~10 small ops per parameter,
        # which dominates the step of small models (bench: 0.3 ms fused vs 1.8 ms looped for a 50-tensor
        # 0.2M-param model on 2 idle cores; 100x worse when the cores are shared). DeepSpeed brings its own.
        params = [p for g in groups for p in g["params"]]
        fused = not self.is_deepspeed and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=fused or None)

    def _build_scheduler(self, optimizer, max_steps: int):
        from transformers import get_scheduler

        warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * max_steps)
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)

    # ------------------------------------------------------------------ model I/O
    def _model_is_plain(self) -> bool:
        """True when the model has no DDP/FSDP/DeepSpeed/compile wrapper to remove (see :func:`_install_fast_unwrap`)."""
        return _nothing_to_unwrap(self.accelerator, self.model)

    def unwrapped_model(self):
        return self.model if self._model_is_plain() else self.accelerator.unwrap_model(self.model)

    def save_model(self, directory: str) -> None:
        """Save the model (``save_pretrained``, safetensors) and tokenizer to ``directory`` (all processes call)."""
        state_dict = None if self._model_is_plain() else self.accelerator.get_state_dict(self.model)
        if self.is_main_process:
            self.unwrapped_model().save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(directory)

    def load_model_weights(self, directory: str) -> None:
        """Load weights saved by :meth:`save_model` into the (unwrapped) model, strictly but for tied weights."""
        from safetensors.torch import load_file

        model = self.unwrapped_model()
        adapter = os.path.join(directory, "adapter_model.safetensors")
        if os.path.isfile(adapter):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(adapter))
            return
        files = sorted(f for f in os.listdir(directory) if f.startswith("model") and f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"no model*.safetensors in checkpoint {directory!r}")
        state_dict: dict = {}
        for fname in files:
            state_dict.update(load_file(os.path.join(directory, fname)))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(getattr(model, "_tied_weights_keys", None) or [])
        missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {directory!r} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")
        if hasattr(model, "tie_weights"):
            model.tie_weights()

    # ------------------------------------------------------------------ manifest & logging
    def _build_manifest(self) -> dict:
        import accelerate
        import transformers

        try:
            import peft

            peft_version = peft.__version__
        except ImportError:  # pragma: no cover
            peft_version = None
        info = self.activation.info
        return {
            "method": self.method_name,
            "distribution": info.distribution,
            "version": info.version,
            "maturity": info.maturity,
            "plugin_api": info.plugin_api,
            "core_api": API_VERSION,
            "experimental_allowed_via": self.activation.allowed_via,
            "config": {k: _json_safe(v) for k, v in self.args.to_dict().items()},
            "versions": {
                "posttrain": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
                "peft": peft_version,
                "python": platform.python_version(),
            },
            "world_size": self.accelerator.num_processes,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self.is_main_process:
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.args.report_to:
            self.accelerator.log(metrics, step=step)
        self.plugin_manager.hook.on_log(step=step, metrics=dict(metrics), output_dir=self.args.output_dir)

    def _truncate_metrics_log(self, step: int) -> None:
        """After a resume, drop logged lines beyond ``step`` (they belong to the interrupted run)."""
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        if not self.is_main_process or not os.path.isfile(path):
            return
        with open(path) as fh:
            lines = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as fh:
            fh.writelines(lines)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, method) -> dict[str, float]:
        """Score ``method.eval_dataset`` and return metrics prefixed with ``eval_`` (all processes call)."""
        dataset = getattr(method, "eval_dataset", None)
        if dataset is None or len(dataset) == 0:
            return {}
        model = self.model
        was_training = model.training
        model.eval()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = list(range(len(dataset)))[rank::world]
        batches = [indices[i : i + self.args.per_device_eval_batch_size] for i in range(0, len(indices), self.args.per_device_eval_batch_size)]
        if hasattr(method, "evaluate"):
            result = method.evaluate(model, (self._to_device(method.collate([dataset[i] for i in b])) for b in batches))
        else:
            totals: dict[str, torch.Tensor] = {}
            weight = torch.zeros((), device=self.device)
            for b in batches:
                batch = self._to_device(method.collate([dataset[i] for i in b]))
                n = method.count_items(batch)
                loss, metrics = method.compute_loss(model, batch, n)
                for key, value in {"loss": loss, **metrics}.items():
                    totals[key] = totals.get(key, 0) + value.detach().float() * n
                weight = weight + n
            keys = sorted(totals)
            stacked = torch.stack([torch.as_tensor(totals[k], device=self.device) for k in keys] + [weight])
            stacked = self.accelerator.reduce(stacked, reduction="sum") if world > 1 else stacked
            result = {k: (stacked[i] / stacked[-1].clamp(min=1)).item() for i, k in enumerate(keys)}
        if was_training:
            model.train()
        return {f"eval_{k}": float(v) for k, v in result.items()}

    # ------------------------------------------------------------------ the loop
    def setup(self, model) -> None:
        """Remember the model; optimizer and scheduler are built in :meth:`train` (they need the step count)."""
        self.model = model

    def _set_sync(self, sync: bool) -> None:
        # accelerate decides when DeepSpeed/optimizer wrappers really step from this flag; we set it
        # per micro-batch ourselves so an epoch's last, shorter accumulation window still steps.
        self.accelerator.gradient_state._set_sync_gradients(sync)

    def train(self, method, *, batch_size: int | None = None, micro_batches_per_step: int | None = None) -> TrainOutput:
        """Train ``method`` (see the module docstring for what it must provide) and return a summary.

        Args:
            method: The method object (see the module docstring).
            batch_size: Dataset rows per raw micro-batch (default ``per_device_train_batch_size``).
            micro_batches_per_step: Raw micro-batches drawn from the dataset per optimizer step
                (default ``gradient_accumulation_steps``). An online method that turns one batch of
                prompts into ``gradient_accumulation_steps`` loss micro-batches in ``prepare_step``
                passes 1 (accumulation and loss scaling are unchanged).
        """
        args, accelerator = self.args, self.accelerator
        batch_size = batch_size or args.per_device_train_batch_size
        dataset = method.train_dataset
        if dataset is None or len(dataset) == 0:
            raise ConfigError("train_dataset is empty: give the trainer at least one example.")
        os.makedirs(args.output_dir, exist_ok=True)

        gas = micro_batches_per_step or args.gradient_accumulation_steps
        batches_per_epoch = len(self._micro_batches(self._epoch_indices(len(dataset), 0), batch_size))
        steps_per_epoch = max(1, math.ceil(batches_per_epoch / gas))
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        self.state.max_steps = max_steps

        # model before optimizer (the optimizer needs the final parameters), optimizer before prepare.
        optimizer = self._build_optimizer(self.model)
        self.scheduler = self._build_scheduler(optimizer, max_steps)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.model.train()
        self.manifest = self._build_manifest()

        resume = args.resume_from_checkpoint
        if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
            resume = find_latest_checkpoint(args.output_dir)
            if resume is None:
                raise FileNotFoundError(f"resume_from_checkpoint=true but {args.output_dir!r} holds no complete checkpoint.")
        if resume:
            saved = load_checkpoint(self, method, resume)
            self.state = TrainingState(**saved)
            if self.state.max_steps != max_steps:
                accelerator.print(f"[posttrain] checkpoint planned {self.state.max_steps} steps, config gives {max_steps}: the config wins.")
                self.state.max_steps = max_steps
            self._truncate_metrics_log(self.state.global_step)
            accelerator.print(f"[posttrain] resumed from {resume} at step {self.state.global_step}")
        if self.is_main_process:
            with open(os.path.join(args.output_dir, "run_manifest.json"), "w") as fh:
                json.dump(self.manifest, fh, indent=2, default=str)
        if args.report_to:
            flat = {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(args.run_name or os.path.basename(os.path.abspath(args.output_dir)), config=flat)

        progress = None
        if self.is_main_process and not args.disable_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=max_steps, initial=self.state.global_step, desc=f"posttrain {self.method_name}", dynamic_ncols=True)

        window_losses: list[torch.Tensor] = []
        window_metrics: dict[str, list[torch.Tensor]] = {}
        all_losses_sum, all_losses_n = 0.0, 0
        last_log_time = time.perf_counter()
        tokens_at_last_log = self.state.num_input_tokens_seen
        world = accelerator.num_processes
        final_metrics: dict[str, float] = {}

        while self.state.global_step < max_steps:
            indices = self._epoch_indices(len(dataset), self.state.epoch)
            batches = self._micro_batches(indices, batch_size)
            start = self.state.batches_in_epoch
            if start >= len(batches):
                self._end_epoch(method)
                continue
            while start < len(batches) and self.state.global_step < max_steps:
                window = batches[start : start + gas]
                micro = [method.collate([dataset[i] for i in idx]) for idx in window]
                if hasattr(method, "prepare_step"):
                    micro = method.prepare_step(micro, self.state)
                # compute_loss is already normalized over the whole step; undo accelerate's 1/GA and
                # DDP's 1/world. accelerate's GradientState is process-wide (another trainer built later
                # in this process overwrites it), so read the divisor it will apply, not our config.
                # DeepSpeed's engine divides by its own configured GA instead.
                loss_scale = world * (args.gradient_accumulation_steps if self.is_deepspeed else accelerator.gradient_accumulation_steps)
                counts = torch.tensor(float(sum(method.count_items(b) for b in micro)), device=self.device)
                num_items = accelerator.reduce(counts, reduction="sum") if world > 1 else counts
                step_loss = torch.zeros((), device=self.device)
                for i, batch in enumerate(micro):
                    last = i == len(micro) - 1
                    self._set_sync(last)
                    batch = self._to_device(batch)
                    ctx = contextlib.nullcontext() if last else accelerator.no_sync(self.model)
                    with ctx:
                        loss, metrics = method.compute_loss(self.model, batch, num_items)
                        accelerator.backward(loss * loss_scale)
                    step_loss = step_loss + loss.detach()
                    for key, value in metrics.items():
                        window_metrics.setdefault(key, []).append(value.detach().float())
                    if "num_tokens" in batch:
                        self.state.num_input_tokens_seen += int(batch["num_tokens"])
                step = self.state.global_step + 1
                log_now = step % args.logging_steps == 0 or step == max_steps or (step == 1 and args.logging_first_step)
                grad_norm = None
                if args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                elif log_now:  # no clipping, but the logged grad_norm is still wanted
                    grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))
                learning_rate = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                self.state.batches_in_epoch = start = start + len(window)
                window_losses.append(step_loss)
                if hasattr(method, "on_step_end"):
                    method.on_step_end(self.model, self.state)
                if progress is not None:
                    progress.update(1)

                if log_now:
                    # one host sync per logging step, never per micro-batch
                    keys = sorted(window_metrics)
                    local = torch.stack([torch.stack(window_losses).mean()] + [torch.stack(window_metrics[k]).mean() for k in keys])
                    if world > 1:
                        local[:1] = accelerator.reduce(local[:1].clone(), reduction="sum")  # each process holds its share of the global mean
                        local[1:] = accelerator.reduce(local[1:].clone(), reduction="mean")
                    values = local.tolist()
                    now = time.perf_counter()
                    logged = {
                        "loss": values[0],
                        "learning_rate": learning_rate,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "epoch": self.state.epoch + self.state.batches_in_epoch / max(1, len(batches)),
                        **{k: v for k, v in zip(keys, values[1:])},
                        "steps_per_second": len(window_losses) / max(now - last_log_time, 1e-9),
                    }
                    if self.state.num_input_tokens_seen > tokens_at_last_log:
                        logged["tokens_per_second"] = (self.state.num_input_tokens_seen - tokens_at_last_log) / max(now - last_log_time, 1e-9)
                    all_losses_sum += values[0] * len(window_losses)
                    all_losses_n += len(window_losses)
                    last_log_time, tokens_at_last_log = now, self.state.num_input_tokens_seen
                    window_losses, window_metrics = [], {}
                    self._log(logged, step)
                    final_metrics.update(logged)
                    if progress is not None:
                        progress.set_postfix(loss=f"{values[0]:.4f}")

                if args.eval_strategy == "steps" and step % args.eval_steps == 0 and step != max_steps:
                    eval_metrics = self.evaluate(method)
                    if eval_metrics:
                        self._log(eval_metrics, step)
                if args.save_strategy == "steps" and step % args.save_steps == 0:
                    save_checkpoint(self, method, step)
            if start >= len(batches):
                if args.eval_strategy == "epoch":
                    self._log(self.evaluate(method), self.state.global_step)
                if args.save_strategy == "epoch" and self.state.global_step < max_steps:
                    save_checkpoint(self, method, self.state.global_step)
                self._end_epoch(method)

        if progress is not None:
            progress.close()
        eval_metrics = self.evaluate(method)
        if eval_metrics:
            self._log(eval_metrics, self.state.global_step)
            final_metrics.update(eval_metrics)
        if args.save_strategy != "no" and not os.path.isdir(os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}")):
            save_checkpoint(self, method, self.state.global_step)
        self.save_model(args.output_dir)
        accelerator.wait_for_everyone()
        if args.push_to_hub and self.is_main_process:
            self._push_to_hub()
        if args.report_to:
            accelerator.end_training()
        training_loss = all_losses_sum / all_losses_n if all_losses_n else float("nan")
        return TrainOutput(global_step=self.state.global_step, training_loss=training_loss, metrics=final_metrics)

    def _end_epoch(self, method) -> None:
        self.state.epoch += 1
        self.state.batches_in_epoch = 0

    def _push_to_hub(self) -> None:
        from huggingface_hub import HfApi

        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=self.args.output_dir, repo_id=repo_id, ignore_patterns=["checkpoint-*", "tmp-*"])


def _nothing_to_unwrap(accelerator, model) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.NO and not hasattr(model, "_orig_mod")


def _install_fast_unwrap(accelerator) -> None:
    """Make ``accelerator.unwrap_model`` return at once when nothing wraps the model.

    accelerate's version reads package metadata (``is_deepspeed_available()``: ~0.5 ms a call) and
    imports deepspeed (0.3 s, 23 MB) just to rule its engine out. Methods and the rollout engine
    unwrap the model every step, so in a single process (no DDP/FSDP/DeepSpeed, not compiled) this
    returns the model itself, which is exactly what accelerate returns there. Everything else, and
    ``keep_fp32_wrapper=False`` (which strips the autocast forward), still goes to accelerate.
    """
    slow = accelerator.unwrap_model

    def unwrap_model(model, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        if keep_fp32_wrapper and _nothing_to_unwrap(accelerator, model):
            return model
        return slow(model, keep_fp32_wrapper=keep_fp32_wrapper, keep_torch_compile=keep_torch_compile)

    unwrap_model.__doc__ = slow.__doc__
    accelerator.unwrap_model = unwrap_model


def _fill_deepspeed_config(config: dict, args: TrainingConfig) -> dict:
    """Replace DeepSpeed ``"auto"`` values with the loop's settings (we do not hand it a dataloader)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist.is_initialized() else 1))
    resolved = {
        "train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
        "train_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
    }
    for key, value in resolved.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    config.setdefault("zero_allow_untested_optimizer", True)
    for key, on in (("bf16", bool(args.bf16)), ("fp16", bool(args.fp16))):
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    return config
