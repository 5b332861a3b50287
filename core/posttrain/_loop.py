"""The training-loop shell every method runs on (built on accelerate).

A method plugin owns its data processing and loss; the loop owns everything else: devices, mixed
precision, DDP/FSDP/DeepSpeed, optimizer and schedule, gradient accumulation, clipping, logging,
evaluation, checkpoints, resume and transformers callbacks. What a method object must give the
loop is the public :class:`posttrain.MethodProtocol` (see ``posttrain/_protocol.py``), checked once
when the loop is set up.

``TrainingLoop.train`` reads like a recipe: ``_begin_run`` (optimizer, schedule, prepare, resume,
manifest, trackers), then for every optimizer step ``_draw_step`` (the step's micro-batches),
``_optimizer_step`` (forward/backward per micro-batch, clip, step) and ``_after_step`` (the log,
evaluate and save decisions, with callbacks), then ``_end_run`` (final eval, save, summary row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import TrainerControl, TrainerState

from posttrain import API_VERSION, __version__
from posttrain._checkpoint import describe_run, existing_run, find_latest_checkpoint, load_checkpoint, producer_state_file, read_manifest, remove_run, save_checkpoint
from posttrain._errors import CheckpointError, CheckpointNotFoundError
from posttrain._producer import PromptSource, RolloutProducer, epoch_order
from posttrain._protocol import check_method
from posttrain._registry import ensure_activated
from posttrain.config import ConfigError, TrainingConfig

__all__ = ["TrainingLoop", "TrainingState", "TrainOutput", "CallbackList"]


@dataclass
class TrainingState(TrainerState):
    """The loop's state: transformers' ``TrainerState`` (what callbacks and TRL code read) plus the data position.

    ``trainer.state.log_history`` holds every logged dict (the rows of ``metrics.jsonl`` with
    ``epoch`` and ``step``), eval rows (``eval_loss``, ...) and, last, the run summary
    (``train_runtime``, ``train_loss``, ...), as in transformers. Saved as ``trainer_state.json``.
    """

    epoch_index: int = 0  #: index of the current epoch (``epoch`` is the fractional progress)
    batches_in_epoch: int = 0  #: micro-batches of the current epoch already consumed

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "stateful_callbacks"}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainingState":
        """Build from a saved trainer_state.json (also reads 1.0 checkpoints, whose ``epoch`` was the index)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in names}
        if "epoch_index" not in saved and isinstance(saved.get("epoch"), int):
            values["epoch_index"] = saved["epoch"]
        return cls(**values)


