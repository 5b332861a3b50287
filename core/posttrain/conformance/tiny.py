"""A few-step run of any installed method on a tiny model, built exactly as a user would build it.

Used by the conformance suite and by ``posttrain snapshot`` (the metric names a short run logs are
part of a stable plugin's surface). Imports no pytest.
"""

from __future__ import annotations

import dataclasses
import importlib
import tempfile
from typing import Any

__all__ = ["SMALL_RUN", "build_tiny_trainer", "tiny_teacher_beside", "logged_metric_names", "method_classes", "run_metric_names"]

#: Config values of every conformance run (``MethodSpec.tiny_run`` goes over them).
SMALL_RUN = {
    "max_steps": 3,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "disable_tqdm": True,
    "gradient_checkpointing": False,
    "seed": 0,
}


def method_classes(info: Any) -> tuple[type, type]:
    """Return ``(config_cls, trainer_cls)`` of an installed method, opting in when it is experimental."""
    import posttrain

    if info.maturity == "experimental":
        posttrain.activate(info.name, allow_experimental=True)
    found = []
    for path in (info.spec.config, info.spec.trainer):
        module, attr = path.split(":")
        found.append(getattr(importlib.import_module(module), attr))
    return found[0], found[1]


def tiny_teacher_beside(model_dir: str) -> str:
    """A tiny random teacher for the model at ``model_dir``: same tokenizer, hidden size 48, seed 1; written once beside it."""
    import os

    from posttrain.testing.tiny_model import save_tiny_model

    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), os.path.basename(os.path.normpath(model_dir)) + "-conformance-teacher")
    if not os.path.isfile(os.path.join(path, "config.json")):
        save_tiny_model(path, hidden_size=48, seed=1)
    return path


def build_tiny_trainer(info: Any, model_dir: str, output_dir: str, **overrides: Any) -> Any:
    """Build ``info``'s trainer on the model at ``model_dir`` and a 16-row dataset of ``spec.data_format``.

    The config is ``SMALL_RUN``, then ``spec.tiny_run``, then ``overrides``. A config with a
    ``teacher_model_name_or_path`` field that none of them sets (a distillation method) gets
    :func:`tiny_teacher_beside` ``(model_dir)`` as its teacher: same vocabulary, other weights (a
    student distilled from itself has a zero loss and would not train).

    Raises:
        ValueError: the spec declares no ``data_format``.
    """
    from posttrain.testing import make_tiny_datasets

    if not info.spec.data_format:
        raise ValueError(
            f"MethodSpec(name={info.name!r}).data_format is empty: declare the dataset format the method trains on "
            "(one of posttrain.DATA_FORMATS) so a tiny run can be built."
        )
    config_cls, trainer_cls = method_classes(info)
    values = {**SMALL_RUN, **info.spec.tiny_run, **overrides}
    if values.get("teacher_model_name_or_path") is None and "teacher_model_name_or_path" in {f.name for f in dataclasses.fields(config_cls)}:
        values["teacher_model_name_or_path"] = tiny_teacher_beside(model_dir)
    args = config_cls(output_dir=output_dir, **values)
    data = make_tiny_datasets(n=16)[info.spec.data_format]
    return trainer_cls(model=model_dir, args=args, train_dataset=data)


def logged_metric_names(trainer: Any) -> list[str]:
    """Return every key the trainer's ``state.log_history`` rows hold, sorted."""
    return sorted({key for row in trainer.state.log_history for key in row})


def run_metric_names(info: Any) -> list[str]:
    """Train ``info``'s method for ``SMALL_RUN['max_steps']`` steps on a fresh tiny model; return the logged metric names."""
    import torch

    from posttrain.testing.tiny_model import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_model(f"{tmp}/model")
        torch.manual_seed(0)
        trainer = build_tiny_trainer(info, model_dir, f"{tmp}/run")
        trainer.train()
        return logged_metric_names(trainer)
