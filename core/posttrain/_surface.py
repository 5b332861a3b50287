"""TRL's trainer surface, delegated to the loop: ``train``, ``evaluate``, ``save_model``, ``state``, callbacks, ...

A method's trainer mixes in :class:`TrainerSurface` and sets ``self.loop`` (a
:class:`posttrain.TrainingLoop`) and ``self.args``; everything a TRL/transformers user calls on a
trainer then works the same on every method, and no plugin re-implements it. The mixin holds no
method logic and no state of its own: each member forwards to the loop. (DESIGN.md's "no base
classes" is about method logic, which stays in each plugin; this is the user surface.)

A trainer that evaluates datasets given to ``evaluate(eval_dataset=...)`` defines
``process_dataset(dataset, name)`` (see :class:`posttrain.OptionalMethodMembers`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainerSurface"]


class TrainerSurface:
    """The transformers/TRL ``Trainer`` user surface for a posttrain method trainer.

    Needs ``self.loop`` (the :class:`~posttrain.TrainingLoop`) and ``self.args``. Provides
    ``train``, ``evaluate``, ``save_model``, ``push_to_hub``, ``log``, ``state``, ``control``,
    ``accelerator``, ``callback_handler``, ``add_callback`` / ``pop_callback`` /
    ``remove_callback``, ``is_world_process_zero`` and ``is_local_process_zero``.
    """

    loop: Any
    args: Any

    # -- training -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, ignore_keys_for_eval: Any = None, **kwargs: Any):
        """Train and return ``TrainOutput(global_step, training_loss, metrics)``; the final model is saved to ``output_dir``.

        Args:
            resume_from_checkpoint: A ``checkpoint-<step>`` directory, or True for the latest in
                ``output_dir`` (default: ``args.resume_from_checkpoint``).
            trial: Accepted for transformers compatibility (hyperparameter search is not offered).
            ignore_keys_for_eval: Accepted for transformers compatibility.
        """
        if trial is not None:
            raise ValueError("trial= (hyperparameter search) is not offered by posttrain: run one trainer per configuration.")
        return self.loop.train(self, resume_from_checkpoint=resume_from_checkpoint, **self._train_kwargs())

    def _train_kwargs(self) -> dict:
        """Extra keyword arguments of ``loop.train`` (an online method passes ``micro_batches_per_step``)."""
        return {}

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score ``eval_dataset`` (default: the trainer's) and return ``{<prefix>_<metric>: value}``; also logged.

        Args:
            eval_dataset: A raw dataset (processed like the trainer's), or a dict / ``DatasetDict``
                of them (metrics ``<prefix>_<name>_<metric>``); default: the trainer's eval set.
            ignore_keys: Accepted for transformers compatibility.
            metric_key_prefix: Prefix of the metric names.

        Raises:
            ValueError: no eval dataset was given here or at construction.
        """
        if eval_dataset is None:
            dataset = getattr(self, "eval_dataset", None)
            if dataset is None:
                raise ValueError("Trainer: evaluation requires an eval_dataset: pass eval_dataset= to the trainer or to evaluate().")
            processed = self._processed_eval_dataset()
        elif _is_dict_of_datasets(eval_dataset):
            processed = {name: self._process_for_eval(part, f"eval_dataset[{name!r}]") for name, part in eval_dataset.items()}
        else:
            processed = self._process_for_eval(eval_dataset, "eval_dataset")
        return self.loop.evaluate_and_record(self, processed, metric_key_prefix=metric_key_prefix)

    def _processed_eval_dataset(self):
        """The trainer's processed eval set (a trainer that keeps raw and processed sets apart overrides this)."""
        return getattr(self, "eval_dataset", None)

    def _process_for_eval(self, dataset: Any, name: str):
        process = getattr(self, "process_dataset", None)
        if process is None:
            raise ValueError(f"{type(self).__name__} cannot evaluate a new dataset: it defines no process_dataset(dataset, name).")
        return process(dataset, name)

    # -- saving -----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (safetensors; an adapter under PEFT) and tokenizer to ``output_dir`` (default ``args.output_dir``)."""
        self.loop.save_model(output_dir or self.args.output_dir)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, **kwargs: Any) -> Any:
        """Save the model to ``output_dir`` and upload it to ``args.hub_model_id`` on the Hub."""
        self.save_model()
        return self.loop.push_to_hub(commit_message=commit_message or "End of training", blocking=blocking)

    # -- logging and state ------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Log ``logs`` like the loop's own metrics (``metrics.jsonl``, ``state.log_history``, trackers, callbacks)."""
        self.loop.log(dict(logs))

    @property
    def state(self):
        """The loop's ``TrainerState``: ``global_step``, ``epoch``, ``max_steps``, ``log_history``, ``best_metric``, ..."""
        return self.loop.state

    @property
    def control(self):
        """The ``TrainerControl`` shared with callbacks."""
        return self.loop.control

    @property
    def accelerator(self):
        return self.loop.accelerator

    @accelerator.setter
    def accelerator(self, value) -> None:  # transformers' Trainer lets code replace it (TRL's tests patch it)
        self.loop.accelerator = value

    @property
    def callback_handler(self):
        """The callbacks (``.callbacks`` lists them), as transformers' ``CallbackHandler``."""
        return self.loop.callbacks

    def add_callback(self, callback: Any) -> None:
        """Add a ``TrainerCallback`` (class or instance)."""
        self.loop.callbacks.add(callback)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return a callback (class or instance); None when absent."""
        return self.loop.callbacks.pop(callback)

    def remove_callback(self, callback: Any) -> None:
        """Remove a callback (class or instance)."""
        self.loop.callbacks.remove(callback)

    def is_world_process_zero(self) -> bool:
        return self.loop.accelerator.is_main_process

    def is_local_process_zero(self) -> bool:
        return self.loop.accelerator.is_local_main_process


def _is_dict_of_datasets(value: Any) -> bool:
    return isinstance(value, dict)
