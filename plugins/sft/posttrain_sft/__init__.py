"""posttrain-sft: supervised fine-tuning for posttrain (light: importing this imports no torch).

``SFTTrainer`` and ``SFTConfig`` are resolved lazily, so the registry can import
``posttrain_sft._spec`` without pulling in torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SFTConfig", "SFTTrainer"]

_LAZY = {"SFTTrainer": "posttrain_sft.trainer", "SFTConfig": "posttrain_sft.config"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'posttrain_sft' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
