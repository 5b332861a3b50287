"""posttrain-iw-opd: Importance-Weighted On-Policy Distillation, IW-OPD (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_iw_opd._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.iw_opd import IWOPDConfig, IWOPDTrainer
"""

from __future__ import annotations

__all__ = ["IWOPDConfig", "IWOPDTrainer"]


def __getattr__(name: str):
    if name == "IWOPDConfig":
        from posttrain_iw_opd.config import IWOPDConfig

        return IWOPDConfig
    if name == "IWOPDTrainer":
        from posttrain_iw_opd.trainer import IWOPDTrainer

        return IWOPDTrainer
    raise AttributeError(f"module 'posttrain_iw_opd' has no attribute {name!r}")
