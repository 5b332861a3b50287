"""posttrain-orpo: Odds Ratio Preference Optimization (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_orpo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.orpo import ORPOConfig, ORPOTrainer
"""

from __future__ import annotations

__all__ = ["ORPOConfig", "ORPOTrainer"]


def __getattr__(name: str):
    if name == "ORPOConfig":
        from posttrain_orpo.config import ORPOConfig

        return ORPOConfig
    if name == "ORPOTrainer":
        from posttrain_orpo.trainer import ORPOTrainer

        return ORPOTrainer
    raise AttributeError(f"module 'posttrain_orpo' has no attribute {name!r}")
