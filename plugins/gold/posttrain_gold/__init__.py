"""posttrain-gold: GOLD, general on-policy logit distillation across tokenizers (light: no torch at import).

Use it through the gate (experimental: opt in first)::

    from posttrain.experimental.gold import GOLDConfig, GOLDTrainer

``GOLDConfig`` and ``GOLDTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GOLDConfig", "GOLDTrainer"]

_LAZY = {"GOLDConfig": "posttrain_gold.config", "GOLDTrainer": "posttrain_gold.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_gold' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
