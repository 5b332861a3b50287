"""posttrain-reward: train outcome reward models (Bradley-Terry) on preference pairs.

Keep this file light: ``posttrain list`` imports ``posttrain_reward._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.methods.reward import RewardTrainer, RewardConfig
"""

from __future__ import annotations

__all__ = ["RewardConfig", "RewardTrainer"]


def __getattr__(name: str):
    if name == "RewardConfig":
        from posttrain_reward.config import RewardConfig

        return RewardConfig
    if name == "RewardTrainer":
        from posttrain_reward.trainer import RewardTrainer

        return RewardTrainer
    raise AttributeError(f"module 'posttrain_reward' has no attribute {name!r}")
