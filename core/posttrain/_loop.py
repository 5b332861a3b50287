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

The other parts live beside this file, as mixins ``TrainingLoop`` inherits (each module says what it
holds): ``_accelerator_setup.py`` (the accelerator and backend questions), ``_data_order.py`` (the
data order), ``_model_io.py`` (loading, placing, saving weights), ``_optimization.py`` (optimizers,
schedules, trainable models beside the policy), ``_run_log.py`` (manifest, logging, callbacks) and
``_evaluation.py`` (evaluation and the best metric).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers import TrainerControl, TrainerState

from posttrain._accelerator_setup import _AcceleratorSetup, _backend_is_plain
from posttrain._checkpoint import describe_run, existing_run, find_latest_checkpoint, load_checkpoint, producer_state_file, read_manifest, remove_run, save_checkpoint
from posttrain._data_order import _CollatedMicroBatches, _DataOrder, _producer_of, _rows
from posttrain._errors import CheckpointNotFoundError
from posttrain._evaluation import _Evaluation
from posttrain._model_io import _ModelIO
from posttrain._optimization import _Auxiliary, _Optimization
from posttrain._protocol import check_method
from posttrain._registry import ensure_activated
from posttrain._run_log import CallbackList, _RunLog
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


class TrainingLoop(_AcceleratorSetup, _DataOrder, _ModelIO, _Optimization, _RunLog, _Evaluation):
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
        self._policy_modules: dict[str, torch.nn.Module] = {}  # add_policy_module: trained with the policy, saved beside it
        self.optimizer = None
        self.scheduler = None
        self._direct_step = False  # set by train(): step the torch optimizer without accelerate's wrapper (see _steps_directly)
        self._clip_params: list = []  # the policy's parameters, listed once per run for the direct clipping
        self.processing_class = None
        self.manifest: dict = {}

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
        if getattr(self.args, "freeze_vision_tower", False):
            from posttrain._vision import freeze_vision_tower, is_vision_model

            if not is_vision_model(model):
                raise ConfigError(f"freeze_vision_tower=True but the model ({type(model).__name__}) is text-only (no vision_config): drop the option.")
            frozen = freeze_vision_tower(model)
            self.accelerator.print(f"[posttrain] freeze_vision_tower: {frozen:,} parameters of the vision encoder frozen")
        config = getattr(model, "config", None)
        if getattr(config, "is_encoder_decoder", False) is True and not getattr(method, "supports_encoder_decoder", False):
            raise ConfigError(
                f"{type(model.get_base_model() if hasattr(model, 'get_base_model') else model).__name__} is an encoder-decoder model, "
                f"but posttrain's {self.method_name!r} trains decoder-only (causal) language models: load a causal LM "
                "(AutoModelForCausalLM), or use a method that supports encoder-decoder models (`posttrain info METHOD`)."
            )

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
        self._direct_step = self._steps_directly()
        self._clip_params = list(self.model.parameters()) if self._direct_step else []  # walked once, not every step
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
            grad_norm = self._clip_grad_norm(args.max_grad_norm)
        elif self._log_due(self.state.global_step + 1, run):  # no clipping, but the logged grad_norm is still wanted
            grad_norm = self._clip_grad_norm(float("inf"))
        learning_rate = self.scheduler.get_last_lr()[0]
        self._event("on_pre_optimizer_step")
        optimizer = self.optimizer.optimizer if self._direct_step else self.optimizer
        optimizer.step()
        self._step_auxiliaries()
        self._event("on_optimizer_step")
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm, learning_rate

    def _steps_directly(self) -> bool:
        """True when accelerate's optimizer wrapper and gradient clipping add nothing to torch's own calls.

        That is one process or DDP (gradients already reduced, not DTensors), no gradient scaler (fp16),
        and a plain torch optimizer inside the wrapper: its ``step`` then only checks for LOMO
        optimizers (a package-metadata lookup, ~0.2 ms a call) before calling the optimizer's, and its
        clipping only sorts parameters by device mesh before ``torch.nn.utils.clip_grad_norm_``'s own
        ops. Calling torch directly does the same arithmetic in the same order (bit-identical results),
        without that per-step Python.
        """
        from accelerate.optimizer import AcceleratedOptimizer

        return (_backend_is_plain(self.accelerator) and getattr(self.accelerator, "scaler", None) is None
                and type(self.optimizer) is AcceleratedOptimizer and isinstance(self.optimizer.optimizer, torch.optim.Optimizer)
                and type(self.optimizer.optimizer).__module__.startswith("torch.optim"))

    def _clip_grad_norm(self, max_norm: float):
        """The policy's gradient norm, clipped to ``max_norm`` (``inf``: measured only)."""
        if not self._direct_step:
            return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        # accelerate's own arithmetic for plain tensors (Accelerator._clip_grad_norm_dtensor_aware), op for op
        params = [p for p in self._clip_params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        total = torch.linalg.vector_norm(torch.stack([norm]), 2.0)
        if max_norm != float("inf"):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

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
