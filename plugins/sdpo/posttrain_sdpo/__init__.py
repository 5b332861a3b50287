"""posttrain-sdpo: SDPO, reinforcement learning via self-distillation (experimental; light: no torch at import).

Use it through the gate, after opting in::

    import posttrain
    posttrain.activate("sdpo", allow_experimental=True)
    from posttrain.experimental.sdpo import SDPOConfig, SDPOTrainer

``SDPOConfig`` and ``SDPOTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SDPOConfig", "SDPOTrainer"]

_LAZY = {"SDPOConfig": "posttrain_sdpo.config", "SDPOTrainer": "posttrain_sdpo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_sdpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
