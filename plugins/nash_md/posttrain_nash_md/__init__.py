"""posttrain-nash-md: Nash learning from human feedback by mirror descent (light: no torch at import).

Use it through the gate (experimental: opt in first)::

    import posttrain
    posttrain.activate("nash_md", allow_experimental=True)
    from posttrain.experimental.nash_md import NashMDConfig, NashMDTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["NashMDConfig", "NashMDTrainer"]

_LAZY = {"NashMDConfig": "posttrain_nash_md.config", "NashMDTrainer": "posttrain_nash_md.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_nash_md' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