class TrainOutput(NamedTuple):
    """What ``train()`` returns (transformers' ``TrainOutput``: unpacks as ``global_step, training_loss, metrics``)."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


class CallbackList:
    """transformers ``TrainerCallback`` objects called at the loop's events, with one shared ``TrainerControl``.

    A callback may be a class (instantiated here) or an instance; a returned ``TrainerControl``
    replaces the shared one, as in transformers' ``CallbackHandler``.
    """

    def __init__(self, callbacks=None) -> None:
        self.callbacks: list = []
        for callback in callbacks or []:
            self.add(callback)

    def add(self, callback) -> None:
        self.callbacks.append(callback() if isinstance(callback, type) else callback)

    def pop(self, callback):
        """Remove and return the first callback that is ``callback`` or an instance of it (None when absent)."""
        for existing in self.callbacks:
            if existing is callback or (isinstance(callback, type) and isinstance(existing, callback)):
                self.callbacks.remove(existing)
                return existing
        return None

    def remove(self, callback) -> None:
        self.pop(callback)

    def call(self, event: str, args, state, control, **kwargs):
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is None:
                continue
            result = handler(args, state, control, **kwargs)
            if result is not None:
                control = result
        return control


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

    def __init__(self, args: TrainingConfig, *, method: str, allow_experimental: bool = False, callbacks=None, compute_metrics=None,
                 optimizers=(None, None), optimizer_cls_and_kwargs=None) -> None:
        self.activation = ensure_activated(method, allow_experimental=allow_experimental or args.allow_experimental)
        self.args = args
        self.method_name = method
        from accelerate.utils import set_seed

        if args.full_determinism:
            from transformers import enable_full_determinism

            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        self.accelerator = self._build_accelerator(args)
        from posttrain._plugins import get_plugin_manager

        self.plugin_manager = get_plugin_manager()
        from posttrain.diagnostics import Diagnostics

        #: structured training diagnostics (diagnostics.jsonl), fed every logged row like an on_log hook; it belongs
        #: to this loop, so it is called directly rather than registered on the process-wide plugin manager
        spec = getattr(self.activation.info, "spec", None)
        self.diagnostics = Diagnostics(args.output_dir, is_main_process=self.accelerator.is_main_process, signals=getattr(spec, "signals", None),
                                       window=args.diagnostics_window, thresholds=args.diagnostics_thresholds, actions=getattr(spec, "actions", None),
                                       method=getattr(spec, "name", None))
        self.state = TrainingState()
        self.control = TrainerControl()
        #: transformers ``TrainerCallback`` objects (``callbacks=`` of the trainer, ``add_callback``)
        self.callbacks = CallbackList(callbacks)
        #: ``compute_metrics(EvalPrediction) -> dict`` (transformers' convention), run on every evaluation;
        #: the method must define ``eval_predictions(model, batch)``
        self.compute_metrics = compute_metrics
        optimizer, scheduler = optimizers if optimizers is not None else (None, None)
        if optimizer is not None and optimizer_cls_and_kwargs is not None:
            raise ConfigError("pass either optimizers=(optimizer, scheduler) or optimizer_cls_and_kwargs, not both.")
        #: user-built optimizer / scheduler (TRL's ``optimizers=``) and optimizer class + kwargs (``optimizer_cls_and_kwargs=``)
        self._given_optimizer, self._given_scheduler, self._optimizer_cls_and_kwargs = optimizer, scheduler, optimizer_cls_and_kwargs
        self._checked = False  # the method passed check_method
        self.run_id: str | None = None  # set by train(): one run per output_dir (see _claim_output_dir)
        self._wrote_output_dir = False  # this loop logged into output_dir (e.g. evaluate() before train())
        self._trackers_started = False
        self.model = None  # the prepared (possibly wrapped) model, set in setup()
        #: trainable auxiliary models (a PPO critic, ...): name -> _Auxiliary (its own optimizer and schedule)
        self._auxiliaries: dict[str, _Auxiliary] = {}
        self.optimizer = None
        self.scheduler = None
        self.processing_class = None
        self.manifest: dict = {}

    # ------------------------------------------------------------------ setup helpers
    @staticmethod
    def _build_accelerator(args: TrainingConfig):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        cuda = torch.cuda.is_available() and not args.use_cpu
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
        cpu_only = args.use_cpu or (not cuda and not (mps is not None and mps.is_available()))
        if args.tf32 is not None and cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(args.tf32)
        # accelerate (1.15) selects DeepSpeed only when cpu=False and FSDP only for GPU-type runs, so on a
        # CPU-only machine both would silently run as plain DDP. DeepSpeed: cpu=False with a gloo group;
        # FSDP (configured by `accelerate launch --use_fsdp`): switch the distributed type after construction.
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
        wants_deepspeed = ds_plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        handlers = _kwargs_handlers(args)
        cpu_flag = cpu_only
        if cpu_only and multi and wants_deepspeed:
            cpu_flag = False
            handlers = [dataclasses.replace(h, backend="gloo") if type(h).__name__ == "InitProcessGroupKwargs" else h for h in handlers]
        accelerator = Accelerator(
            kwargs_handlers=handlers,
            cpu=cpu_flag,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=mixed,
            log_with=log_with,
            project_dir=args.output_dir,
            deepspeed_plugin=ds_plugin,
        )
        if cpu_only and multi and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            _engage_fsdp_on_cpu(accelerator)
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

    def load_model(self, model, *, processing_class=None, peft_config=None, auto_class=None, before_peft=None, quantization_config=None):
        """Return ``(model, processing_class)``: load by name if needed, apply PEFT and gradient checkpointing.

        Loading follows :func:`posttrain.load_pretrained` (``role="policy"``): its dtype, revision,
        ``trust_remote_code`` (``args.trust_remote_code``) and pad-token rules.

        Args:
            model: A model object, or a Hub id / local directory (then ``args.model_init_kwargs``
                are passed to ``from_pretrained``; ``None`` falls back to ``args.model_name_or_path``).
            processing_class: Tokenizer; loaded from the model's path when None (at the
                ``revision`` of ``args.model_init_kwargs``, if it names one).
            peft_config: A ``peft.PeftConfig``; when None and ``args.use_peft``, a LoRA config is
                built from the ``lora_*`` fields.
            auto_class: The transformers auto class (default ``AutoModelForCausalLM``).
            before_peft: ``(model, tokenizer) -> (model, tokenizer)`` run before PEFT wraps the model
                (e.g. to add tokens of a new chat template and resize the embeddings).
            quantization_config: A transformers quantization config (TRL trainers' argument of that
                name) passed to ``from_pretrained`` for a model given by name (plugin API 1.3).

        Raises:
            ConfigError: no model; ``quantization_config`` with a model object, or also in
                ``args.model_init_kwargs``; a bad dtype; a model or tokenizer that cannot be loaded;
                a tokenizer without pad and eos tokens.
        """
        import transformers

        from posttrain._models import load_pretrained

        args = self.args
        auto_class = auto_class or transformers.AutoModelForCausalLM
        model = model if model is not None else args.model_name_or_path
        if model is None:
            raise ConfigError("no model given: pass model=... to the trainer or set model_name_or_path.")
        model, processing_class = load_pretrained(
            model, role="policy", auto_class=auto_class, model_init_kwargs=args.model_init_kwargs, trust_remote_code=args.trust_remote_code,
            quantization_config=quantization_config, tokenizer=processing_class,
        )
        if before_peft is not None:  # e.g. a chat template that adds tokens: resize embeddings before adapters wrap the model
            model, processing_class = before_peft(model, processing_class)
        if peft_config is None and args.use_peft:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules or "all-linear",
                task_type="SEQ_CLS" if auto_class is transformers.AutoModelForSequenceClassification
                else "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM",
            )
        if peft_config is not None:
            from peft import PeftConfig, get_peft_model

            if not isinstance(peft_config, PeftConfig):  # TRL raises TypeError too
                raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig(r=16, target_modules='all-linear')), "
                                f"got {type(peft_config).__name__}.")
            model = get_peft_model(model, peft_config)
        if args.gradient_checkpointing:
            kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it (the old name warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if peft_config is not None:
                model.enable_input_require_grads()
            model.config.use_cache = False
        if hasattr(model, "add_model_tags"):  # shown on the Hub model card; "trl" because TRL users filter by it
            model.add_model_tags(["posttrain", self.method_name, "trl"])
        if args.use_liger_kernel:
            _apply_liger_kernel(model, args)
        if args.neftune_noise_alpha:
            _attach_neftune(model, args.neftune_noise_alpha)
        self.processing_class = processing_class
        return model, processing_class

    def prepare_frozen(self, model):
        """Return ``model`` frozen (eval mode, no gradients) and placed by the distributed backend.

        A frozen model (reference, reward model, teacher, judge) is sharded the way the policy is, so a
        large teacher is not copied whole onto every process:

        * DeepSpeed ZeRO-3: wrapped in its own inference engine (``deepspeed.initialize`` without an
          optimizer, the run's ZeRO-3 settings): each process keeps 1/world of every partitioned
          parameter and gathers a layer's parameters only inside its forward;
        * FSDP2: ``fully_shard`` on each decoder layer and the root (the run's ``reshard_after_forward``);
        * otherwise (one process, DDP, ZeRO-1/2, which replicate parameters too): moved to the device.

        Under a sharding backend, call the returned object (its forward gathers what it needs); reading
        its parameters directly gives the local shards only.
        """
        model.eval()
        model.requires_grad_(False)
        stage = self._zero_stage()
        if stage == 3:
            return _shard_frozen_with_deepspeed(model, self.accelerator)
        if self._is_fsdp2():
            return _shard_frozen_with_fsdp2(model, self.accelerator)
        return model.to(self.device)

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage of this run (0-3), or None without DeepSpeed."""
        return self._zero_stage()

    def _zero_stage(self) -> int | None:
        if not self.is_deepspeed:
            return None
        plugin = self.accelerator.state.deepspeed_plugin
        return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))

    def _is_fsdp2(self) -> bool:
        from accelerate.utils import DistributedType

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        return self.accelerator.distributed_type == DistributedType.FSDP and plugin is not None and getattr(plugin, "fsdp_version", 1) == 2

    # ------------------------------------------------------------------ data order
    @property
    def data_seed(self) -> int:
        """The seed of the data order (``args.data_seed``, else ``args.seed``)."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _epoch_indices(self, n: int, epoch: int) -> list[int]:
        """Return this process's example indices for ``epoch``: a seeded permutation, strided across processes."""
        return epoch_order(n, epoch, seed=self.data_seed, rank=self.accelerator.process_index, world=self.accelerator.num_processes)

    def prompt_source(self, num_rows: int, prompts_per_step: int) -> PromptSource:
        """A :class:`posttrain.PromptSource` for this process: the loop's data order (seed, rank, world, ``dataloader_drop_last``).

        Args:
            num_rows: Prompt rows in the training dataset.
            prompts_per_step: Prompts per production on this process.
        """
        return PromptSource(num_rows, prompts_per_step, seed=self.data_seed, rank=self.accelerator.process_index,
                            world=self.accelerator.num_processes, drop_last=bool(self.args.dataloader_drop_last))

    def _micro_batches(self, indices: list[int], batch_size: int) -> list[list[int]]:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if self.args.dataloader_drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        return batches

    def to_device(self, batch: dict) -> dict:
        """Return ``batch`` with its tensors moved to the training device (other values unchanged)."""
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    # ------------------------------------------------------------------ optimizer
    def _build_optimizer(self, model):
        args = self.args
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shape = getattr(param, "ds_shape", param.shape)  # under ZeRO-3 zero.Init a parameter is a 1-D placeholder
            (no_decay if len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(param)
        # an empty group would be dropped by ZeRO-3 while the schedule was built on two groups
        groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if not decay and not no_decay:
            raise ConfigError("the model has no trainable parameters: check peft_config / requires_grad.")
        # The fused kernel updates every parameter in one call (what transformers' Trainer uses by
        # default). torch's default for CPU tensors is a Python loop of ~10 small ops per parameter,
        # which dominates the step of small models (bench: 0.3 ms fused vs 1.8 ms looped for a 50-tensor
        # 0.2M-param model on 2 idle cores; 100x worse when the cores are shared). DeepSpeed brings its own.
        params = [p for g in groups for p in g["params"]]
        if self._optimizer_cls_and_kwargs is not None:
            cls, kwargs = self._optimizer_cls_and_kwargs
            return cls(groups, **{"lr": args.learning_rate, **kwargs})
        extra = _parse_optim_args(args.optim_args)
        if args.optim == "sgd":
            return torch.optim.SGD(groups, lr=args.learning_rate, **extra)
        if args.optim == "adagrad":
            return torch.optim.Adagrad(groups, lr=args.learning_rate, **extra)
        fused = args.optim == "adamw_torch_fused" and not self.is_deepspeed
        fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=fused or None, **extra)

    def _build_scheduler(self, optimizer, max_steps: int):
        from transformers import get_scheduler

        warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * max_steps)
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                             scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or None)

    # ------------------------------------------------------------------ model I/O
    def _model_is_plain(self) -> bool:
        """True when the model has no DDP/FSDP/DeepSpeed/compile wrapper to remove (see :func:`_install_fast_unwrap`)."""
        return _nothing_to_unwrap(self.accelerator, self.model)

    def unwrapped_model(self):
        return self.model if self._model_is_plain() else self.accelerator.unwrap_model(self.model)

    def save_model(self, directory: str) -> None:
        """Save the model (``save_pretrained``, safetensors) and tokenizer to ``directory`` (all processes call).

        The FULL weights are written, also when FSDP or DeepSpeed ZeRO-3 shard the parameters: every
        process takes part in gathering them and the main process writes them, so
        ``from_pretrained(directory)`` loads the model (a PEFT model: its adapter).
        """
        state_dict = None
        if not self._model_is_plain():
            if self.is_deepspeed and self.model.zero_optimization_partition_weights():
                # ZeRO-3: accelerate's get_state_dict refuses unless the DeepSpeed config sets
                # stage3_gather_16bit_weights_on_model_save; the engine's consolidation (what
                # accelerate would call) works regardless and keeps the training dtype.
                state_dict = self.model._zero3_consolidated_16bit_state_dict()
            else:
                # FSDP2: get_model_state_dict(full_state_dict, cpu_offload) -> full tensors on rank 0
                # ({} elsewhere); handing save_pretrained the sharded DTensors instead makes rank 0
                # wait in a collective the other ranks never join.
                state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_main_process:
            if state_dict:  # a gathered state dict holds tied weights twice; save_pretrained of the plain model writes them once
                tied = getattr(self.unwrapped_model(), "all_tied_weights_keys", None) or {}
                state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
            self.unwrapped_model().save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(directory)
        for aux in self._auxiliaries.values():  # trainable auxiliaries beside it, each in <directory>/<name>/
            self._save_auxiliary(aux, os.path.join(directory, aux.name))

    def _save_auxiliary(self, aux: "_Auxiliary", directory: str) -> None:
        """Write an auxiliary's full weights to ``directory`` (``save_pretrained`` when it has it, else ``model.safetensors``)."""
        from safetensors.torch import save_file

        model = aux.model
        state_dict = None
        if self.is_deepspeed and getattr(model, "zero_optimization_partition_weights", lambda: False)():
            state_dict = model._zero3_consolidated_16bit_state_dict()
        elif self._is_fsdp2():
            state_dict = self.accelerator.get_state_dict(model)
        if not self.is_main_process:
            return
        plain = self.accelerator.unwrap_model(model)
        os.makedirs(directory, exist_ok=True)
        if hasattr(plain, "save_pretrained"):
            plain.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        else:
            tensors = state_dict if state_dict is not None else plain.state_dict()
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))

    def _load_auxiliary_weights(self, aux: "_Auxiliary", directory: str) -> None:
        """Load what :meth:`_save_auxiliary` wrote into the (unwrapped, unsharded) auxiliary, strictly."""
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(directory) if f.startswith("model") and f.endswith(".safetensors")) if os.path.isdir(directory) else []
        if not files:
            raise CheckpointNotFoundError(f"{directory!r} holds no weights of the trainable model {aux.name!r}: was the checkpoint saved with it?")
        state_dict = {}
        for fname in files:
            state_dict.update(load_file(os.path.join(directory, fname)))
        model = self.accelerator.unwrap_model(aux.model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise CheckpointError(f"{directory!r} does not match the trainable model {aux.name!r}: missing={missing[:5]} unexpected={unexpected[:5]}")

    def load_model_weights(self, directory: str) -> None:
        """Load weights saved by :meth:`save_model` into the (unwrapped) model, strictly but for tied weights.

        All processes call. Sharded parameters are handled: under FSDP2 every process loads the
        full state dict into its own shards; under DeepSpeed ZeRO-3 the main process loads it into
        the gathered parameters, which are then re-partitioned. Only the model changes (DeepSpeed's
        fp32 master copies in the optimizer do not): resume goes through ``load_checkpoint``.
        """
        from safetensors.torch import load_file

        model = self.unwrapped_model()
        adapter = os.path.join(directory, "adapter_model.safetensors")
        is_adapter = os.path.isfile(adapter)
        if is_adapter:
            state_dict = load_file(adapter)
        else:
            files = sorted(f for f in os.listdir(directory) if f.startswith("model") and f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no model*.safetensors in checkpoint {directory!r}")
            state_dict = {}
            for fname in files:
                state_dict.update(load_file(os.path.join(directory, fname)))

        def check(missing, unexpected) -> None:
            tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {directory!r} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")

        def load_unsharded() -> None:
            if is_adapter:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model, state_dict)
                return
            check(*model.load_state_dict(state_dict, strict=False))
            if hasattr(model, "tie_weights"):
                model.tie_weights()

        if getattr(self.accelerator, "is_fsdp2", False):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import FSDPModule

            # the root module keeps its parameters unsharded after a forward without backward (an
            # evaluation: reshard_after_forward is off for the root); copying full tensors then
            # fails with "got mixed torch.Tensor and DTensor", so shard everything first.
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
            if is_adapter:  # PEFT files name the weights without the adapter name: map them back
                suffix = f".{model.active_adapter}"
                names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
                by_saved_name = {n.replace(suffix, ""): n for n in names if suffix in n}
                unknown = [k for k in state_dict if k not in by_saved_name]
                if unknown:
                    raise RuntimeError(f"adapter in {directory!r} does not match the model: unexpected={unknown[:5]}")
                state_dict = {by_saved_name[k]: v for k, v in state_dict.items()}
            result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))
            if not is_adapter:
                check(result.missing_keys, result.unexpected_keys)
        elif self.is_deepspeed and self.model.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if self.is_main_process:
                    load_unsharded()
        else:
            load_unsharded()
        if _backend_is_plain(self.accelerator):  # DeepSpeed / FSDP restore the auxiliaries with their engines' own state
            for aux in self._auxiliaries.values():
                self._load_auxiliary_weights(aux, os.path.join(directory, aux.name))

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
            "config_sources": self._config_sources(),
            "versions": {
                "posttrain": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
                "peft": peft_version,
                "python": platform.python_version(),
            },
            "world_size": self.accelerator.num_processes,
            "distributed_type": str(self.accelerator.distributed_type.value),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _config_sources(self) -> dict:
        """Field -> where its value came from: the CLI records default / yaml / preset NAME / flag; in Python, default or python."""
        recorded = getattr(self.args, "_field_sources", None)
        if recorded:
            return dict(recorded)
        out = {}
        for item in dataclasses.fields(self.args):
            default = item.default if item.default is not dataclasses.MISSING else (
                item.default_factory() if item.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            try:
                same = getattr(self.args, item.name) == default
            except Exception:  # a value that does not compare (an array): call it set
                same = False
            out[item.name] = "default" if same is True else "python"
        return out

    def log(self, metrics: dict[str, float], step: int | None = None, *, summary: bool = False) -> None:
        """Record ``metrics`` everywhere: ``metrics.jsonl``, ``state.log_history``, trackers, hooks and callbacks' ``on_log``.

        ``summary=True`` (the end-of-run row: ``train_runtime``, ``train_loss``, ...) goes to
        ``state.log_history``, trackers and callbacks but not to ``metrics.jsonl``, whose rows stay
        one per logging or eval step, nor to the ``on_log`` plugin hook (diagnostics).
        """
        step = self.state.global_step if step is None else step
        if self.is_main_process and self.args.output_dir and not summary:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.args.output_dir and not summary:
            self._wrote_output_dir = True  # on every process, so they all judge the output_dir alike
        if self.args.report_to and self._trackers_started:
            self.accelerator.log(metrics, step=step)
        if not summary:
            self.diagnostics.on_log(step=step, metrics=dict(metrics))
            self.plugin_manager.hook.on_log(step=step, metrics=dict(metrics), output_dir=self.args.output_dir)
        epoch = self.state.epoch if self.state.epoch is not None else 0.0
        row = {**metrics, "epoch": round(epoch, 4), "step": step}
        self.state.log_history.append(row)
        self.control = self.callbacks.call("on_log", self.args, self.state, self.control, logs=dict(metrics), **self._callback_objects())


    def _log_diagnostic(self, values: dict, step: int) -> None:
        """Send a diagnostic event to the trackers: numbers to all, text only to trackers that take text (MLflow, Aim, ... drop or reject it)."""
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        texts = {k: v for k, v in values.items() if isinstance(v, str)}
        for tracker in self.accelerator.trackers if texts else ():
            if tracker.name in ("tensorboard", "wandb", "comet_ml"):
                tracker.log(texts, step=step)

    def _truncate_metrics_log(self, step: int) -> None:
        """After a resume, drop logged lines beyond ``step`` (they belong to the interrupted run)."""
        path = os.path.join(self.args.output_dir, "metrics.jsonl")
        if not self.is_main_process or not os.path.isfile(path):
            return
        with open(path) as fh:
            lines = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as fh:
            fh.writelines(lines)

    def _callback_objects(self) -> dict:
        return {"model": self.model, "processing_class": self.processing_class, "optimizer": self.optimizer, "lr_scheduler": self.scheduler,
                "train_dataloader": None, "eval_dataloader": None}

    def _event(self, name: str, **kwargs) -> None:
        self.control = self.callbacks.call(name, self.args, self.state, self.control, **self._callback_objects(), **kwargs)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, method, dataset=None, *, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score ``dataset`` (default ``method.eval_dataset``) and return metrics named ``<prefix>_<name>`` (all processes call).

        A dict of datasets (or a ``DatasetDict``) is scored one by one with the prefix
        ``<prefix>_<name>``, as in transformers. The method's ``evaluate(model, batches)`` replaces
        the default (the item-weighted mean of ``compute_loss``'s loss and metrics).
        """
        dataset = getattr(method, "eval_dataset", None) if dataset is None else dataset
        if dataset is None:
            return {}
        if isinstance(dataset, dict):
            merged: dict[str, float] = {}
            for name, part in dataset.items():
                merged.update(self.evaluate(method, part, metric_key_prefix=f"{metric_key_prefix}_{name}"))
            return merged
        if len(dataset) == 0:
            return {}
        start = time.perf_counter()
        if self.optimizer is None:  # before train(): the model is not prepared (placed) yet
            self.model.to(self.device)
        model = self.model
        was_training = model.training
        model.eval()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        indices = list(range(len(dataset)))[rank::world]
        size = self.args.per_device_eval_batch_size
        batches = [indices[i : i + size] for i in range(0, len(indices), size)]
        if callable(getattr(method, "evaluate_batches", None)):
            result = method.evaluate_batches(model, (self.to_device(method.collate(_rows(dataset, b))) for b in batches))
        else:
            result = self._mean_loss_and_metrics(method, model, dataset, batches)
        if self.compute_metrics is not None:
            result.update(self._computed_metrics(method, model, dataset, batches))
        if was_training:
            model.train()
        runtime = time.perf_counter() - start
        result = {**result, "runtime": runtime, "samples_per_second": len(dataset) / max(runtime, 1e-9), "steps_per_second": len(batches) / max(runtime, 1e-9)}
        return {f"{metric_key_prefix}_{k}": float(v) for k, v in result.items()}

    def _mean_loss_and_metrics(self, method, model, dataset, batches) -> dict[str, float]:
        totals: dict[str, torch.Tensor] = {}
        weight = torch.zeros((), device=self.device)
        for b in batches:
            batch = self.to_device(method.collate(_rows(dataset, b)))
            n = method.count_items(batch)
            loss, metrics = method.compute_loss(model, batch, n)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * n
            weight = weight + n
        keys = sorted(totals)
        stacked = torch.stack([torch.as_tensor(totals[k], device=self.device) for k in keys] + [weight])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="sum")
        return {k: (stacked[i] / stacked[-1].clamp(min=1)).item() for i, k in enumerate(keys)}

    def _computed_metrics(self, method, model, dataset, batches) -> dict[str, float]:
        """Run the user's ``compute_metrics`` on every process's ``method.eval_predictions``, concatenated (padded with -100)."""
        from transformers import EvalPrediction

        from posttrain._ops import pad

        predict = getattr(method, "eval_predictions", None)
        if not callable(predict):
            raise ConfigError(f"compute_metrics is not supported by the {self.method_name!r} method: it defines no eval_predictions(model, batch).")
        predictions, labels = [], []
        for b in batches:
            p, l = predict(model, self.to_device(method.collate(_rows(dataset, b))))
            predictions.extend(p.detach().float().cpu())
            labels.extend(l.detach().cpu())
        preds = pad(predictions, padding_value=-100) if predictions and predictions[0].dim() else torch.stack(predictions)
        labs = pad(labels, padding_value=-100) if labels and labels[0].dim() else torch.stack(labels)
        if self.accelerator.num_processes > 1:
            preds = self.accelerator.gather(self.accelerator.pad_across_processes(preds.to(self.device), dim=1, pad_index=-100)).cpu()
            labs = self.accelerator.gather(self.accelerator.pad_across_processes(labs.to(self.device), dim=1, pad_index=-100)).cpu()
        metrics = self.compute_metrics(EvalPrediction(predictions=preds.numpy(), label_ids=labs.numpy()))
        return {k.removeprefix("eval_"): float(v) for k, v in (metrics or {}).items()}

    def _evaluate_and_log(self, method) -> dict[str, float]:
        return self.evaluate_and_record(method)

    def evaluate_and_record(self, method, dataset=None, *, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Evaluate (see :meth:`evaluate`) and record each eval set's metrics as its own log row, as transformers does.

        Returns the metrics of every set, merged.
        """
        dataset = getattr(method, "eval_dataset", None) if dataset is None else dataset
        if isinstance(dataset, dict):
            merged: dict[str, float] = {}
            for name, part in dataset.items():
                merged.update(self.evaluate_and_record(method, part, metric_key_prefix=f"{metric_key_prefix}_{name}"))
            return merged
        metrics = self.evaluate(method, dataset, metric_key_prefix=metric_key_prefix)
        self.record_evaluation(metrics, metric_key_prefix=metric_key_prefix)
        return metrics

    def record_evaluation(self, metrics: dict[str, float], *, metric_key_prefix: str = "eval") -> None:
        """Log eval ``metrics``, track the best ``metric_for_best_model`` and call callbacks' ``on_evaluate``."""
        if not metrics:
            return
        self.log(metrics)
        self._event("on_evaluate", metrics=metrics)  # before the best is updated, as in transformers' Trainer
        self._track_best(metrics, metric_key_prefix)

    def _track_best(self, metrics: dict[str, float], metric_key_prefix: str = "eval") -> None:
        """Remember the best ``metric_for_best_model`` (for ``load_best_model_at_end`` and callbacks such as early stopping).

        With several named eval sets, name the metric with its set (``eval_<name>_loss``).
        """
        name = self.args.metric_for_best_model
        if name is None:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        if key not in metrics:
            if metric_key_prefix == "eval":
                raise ConfigError(f"metric_for_best_model={name!r} is not among the eval metrics {sorted(metrics)}: use one of them.")
            return  # another named eval set's row
        value = metrics[key]
        best = self.state.best_metric
        if best is None or (value > best if self.args.greater_is_better else value < best):
            self.state.best_metric = value
            self.state.best_global_step = self.state.global_step

    # ------------------------------------------------------------------ the loop
    def setup(self, model, method=None) -> None:
        """Remember the model (optimizer and scheduler are built in :meth:`train`: they need the step count).

        Args:
            model: The model to train (loaded by :meth:`load_model`).
            method: The method object; checked against :class:`posttrain.MethodProtocol` now, so a
                plugin missing a member fails when its trainer is built, not mid-run.
        """
        self.model = model
        if method is not None:
            check_method(method, plugin=self.method_name)
            self._checked = True
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) is True and not getattr(method, "supports_encoder_decoder", False):
            raise ConfigError(
                f"{type(model.get_base_model() if hasattr(model, 'get_base_model') else model).__name__} is an encoder-decoder model, "
                f"but posttrain's {self.method_name!r} trains decoder-only (causal) language models: load a causal LM "
                "(AutoModelForCausalLM), or use a method that supports encoder-decoder models (`posttrain info METHOD`)."
            )

    def add_trainable_model(self, name: str, model, *, learning_rate: float | None = None, weight_decay: float | None = None) -> None:
        """Train ``model`` beside the policy with its own optimizer and learning-rate schedule (a PPO critic, ...).

        Call before ``train()``. The model gets the run's optimizer settings (``optim``, betas, epsilon,
        ``lr_scheduler_type``, warm-up, ``max_grad_norm``) with its own ``learning_rate`` /
        ``weight_decay`` when given; it is prepared by the run's backend (DDP, DeepSpeed, FSDP2) like the
        policy, checkpointed with its optimizer and schedule (``checkpoint-N/<name>/`` holds its weights,
        loadable with ``from_pretrained``; the final weights go to ``output_dir/<name>/``) and resumed exactly.

        The method's ``compute_loss`` then returns its loss as a dict, one entry per trained model:
        ``{"model": policy_loss, name: auxiliary_loss, ...}`` (each normalized like the policy's loss), and
        reaches the prepared model with :meth:`trainable_model`. Each loss must depend only on its own
        model's parameters (each is back-propagated through its own backend engine); the logged ``loss`` is
        the policy's.

        Args:
            name: A name for files and metrics (letters, digits, ``_``; not ``"model"``).
            model: The module to train (e.g. ``load_pretrained(..., role="critic")``).
            learning_rate: Its learning rate (default ``args.learning_rate``).
            weight_decay: Its weight decay (default ``args.weight_decay``).

        Raises:
            ConfigError: a bad or repeated name, a call after training started, or a model without trainable parameters.
        """
        import re

        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name == "model":
            raise ConfigError(f"add_trainable_model: name {name!r} is invalid: use letters, digits and '_' (not 'model', the policy's name).")
        if name in self._auxiliaries:
            raise ConfigError(f"add_trainable_model: a model named {name!r} is already trained beside the policy; pick another name.")
        if self.optimizer is not None:
            raise ConfigError(f"add_trainable_model({name!r}) after training started: add trainable models before calling train().")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"add_trainable_model({name!r}): the model has no trainable parameters (requires_grad is False everywhere).")
        self._auxiliaries[name] = _Auxiliary(name=name, model=model, learning_rate=learning_rate, weight_decay=weight_decay)

    def trainable_model(self, name: str):
        """The prepared (possibly wrapped) trainable model ``name`` added with :meth:`add_trainable_model`; call it for forwards.

        Raises:
            KeyError: no trainable model has that name (the message lists them).
        """
        if name not in self._auxiliaries:
            raise KeyError(f"no trainable model named {name!r}; added: {sorted(self._auxiliaries) or 'none'} (see add_trainable_model).")
        return self._auxiliaries[name].model

    @property
    def trainable_model_names(self) -> list[str]:
        """Names of the trainable models beside the policy, in the order they were added."""
        return list(self._auxiliaries)

    def _prepare_auxiliaries(self, max_steps: int) -> None:
        """Build each auxiliary's optimizer and schedule and prepare both with the run's backend (after the policy)."""
        args = self.args
        for aux in self._auxiliaries.values():
            saved = (args.learning_rate, args.weight_decay)
            try:  # the run's optimizer recipe with this model's own rates
                args.learning_rate = aux.learning_rate if aux.learning_rate is not None else saved[0]
                args.weight_decay = aux.weight_decay if aux.weight_decay is not None else saved[1]
                optimizer = self._build_optimizer(aux.model)
                aux.scheduler = self._build_scheduler(optimizer, max_steps)
            finally:
                args.learning_rate, args.weight_decay = saved
            aux.model, aux.optimizer = self.accelerator.prepare(aux.model, optimizer)
            aux.model.train()

    def _claim_output_dir(self, resume) -> str | None:
        """Make ``output_dir`` this run's own (one run per directory); return the checkpoint to resume, if any.

        A fresh run into a directory that holds another run's files is refused (one line naming the
        fixes), unless ``overwrite_output_dir`` deletes them first. A resumed run keeps the run id of
        its checkpoint, so rotation and ``diagnose`` see one run. Every process checks before any
        writes (same files, same decision), then they synchronize.
        """
        from accelerate.utils import broadcast_object_list

        args, accelerator = self.args, self.accelerator
        if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
            resume = find_latest_checkpoint(args.output_dir)
            if resume is None:
                raise CheckpointNotFoundError(
                    f"resume_from_checkpoint=true but output_dir {args.output_dir!r} holds no complete checkpoint: "
                    "start without resume_from_checkpoint, or point output_dir at the run to resume."
                )
            accelerator.print(f"[posttrain] resume_from_checkpoint=true: the newest checkpoint of {args.output_dir} is {os.path.basename(resume)}")
        run_id = None
        previous = existing_run(args.output_dir)
        if resume:
            run_id = read_manifest(resume).get("run_id")
            if previous is not None and previous["run_id"] and previous["run_id"] != run_id:
                raise ConfigError(
                    f"resume_from_checkpoint={resume!r} belongs to another run than the one in output_dir {args.output_dir!r} "
                    f"({describe_run(previous)}): resume with output_dir set to the checkpoint's own run directory, or a new one."
                )
        else:
            # this trainer's own files are not another run: a train() after evaluate(), or a second train()
            mine = previous is not None and (
                (self.run_id is not None and previous["run_id"] == self.run_id)
                or (previous["run_id"] is None and not previous["checkpoints"] and self._wrote_output_dir)
            )
            if mine:
                previous, run_id = None, self.run_id
            if previous is not None and not args.overwrite_output_dir:
                raise ConfigError(
                    f"output_dir {args.output_dir!r} already holds a run ({describe_run(previous)}): pass a new --output_dir, "
                    "--overwrite_output_dir true to delete that run first, or --resume_from_checkpoint true to continue it."
                )
            accelerator.wait_for_everyone()  # every process has looked before the main one deletes anything
            if previous is not None and self.is_main_process:
                removed = remove_run(args.output_dir)
                accelerator.print(f"[posttrain] overwrite_output_dir: removed the previous run's {', '.join(removed)} from {args.output_dir}")
        ids = [run_id or uuid.uuid4().hex[:12]]
        if accelerator.num_processes > 1:
            broadcast_object_list(ids)  # one id for the run on every process
        self.run_id = ids[0]
        accelerator.wait_for_everyone()
        return resume

    def _set_sync(self, sync: bool) -> None:
        # accelerate decides when DeepSpeed/optimizer wrappers really step from this flag; we set it
        # per micro-batch ourselves so an epoch's last, shorter accumulation window still steps.
        self.accelerator.gradient_state._set_sync_gradients(sync)

    def train(self, method, *, batch_size: int | None = None, micro_batches_per_step: int | None = None,
              resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Train ``method`` (a :class:`posttrain.MethodProtocol`) and return ``TrainOutput(global_step, training_loss, metrics)``.

        Args:
            method: The method object.
            batch_size: Dataset rows per raw micro-batch (default ``per_device_train_batch_size``).
            micro_batches_per_step: Raw micro-batches drawn from the dataset per optimizer step
                (default ``gradient_accumulation_steps``). An online method that turns one batch of
                prompts into ``gradient_accumulation_steps`` loss micro-batches in ``prepare_step``
                passes 1 (accumulation and loss scaling are unchanged).
            resume_from_checkpoint: A checkpoint directory, or True for the latest in
                ``output_dir`` (default ``args.resume_from_checkpoint``).
        """
        run = self._begin_run(method, batch_size, micro_batches_per_step, resume_from_checkpoint)
        while self.state.global_step < run.max_steps and not self.control.should_training_stop:
            micro = self._draw_step(method, run)
            if micro is None:  # the epoch is over
                self._end_epoch(method, run)
                continue
            self._event("on_step_begin")
            step_loss, grad_norm, learning_rate = self._optimizer_step(method, micro, run)
            self._after_step(method, run, step_loss, grad_norm, learning_rate)
            if run.position >= len(run.batches):
                self._end_epoch(method, run)
        return self._end_run(method, run)

    # -- the parts of train(), in order ---------------------------------------------------------
    def _begin_run(self, method, batch_size, micro_batches_per_step, resume_from_checkpoint) -> "_Run":
        """Build optimizer and schedule, prepare, resume, write the manifest, start trackers and callbacks."""
        args, accelerator = self.args, self.accelerator
        if not self._checked:
            check_method(method, plugin=self.method_name)
            self._checked = True
        dataset = method.train_dataset
        if dataset is None or len(dataset) == 0:
            raise ConfigError("train_dataset is empty: give the trainer at least one example.")
        os.makedirs(args.output_dir, exist_ok=True)
        resume = self._claim_output_dir(args.resume_from_checkpoint if resume_from_checkpoint is None else resume_from_checkpoint)
        producer = _producer_of(method)
        if producer is not None:  # an online method: the producer decides the prompts, one production per step
            run = _Run(dataset=dataset, batch_size=producer.prompts_per_step, gas=1, producer=producer)
            run.steps_per_epoch = producer.steps_per_epoch
        else:
            run = _Run(dataset=dataset, batch_size=batch_size or args.per_device_train_batch_size,
                       gas=micro_batches_per_step or args.gradient_accumulation_steps)
            batches_per_epoch = len(self._micro_batches(self._epoch_indices(len(dataset), 0), run.batch_size))
            run.steps_per_epoch = max(1, math.ceil(batches_per_epoch / run.gas))
        run.max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * run.steps_per_epoch)

        # model before optimizer (the optimizer needs the final parameters), optimizer before prepare.
        optimizer = self._given_optimizer or self._build_optimizer(self.model)
        self.scheduler = self._given_scheduler or self._build_scheduler(optimizer, run.max_steps)
        if args.torch_compile and not hasattr(self.model, "_orig_mod"):
            self.model = torch.compile(self.model, backend=args.torch_compile_backend or "inductor", mode=args.torch_compile_mode)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.model.train()
        self._prepare_auxiliaries(run.max_steps)
        self.manifest = self._build_manifest()
        self.manifest.update(run_id=self.run_id, max_steps=run.max_steps, train_rows=len(dataset), signals=dict(self.diagnostics.signals),
                             actions=dict(self.diagnostics.actions))
        self.diagnostics.context = {"per_device_train_batch_size": args.per_device_train_batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                                    "train_rows": len(dataset), "max_steps": run.max_steps}
        self._reset_state(run.max_steps)

        if resume:
            saved = TrainingState.from_dict(load_checkpoint(self, method, resume))
            if saved.max_steps != run.max_steps:
                accelerator.print(f"[posttrain] checkpoint planned {saved.max_steps} steps, config gives {run.max_steps}: the config wins.")
            for name in ("global_step", "epoch", "epoch_index", "batches_in_epoch", "num_input_tokens_seen", "log_history",
                         "best_metric", "best_global_step", "best_model_checkpoint", "total_flos"):
                setattr(self.state, name, getattr(saved, name))
            if run.producer is not None and not os.path.isfile(producer_state_file(resume, accelerator.process_index)):
                accelerator.print(f"[posttrain] {resume} has no producer state for process {accelerator.process_index} (saved before plugin API 1.5): "
                                  "the next rollout is generated afresh.")
                run.producer.seek(self.state.global_step, self.state.epoch_index, self.state.batches_in_epoch)
            self._truncate_metrics_log(self.state.global_step)
            self.state.log_history = [row for row in self.state.log_history if row.get("step", 0) <= self.state.global_step]
            accelerator.print(f"[posttrain] resumed from {resume} at step {self.state.global_step}")
        elif run.producer is not None:  # a fresh run starts the prompts from the beginning
            run.producer.seek(0, 0, 0)
        if self.is_main_process:
            with open(os.path.join(args.output_dir, "run_manifest.json"), "w") as fh:
                json.dump(self.manifest, fh, indent=2, default=str)
        if args.report_to:
            flat = {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(args.run_name or os.path.basename(os.path.abspath(args.output_dir)), config=flat)
            self._trackers_started = True
            self.diagnostics.tracker_log = self._log_diagnostic  # diagnostic events as scalars + text
        if self.is_main_process and not args.disable_tqdm:
            from tqdm.auto import tqdm

            run.progress = tqdm(total=run.max_steps, initial=self.state.global_step, desc=f"posttrain {self.method_name}", dynamic_ncols=True)
        run.start_time = run.last_log_time = time.perf_counter()
        run.start_step = self.state.global_step
        run.tokens_at_last_log = self.state.num_input_tokens_seen
        self._event("on_train_begin")
        if args.eval_on_start:
            self._evaluate_and_log(method)
        return run

    def _reset_state(self, max_steps: int) -> None:
        args = self.args
        self.state = TrainingState(
            max_steps=max_steps, logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps,
            train_batch_size=args.per_device_train_batch_size, num_train_epochs=args.num_train_epochs, epoch=0.0,
            is_local_process_zero=self.accelerator.is_local_main_process, is_world_process_zero=self.is_main_process,
        )
        self.control = TrainerControl()

    def _draw_step(self, method, run: "_Run") -> list[dict] | None:
        """Return the next optimizer step's micro-batches (collated, ``prepare_step`` applied), or None at the epoch's end."""
        if run.producer is not None:
            return self._draw_produced_step(run)
        if run.batches is None or run.epoch_of_batches != self.state.epoch_index:
            run.batches = self._micro_batches(self._epoch_indices(len(run.dataset), self.state.epoch_index), run.batch_size)
            run.epoch_of_batches = self.state.epoch_index
            if self.state.batches_in_epoch == 0:
                self._event("on_epoch_begin")
        start = self.state.batches_in_epoch
        if start >= len(run.batches):
            return None
        run.window = run.batches[start : start + run.gas]
        if self.args.dataloader_num_workers > 0:
            micro = self._collated_by_workers(method, run, start)
        else:
            micro = [method.collate(_rows(run.dataset, idx)) for idx in run.window]
        if callable(getattr(method, "prepare_step", None)):
            started = time.perf_counter()
            micro = method.prepare_step(micro, self.state)
            run.prepare_seconds += time.perf_counter() - started
        return micro

    def _collated_by_workers(self, method, run: "_Run", start: int) -> list[dict]:
        """This step's micro-batches, collated ahead by ``dataloader_num_workers`` DataLoader workers.

        One ``torch.utils.data.DataLoader`` per epoch (or from the resume position) over the epoch's
        remaining micro-batches, in the same order, each collated by ``method.collate`` in a worker: the
        batches are those of in-process collation, so resume stays exact.
        """
        if run.loader is None or run.loader_epoch != self.state.epoch_index or run.loader_position != start:
            from torch.utils.data import DataLoader

            args = self.args
            batches = _CollatedMicroBatches(run.dataset, run.batches[start:], method.collate)
            workers = {"num_workers": args.dataloader_num_workers, "pin_memory": bool(args.dataloader_pin_memory) and self.device.type == "cuda",
                       "persistent_workers": False}
            if args.dataloader_prefetch_factor is not None:
                workers["prefetch_factor"] = args.dataloader_prefetch_factor
            if args.dataloader_multiprocessing_context is not None:
                workers["multiprocessing_context"] = args.dataloader_multiprocessing_context
            run.loader = iter(DataLoader(batches, batch_size=None, shuffle=False, **workers))
            run.loader_epoch, run.loader_position = self.state.epoch_index, start
        micro = [next(run.loader) for _ in run.window]
        run.loader_position += len(run.window)
        return micro

    def _draw_produced_step(self, run: "_Run") -> list[dict] | None:
        """The next step from the method's producer (``run.batches`` counts the epoch's steps), or None at the epoch's end."""
        if run.batches is None or run.epoch_of_batches != self.state.epoch_index:
            run.batches = [[step] for step in range(run.producer.steps_per_epoch)]  # one "window" per optimizer step
            run.epoch_of_batches = self.state.epoch_index
            if self.state.batches_in_epoch == 0:
                self._event("on_epoch_begin")
        start = self.state.batches_in_epoch
        if start >= len(run.batches):
            return None
        run.window = run.batches[start : start + 1]
        started = time.perf_counter()
        micro = run.producer.next_step(self.state)
        run.prepare_seconds += time.perf_counter() - started
        return micro

    def _optimizer_step(self, method, micro: list[dict], run: "_Run") -> tuple[torch.Tensor, Any, float]:
        """Forward and backward every micro-batch, clip, step; return ``(loss, grad_norm, learning_rate)``."""
        accelerator, args = self.accelerator, self.args
        world = accelerator.num_processes
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
            batch = self.to_device(batch)
            with contextlib.ExitStack() as no_sync:
                if not last:
                    for model in (self.model, *(aux.model for aux in self._auxiliaries.values())):
                        no_sync.enter_context(accelerator.no_sync(model))
                loss, metrics = method.compute_loss(self.model, batch, num_items)
                if self._auxiliaries:
                    loss = self._backward_auxiliaries(loss, loss_scale, last)
                accelerator.backward(loss * loss_scale)
            step_loss = step_loss + loss.detach()
            for key, value in metrics.items():
                run.window_metrics.setdefault(key, []).append(value.detach().float())
            if "num_tokens" in batch:
                self.state.num_input_tokens_seen += int(batch["num_tokens"])
            if not last:
                self._event("on_substep_end")
        grad_norm = None
        if args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
        elif self._log_due(self.state.global_step + 1, run):  # no clipping, but the logged grad_norm is still wanted
            grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), float("inf"))
        learning_rate = self.scheduler.get_last_lr()[0]
        self._event("on_pre_optimizer_step")
        self.optimizer.step()
        self._step_auxiliaries()
        self._event("on_optimizer_step")
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm, learning_rate

    def _backward_auxiliaries(self, losses, loss_scale, last: bool):
        """Back-propagate each auxiliary's loss through its own engine; return the policy's loss."""
        if not isinstance(losses, dict) or "model" not in losses or set(losses) - {"model", *self._auxiliaries}:
            got = sorted(losses) if isinstance(losses, dict) else type(losses).__name__
            raise TypeError(f"{self.method_name}.compute_loss must return its loss as a dict {{'model': ..., "
                            f"{', '.join(repr(n) for n in self._auxiliaries)}: ...}} when trainable models are added; got {got}.")
        for name, aux in self._auxiliaries.items():
            if name not in losses:
                continue
            if self.is_deepspeed:  # the auxiliary's own engine: its loss scaling, ZeRO reductions and, at the boundary, its step
                aux.model.set_gradient_accumulation_boundary(is_boundary=last)
                aux.model.backward(losses[name] * loss_scale)
                if last:
                    aux.model.step()
            else:
                (losses[name] * (loss_scale / self.accelerator.gradient_accumulation_steps)).backward()
            aux.window_losses.append(losses[name].detach())
        return losses["model"]

    def _step_auxiliaries(self) -> None:
        """Clip, step and schedule each auxiliary (DeepSpeed's engines stepped in their backward)."""
        for aux in self._auxiliaries.values():
            if not self.is_deepspeed:
                if self.args.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(aux.model.parameters(), self.args.max_grad_norm)
                aux.optimizer.step()
                aux.optimizer.zero_grad(set_to_none=True)
            aux.scheduler.step()

    def _log_due(self, step: int, run: "_Run") -> bool:
        args = self.args
        if args.logging_strategy == "no":
            return False
        if step == run.max_steps or (step == 1 and args.logging_first_step):
            return True
        if args.logging_strategy == "epoch":
            return self.state.batches_in_epoch + len(run.window) >= len(run.batches)
        return step % args.logging_steps == 0

    def _after_step(self, method, run: "_Run", step_loss, grad_norm, learning_rate) -> None:
        """Advance the counters, then log, evaluate and save as the strategies and callbacks decide."""
        args = self.args
        log_now = self._log_due(self.state.global_step + 1, run)
        self.state.global_step += 1
        self.state.batches_in_epoch = run.position = self.state.batches_in_epoch + len(run.window)
        self.state.epoch = self.state.epoch_index + self.state.batches_in_epoch / max(1, len(run.batches))
        run.window_losses.append(step_loss)
        if callable(getattr(method, "on_step_end", None)):
            method.on_step_end(self.model, self.state)
        if run.progress is not None:
            run.progress.update(1)
        step = self.state.global_step
        control = self.control
        control.should_log = control.should_log or log_now
        end_of_epoch = run.position >= len(run.batches)
        control.should_evaluate = control.should_evaluate or (
            (args.eval_strategy == "steps" and step % args.eval_steps == 0 and step != run.max_steps) or (args.eval_strategy == "epoch" and end_of_epoch)
        )
        control.should_save = control.should_save or (
            (args.save_strategy == "steps" and step % args.save_steps == 0) or (args.save_strategy == "epoch" and end_of_epoch and step < run.max_steps)
        )
        self._event("on_step_end")
        if self.control.should_log:
            self._log_window(run, grad_norm, learning_rate)
            self.control.should_log = False
        if self.control.should_evaluate:
            self._evaluate_and_log(method)
            self.control.should_evaluate = False
        if self.control.should_save:
            self._save(method)
            self.control.should_save = False
        if args.torch_empty_cache_steps and step % args.torch_empty_cache_steps == 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _log_window(self, run: "_Run", grad_norm, learning_rate) -> None:
        """Log the means since the last log: one host sync per logging step, never per micro-batch."""
        if not run.window_losses:
            return
        accelerator, world = self.accelerator, self.accelerator.num_processes
        keys = sorted(run.window_metrics)
        aux_names = [aux.name for aux in self._auxiliaries.values() if aux.window_losses]
        shares = [torch.stack(run.window_losses).mean()] + [torch.stack(self._auxiliaries[n].window_losses).mean().to(self.device) for n in aux_names]
        local = torch.stack(shares + [torch.stack(run.window_metrics[k]).mean() for k in keys])
        n_sum = len(shares)
        if world > 1:
            local[:n_sum] = accelerator.reduce(local[:n_sum].clone(), reduction="sum")  # each process holds its share of the global mean
            local[n_sum:] = accelerator.reduce(local[n_sum:].clone(), reduction="mean")
        values = local.tolist()
        aux_losses = {f"{name}_loss": values[1 + i] for i, name in enumerate(aux_names)}
        for name in aux_names:
            self._auxiliaries[name].window_losses = []
        values = values[:1] + values[n_sum:]
        now = time.perf_counter()
        logged = {
            "loss": values[0],
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "epoch": self.state.epoch,
            **aux_losses,
            **dict(zip(keys, values[1:])),
            "steps_per_second": len(run.window_losses) / max(now - run.last_log_time, 1e-9),
        }
        if run.prepare_seconds > 0:  # online methods: the share of wall time spent in prepare_step (generation)
            logged["prepare_step_fraction"] = min(1.0, run.prepare_seconds / max(now - run.last_log_time, 1e-9))
            run.prepare_seconds = 0.0
        if self.state.num_input_tokens_seen > run.tokens_at_last_log:
            logged["tokens_per_second"] = (self.state.num_input_tokens_seen - run.tokens_at_last_log) / max(now - run.last_log_time, 1e-9)
            logged["num_tokens"] = float(self.state.num_input_tokens_seen)
        run.losses_sum += values[0] * len(run.window_losses)
        run.losses_n += len(run.window_losses)
        run.last_log_time, run.tokens_at_last_log = now, self.state.num_input_tokens_seen
        run.window_losses, run.window_metrics = [], {}
        self.log(logged)
        run.final_metrics.update(logged)
        run.last_window = logged
        if run.progress is not None:
            run.progress.set_postfix(loss=f"{values[0]:.4f}")

    def _save(self, method) -> None:
        save_checkpoint(self, method, self.state.global_step)
        if self.state.best_global_step == self.state.global_step:  # on every rank: all of them load it at the end
            self.state.best_model_checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        self._event("on_save")
        if self.args.push_to_hub and self.args.hub_strategy != "end" and self.is_main_process:
            self.push_to_hub(commit_message=f"checkpoint {self.state.global_step}")

    def _end_epoch(self, method, run: "_Run | None" = None) -> None:
        if run is not None and run.batches is not None:
            self._event("on_epoch_end")
        self.state.epoch_index += 1
        self.state.batches_in_epoch = 0
        if run is not None:
            run.position = 0

    def _end_run(self, method, run: "_Run") -> TrainOutput:
        """Final eval and save, load the best model if asked, the summary row, callbacks' ``on_train_end``."""
        args, accelerator = self.args, self.accelerator
        if run.progress is not None:
            run.progress.close()
        if run.window_losses:  # steps since the last log (a callback stopped the run, or logging_strategy='no')
            run.losses_sum += float(torch.stack(run.window_losses).mean()) * len(run.window_losses)
            run.losses_n += len(run.window_losses)
            run.window_losses, run.window_metrics = [], {}
        eval_metrics = self._evaluate_and_log(method) if not (args.eval_strategy != "no" and self._last_logged_step_has_eval()) else {}
        run.final_metrics.update(eval_metrics)
        if args.save_strategy != "no" and not os.path.isdir(os.path.join(args.output_dir, f"checkpoint-{self.state.global_step}")):
            self._save(method)
        if args.load_best_model_at_end and self.state.best_model_checkpoint:
            accelerator.print(f"[posttrain] loading the best model ({args.metric_for_best_model}={self.state.best_metric:.4g}) from {self.state.best_model_checkpoint}")
            self.load_model_weights(self.state.best_model_checkpoint)
        self.save_model(args.output_dir)
        accelerator.wait_for_everyone()
        runtime = time.perf_counter() - run.start_time
        training_loss = run.losses_sum / run.losses_n if run.losses_n else float("nan")
        steps_run = self.state.global_step - run.start_step
        standard = {"loss", "learning_rate", "grad_norm", "epoch", "steps_per_second", "tokens_per_second", "prepare_step_fraction"}
        last_window = {k: v for k, v in run.last_window.items() if k not in standard}
        summary = {
            **last_window,  # the method's metrics of the last logged window (as TRL's summary row carries them)
            "train_runtime": runtime,
            "train_samples_per_second": steps_run * run.batch_size * run.gas * accelerator.num_processes / max(runtime, 1e-9),
            "train_steps_per_second": steps_run / max(runtime, 1e-9),
            "total_flos": float(self.state.total_flos),
            "train_loss": training_loss,
        }
        self.log(summary, summary=True)
        self._event("on_train_end")
        if args.push_to_hub and self.is_main_process:
            self.push_to_hub()
        if args.report_to and self._trackers_started:
            accelerator.end_training()
            self._trackers_started = False
            self.diagnostics.tracker_log = None
        return TrainOutput(self.state.global_step, training_loss, {**run.final_metrics, **summary})

    def _last_logged_step_has_eval(self) -> bool:
        """Whether the current step was already evaluated (eval_strategy hit the last step)."""
        for row in reversed(self.state.log_history):
            if row.get("step") != self.state.global_step:
                return False
            if any(k.startswith("eval_") for k in row):
                return True
        return False

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, **kwargs) -> Any:
        """Upload ``output_dir`` (without checkpoints, unless ``hub_strategy`` says so) to ``hub_model_id`` on the Hub."""
        from huggingface_hub import HfApi

        args = self.args
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo_id, exist_ok=True, private=args.hub_private_repo)
        ignore = [] if args.hub_strategy == "all_checkpoints" else ["checkpoint-*", "tmp-*"]
        return api.upload_folder(folder_path=args.output_dir, repo_id=repo_id, revision=args.hub_revision, commit_message=commit_message, ignore_patterns=ignore)


