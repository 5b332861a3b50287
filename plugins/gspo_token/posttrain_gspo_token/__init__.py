"""posttrain-gspo-token: GSPO-token, the token-level variant of GSPO (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_gspo_token._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.gspo_token import GSPOTokenConfig, GSPOTokenTrainer

(``GRPOConfig`` / ``GRPOTrainer``, the old TRL's names in ``trl.experimental.gspo_token``, are aliases.)
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GSPOTokenConfig", "GSPOTokenTrainer"]

_LAZY = {"GSPOTokenConfig": "posttrain_gspo_token.config", "GSPOTokenTrainer": "posttrain_gspo_token.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_gspo_token' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
