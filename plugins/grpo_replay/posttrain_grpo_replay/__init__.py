"""posttrain-grpo-replay: GRPO with a replay buffer of high-variance groups (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_grpo_replay._spec``, which imports this
package first. Use the method through the gate (the old TRL's names)::

    from posttrain.experimental.grpo_replay import GRPOWithReplayBufferConfig, GRPOWithReplayBufferTrainer, ReplayBuffer
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GRPOWithReplayBufferConfig", "GRPOWithReplayBufferTrainer", "ReplayBuffer"]

_LAZY = {"GRPOWithReplayBufferConfig": "posttrain_grpo_replay.config", "GRPOWithReplayBufferTrainer": "posttrain_grpo_replay.trainer",
         "ReplayBuffer": "posttrain_grpo_replay.trainer"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'posttrain_grpo_replay' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
