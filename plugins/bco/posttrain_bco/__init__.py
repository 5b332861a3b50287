"""posttrain-bco: Binary Classifier Optimization on unpaired (prompt, completion, label) data (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_bco._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.bco import BCOConfig, BCOTrainer
"""

from __future__ import annotations

__all__ = ["BCOConfig", "BCOTrainer"]


def __getattr__(name: str):
    if name == "BCOConfig":
        from posttrain_bco.config import BCOConfig

        return BCOConfig
    if name == "BCOTrainer":
        from posttrain_bco.trainer import BCOTrainer

        return BCOTrainer
    raise AttributeError(f"module 'posttrain_bco' has no attribute {name!r}")
