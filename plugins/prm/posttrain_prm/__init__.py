"""posttrain-prm: process reward models, trained as TRL's PRMTrainer did, and a reward function that scores step by step (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_prm._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.prm import PRMConfig, PRMTrainer, ProcessRewardFunction
"""

from __future__ import annotations

__all__ = ["PRMConfig", "PRMTrainer", "ProcessRewardFunction"]


def __getattr__(name: str):
    if name == "PRMConfig":
        from posttrain_prm.config import PRMConfig

        return PRMConfig
    if name == "PRMTrainer":
        from posttrain_prm.trainer import PRMTrainer

        return PRMTrainer
    if name == "ProcessRewardFunction":
        from posttrain_prm.reward import ProcessRewardFunction

        return ProcessRewardFunction
    raise AttributeError(f"module 'posttrain_prm' has no attribute {name!r}")