@dataclass
class _Auxiliary:
    """A trainable model beside the policy (:meth:`TrainingLoop.add_trainable_model`)."""

    name: str
    model: Any
    learning_rate: float | None = None
    weight_decay: float | None = None
    optimizer: Any = None
    scheduler: Any = None
    window_losses: list = field(default_factory=list)


@dataclass
class _Run:
    """What one call of :meth:`TrainingLoop.train` keeps between steps (not checkpointed: rebuilt on resume)."""

    dataset: Any
    batch_size: int
    gas: int
    steps_per_epoch: int = 1
    max_steps: int = 0
    batches: list | None = None  # the current epoch's micro-batches of example indices
    epoch_of_batches: int = -1
    window: list = field(default_factory=list)  # this step's micro-batches
    position: int = 0  # micro-batches of the epoch consumed
    progress: Any = None
    window_losses: list = field(default_factory=list)
    window_metrics: dict = field(default_factory=dict)
    losses_sum: float = 0.0
    losses_n: int = 0
    start_time: float = 0.0
    start_step: int = 0
    last_log_time: float = 0.0
    tokens_at_last_log: int = 0
    final_metrics: dict = field(default_factory=dict)
    last_window: dict = field(default_factory=dict)  # the last logged training row
    prepare_seconds: float = 0.0  # wall time in method.prepare_step / the producer since the last log
    producer: Any = None  # the method's RolloutProducer (online methods), else None
    loader: Any = None  # the epoch's DataLoader iterator when dataloader_num_workers > 0
    loader_epoch: int = -1
    loader_position: int = 0  # micro-batches of the epoch the iterator has handed out


