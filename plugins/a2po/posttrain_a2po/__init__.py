"""posttrain-a2po: A*-PO (Optimal Advantage Regression: offline V* estimation from reference samples, then on-policy least-squares regression) (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_a2po._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.a2po import A2POConfig, A2POTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["A2POConfig", "A2POTrainer"]

_LAZY = {"A2POConfig": "posttrain_a2po.config", "A2POTrainer": "posttrain_a2po.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_a2po' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
