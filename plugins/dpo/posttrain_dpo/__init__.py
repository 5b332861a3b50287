"""posttrain-dpo: Direct Preference Optimization and its paper variants.

Keep this file light: ``posttrain list`` imports ``posttrain_dpo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.methods.dpo import DPOTrainer, DPOConfig
"""

from __future__ import annotations

__all__ = ["DPOConfig", "DPOTrainer"]


def __getattr__(name: str):
    if name == "DPOConfig":
        from posttrain_dpo.config import DPOConfig

        return DPOConfig
    if name == "DPOTrainer":
        from posttrain_dpo.trainer import DPOTrainer

        return DPOTrainer
    raise AttributeError(f"module 'posttrain_dpo' has no attribute {name!r}")