class _CollatedMicroBatches:
    """A map-style dataset of collated micro-batches (for DataLoader workers): item ``i`` is ``collate(rows of batches[i])``."""

    def __init__(self, dataset, batches: list[list[int]], collate) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.collate(_rows(self.dataset, self.batches[i]))


def _backend_is_plain(accelerator) -> bool:
    """True without DeepSpeed and FSDP (one process or DDP): the loop, not the backend, writes and reads model weights."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def _producer_of(method) -> RolloutProducer | None:
    """The method's ``producer`` attribute (plugin API 1.5), checked; None for a method without one."""
    producer = getattr(method, "producer", None)
    if producer is None:
        return None
    missing = [name for name in ("next_step", "state_dict", "load_state_dict", "steps_per_epoch", "prompts_per_step") if not hasattr(producer, name)]
    if missing:
        raise TypeError(f"{type(method).__name__}.producer is a {type(producer).__name__}, which lacks {missing}: use a posttrain.RolloutProducer.")
    return producer


def _engage_fsdp_on_cpu(accelerator) -> None:
    """Make an `accelerate launch --use_fsdp` run on CPU (gloo) really use FSDP instead of falling back to DDP.

    ``AcceleratorState()`` re-copies ``PartialState``'s fields whenever it is built, so the type is
    set on both.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if accelerator.state.distributed_type != DistributedType.MULTI_CPU:
        return
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables accelerate launch set


def _shard_frozen_with_deepspeed(model, accelerator):
    """A frozen model in its own ZeRO-3 inference engine: the run's ZeRO settings, no optimizer, no scheduler."""
    import copy as _copy

    import deepspeed

    config = _copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    for key in ("offload_optimizer",):
        zero.pop(key, None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):  # the buckets DeepSpeed sizes from the model when "auto" (as the training engine's)
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # puts the module in eval mode; the engine's own flag too, so `was_training = m.training ... m.train(was_training)` keeps it frozen
    engine.training = False
    return engine


