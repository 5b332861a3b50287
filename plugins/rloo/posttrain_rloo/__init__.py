"""posttrain-rloo: REINFORCE Leave-One-Out (and REINFORCE++) (light: no torch at import).

Use it through the gate::

    from posttrain.methods.rloo import RLOOTrainer, RLOOConfig

``RLOOConfig`` and ``RLOOTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["RLOOConfig", "RLOOTrainer"]

_LAZY = {"RLOOConfig": "posttrain_rloo.config", "RLOOTrainer": "posttrain_rloo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_rloo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
