"""posttrain-grpo: Group Relative Policy Optimization and its variants (light: no torch at import).

Use it through the gate::

    from posttrain.methods.grpo import GRPOTrainer, GRPOConfig

``GRPOConfig`` and ``GRPOTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GRPOConfig", "GRPOTrainer"]

_LAZY = {"GRPOConfig": "posttrain_grpo.config", "GRPOTrainer": "posttrain_grpo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_grpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