def _shard_frozen_with_fsdp2(model, accelerator):
    """A frozen model sharded with FSDP2: ``fully_shard`` on each decoder layer (the model's ``_no_split_modules``) and the root."""
    from torch.distributed.fsdp import fully_shard

    model = model.to(accelerator.device)
    plugin = accelerator.state.fsdp_plugin
    reshard = getattr(plugin, "reshard_after_forward", True)
    reshard = reshard if isinstance(reshard, bool) else True
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    model.eval()
    return model


def _rows(dataset, indices: list[int]) -> list:
    """Return the rows at ``indices``; a ``datasets.Dataset`` reads them in one call (~4x faster than one by one)."""
    getitems = getattr(dataset, "__getitems__", None)
    return list(getitems(list(indices))) if callable(getitems) else [dataset[i] for i in indices]


def _apply_liger_kernel(model, args: TrainingConfig) -> None:
    """Patch ``model`` with Liger kernels when liger-kernel is installed and a CUDA GPU trains; otherwise say so once."""
    import importlib.util
    import warnings

    if not torch.cuda.is_available() or args.use_cpu or importlib.util.find_spec("liger_kernel") is None:
        why = "liger-kernel is not installed" if importlib.util.find_spec("liger_kernel") is None else "Liger's Triton kernels need a CUDA GPU"
        warnings.warn(f"use_liger_kernel=True: {why}; training uses the PyTorch path (same numerics).", UserWarning, stacklevel=3)
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # methods compute their losses from logits, so Liger's fused linear cross-entropy (no logits) stays off unless asked
    _apply_liger_kernel_to_instance(model=base, **{"fused_linear_cross_entropy": False, **(args.liger_kernel_config or {})})


