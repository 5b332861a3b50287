"""posttrain-online-dpo: Online DPO / OAIF (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_online_dpo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["OnlineDPOConfig", "OnlineDPOTrainer"]

_LAZY = {"OnlineDPOConfig": "posttrain_online_dpo.config", "OnlineDPOTrainer": "posttrain_online_dpo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_online_dpo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
