"""posttrain-ssd: Simple Self-Distillation (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_ssd._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.ssd import SSDConfig, SSDTrainer
"""

from __future__ import annotations

__all__ = ["SSDConfig", "SSDTrainer"]


def __getattr__(name: str):
    if name == "SSDConfig":
        from posttrain_ssd.config import SSDConfig

        return SSDConfig
    if name == "SSDTrainer":
        from posttrain_ssd.trainer import SSDTrainer

        return SSDTrainer
    raise AttributeError(f"module 'posttrain_ssd' has no attribute {name!r}")