def _attach_neftune(model, alpha: float) -> None:
    """NEFTune (Jain et al. 2023, arXiv:2310.05914): add uniform noise of scale alpha / sqrt(L * d) to input embeddings while training."""
    embeddings = model.get_input_embeddings()

    def hook(module, inputs, output):
        if module.training:
            scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
            output = output + torch.zeros_like(output).uniform_(-scale, scale)
        return output

    embeddings.register_forward_hook(hook)


def _kwargs_handlers(args: TrainingConfig) -> list:
    """accelerate kwargs handlers for the DDP and process-group fields of TrainingArguments."""
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout), **({"backend": args.ddp_backend} if args.ddp_backend else {}))]
    ddp = {k: v for k, v in (("find_unused_parameters", args.ddp_find_unused_parameters), ("bucket_cap_mb", args.ddp_bucket_cap_mb),
                            ("broadcast_buffers", args.ddp_broadcast_buffers), ("static_graph", args.ddp_static_graph)) if v is not None}
    if ddp:
        handlers.append(DistributedDataParallelKwargs(**ddp))
    return handlers


def _parse_optim_args(text: str | None) -> dict:
    """Parse ``optim_args`` ('momentum=0.9,nesterov=True') into keyword arguments."""
    out: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value.strip().lower() if value.strip() in ("True", "False") else value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out


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
