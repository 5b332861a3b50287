"""posttrain-gkd: Generalized Knowledge Distillation, GKD (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_gkd._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.gkd import GKDConfig, GKDTrainer
"""

from __future__ import annotations

__all__ = ["GKDConfig", "GKDTrainer"]


def __getattr__(name: str):
    if name == "GKDConfig":
        from posttrain_gkd.config import GKDConfig

        return GKDConfig
    if name == "GKDTrainer":
        from posttrain_gkd.trainer import GKDTrainer

        return GKDTrainer
    raise AttributeError(f"module 'posttrain_gkd' has no attribute {name!r}")
