"""posttrain-ppo: PPO for language models, TRL's ``PPOTrainer`` (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_ppo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.ppo import PPOConfig, PPOTrainer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PPOConfig", "PPOTrainer"]

_LAZY = {"PPOConfig": "posttrain_ppo.config", "PPOTrainer": "posttrain_ppo.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_ppo' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
