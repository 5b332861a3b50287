"""posttrain-sdft: SDFT, on-policy self-distillation with privileged context (experimental; light: no torch at import).

Use it through the gate, after opting in::

    import posttrain
    posttrain.activate("sdft", allow_experimental=True)
    from posttrain.experimental.sdft import SDFTConfig, SDFTTrainer

``SDFTConfig`` and ``SDFTTrainer`` are also importable from here (resolved lazily on first access).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SDFTConfig", "SDFTTrainer"]

_LAZY = {"SDFTConfig": "posttrain_sdft.config", "SDFTTrainer": "posttrain_sdft.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_sdft' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
