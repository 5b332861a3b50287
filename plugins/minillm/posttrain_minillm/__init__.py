"""posttrain-minillm: MiniLLM, knowledge distillation by reverse-KL policy gradient (experimental; light: no torch at import).

Opt in, then import through the gate::

    import posttrain
    posttrain.activate("minillm", allow_experimental=True)
    from posttrain.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

``MiniLLMConfig`` and ``MiniLLMTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MiniLLMConfig", "MiniLLMTrainer"]

_LAZY = {"MiniLLMConfig": "posttrain_minillm.config", "MiniLLMTrainer": "posttrain_minillm.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_minillm' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
