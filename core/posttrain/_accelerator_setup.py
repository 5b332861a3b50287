"""The loop's part that builds the accelerator and answers backend questions (devices, ZeRO stage, FSDP2).

:class:`_AcceleratorSetup` is a mixin of :class:`posttrain.TrainingLoop`: ``_build_accelerator``
turns the config into an ``accelerate.Accelerator`` (mixed precision, DeepSpeed config, DDP and
process-group kwargs, FSDP and DeepSpeed on CPU, the fast ``unwrap_model``), and the properties tell
the rest of the loop which backend runs (``is_deepspeed``, ``zero_stage``, ``_is_fsdp2``). The module
functions are the pieces that need no loop.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from posttrain.config import ConfigError, TrainingConfig


class _AcceleratorSetup:
    """The accelerator of a :class:`posttrain.TrainingLoop` and the backend it runs (reads ``self.args``, ``self.accelerator``)."""

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

    def _set_sync(self, sync: bool) -> None:
        # accelerate decides when DeepSpeed/optimizer wrappers really step from this flag; we set it
        # per micro-batch ourselves so an epoch's last, shorter accumulation window still steps.
        self.accelerator.gradient_state._set_sync_gradients(sync)


def _backend_is_plain(accelerator) -> bool:
    """True without DeepSpeed and FSDP (one process or DDP): the loop, not the backend, writes and reads model weights."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)


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
