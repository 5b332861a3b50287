"""posttrain-xpo: Exploratory Preference Optimization (light: no torch at import).

Use it through the gate (experimental: opt in first)::

    import posttrain
    posttrain.activate("xpo", allow_experimental=True)
    from posttrain.experimental.xpo import XPOConfig, XPOTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["XPOConfig", "XPOTrainer"]

_LAZY = {"XPOConfig": "posttrain_xpo.config", "XPOTrainer": "posttrain_xpo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_xpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
