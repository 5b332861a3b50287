"""posttrain-remax: ReMax, REINFORCE with the greedy completion's reward as baseline (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_remax._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.remax import ReMaxConfig, ReMaxTrainer
"""

from __future__ import annotations

__all__ = ["ReMaxConfig", "ReMaxTrainer"]


def __getattr__(name: str):
    if name == "ReMaxConfig":
        from posttrain_remax.config import ReMaxConfig

        return ReMaxConfig
    if name == "ReMaxTrainer":
        from posttrain_remax.trainer import ReMaxTrainer

        return ReMaxTrainer
    raise AttributeError(f"module 'posttrain_remax' has no attribute {name!r}")
