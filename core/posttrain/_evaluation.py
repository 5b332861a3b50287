"""The loop's evaluation: scoring eval sets, the user's ``compute_metrics``, eval rows and the best metric.

:class:`_Evaluation` is a mixin of :class:`posttrain.TrainingLoop`: ``evaluate`` (the item-weighted
mean of ``compute_loss``'s loss and metrics across processes, or the method's ``evaluate_batches``),
``evaluate_and_record`` / ``record_evaluation`` (a log row per eval set, ``on_evaluate``) and
``_track_best`` (``metric_for_best_model``).
"""

from __future__ import annotations

import time

import torch

from posttrain._data_order import _rows
from posttrain.config import ConfigError


class _Evaluation:
    """Evaluation of a :class:`posttrain.TrainingLoop` (reads ``self.args``, ``self.model``, ``self.accelerator``; logs with ``self.log``)."""

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

    def _last_logged_step_has_eval(self) -> bool:
        """Whether the current step was already evaluated (eval_strategy hit the last step)."""
        for row in reversed(self.state.log_history):
            if row.get("step") != self.state.global_step:
                return False
            if any(k.startswith("eval_") for k in row):
                return True
        return False
