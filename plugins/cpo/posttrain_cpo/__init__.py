"""posttrain-cpo: reference-free preference optimization (CPO, SimPO, AlphaPO).

Keep this file light: ``posttrain list`` imports ``posttrain_cpo._spec``, which imports this package
first. Use the method through the gate::

    from posttrain.experimental.cpo import CPOConfig, CPOTrainer
"""

from __future__ import annotations

__all__ = ["CPOConfig", "CPOTrainer"]


def __getattr__(name: str):
    if name == "CPOConfig":
        from posttrain_cpo.config import CPOConfig

        return CPOConfig
    if name == "CPOTrainer":
        from posttrain_cpo.trainer import CPOTrainer

        return CPOTrainer
    raise AttributeError(f"module 'posttrain_cpo' has no attribute {name!r}")
