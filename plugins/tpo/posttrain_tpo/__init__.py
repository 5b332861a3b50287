"""posttrain-tpo: Triple Preference Optimization, TPO and TPO-L (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_tpo._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.tpo import TPOConfig, TPOTrainer
"""

from __future__ import annotations

__all__ = ["TPOConfig", "TPOTrainer"]


def __getattr__(name: str):
    if name == "TPOConfig":
        from posttrain_tpo.config import TPOConfig

        return TPOConfig
    if name == "TPOTrainer":
        from posttrain_tpo.trainer import TPOTrainer

        return TPOTrainer
    raise AttributeError(f"module 'posttrain_tpo' has no attribute {name!r}")
