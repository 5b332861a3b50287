"""posttrain-distill: on-policy knowledge distillation (TRL 1.16's ``DistillationTrainer``) (light: no torch at import).

Use it through the gate::

    from posttrain.methods.distill import DistillationConfig, DistillationTrainer

``DistillationConfig`` and ``DistillationTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DistillationConfig", "DistillationTrainer"]

_LAZY = {"DistillationConfig": "posttrain_distill.config", "DistillationTrainer": "posttrain_distill.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_distill' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
