"""The loop's record of a run: the manifest, logged metrics (``metrics.jsonl``, trackers, hooks) and callbacks.

:class:`_RunLog` is a mixin of :class:`posttrain.TrainingLoop`: ``_build_manifest`` (what ran, with
which config and versions), ``log`` (one row everywhere), the training window's means
(``_log_due``, ``_log_window``), diagnostics sent to trackers, and the transformers callback events
(``_event``) through :class:`CallbackList`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any

import torch

from posttrain import API_VERSION, __version__


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


class _RunLog:
    """Manifest, logging and callback events of a :class:`posttrain.TrainingLoop` (reads ``self.args``, ``self.state``, ``self.accelerator``)."""

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

    def _log_due(self, step: int, run: "_Run") -> bool:
        args = self.args
        if args.logging_strategy == "no":
            return False
        if step == run.max_steps or (step == 1 and args.logging_first_step):
            return True
        if args.logging_strategy == "epoch":
            return self.state.batches_in_epoch + len(run.window) >= len(run.batches)
        return step % args.logging_steps == 0

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
