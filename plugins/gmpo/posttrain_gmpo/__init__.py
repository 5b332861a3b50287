"""posttrain-gmpo: GMPO (Geometric-Mean Policy Optimization: GRPO with the geometric mean of log-space-clipped token ratios) (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_gmpo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.gmpo import GMPOConfig, GMPOTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GMPOConfig", "GMPOTrainer"]

_LAZY = {"GMPOConfig": "posttrain_gmpo.config", "GMPOTrainer": "posttrain_gmpo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_gmpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
