"""posttrain-kto: Kahneman-Tversky Optimization on unpaired (prompt, completion, label) data.

Keep this file light: ``posttrain list`` imports ``posttrain_kto._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.methods.kto import KTOTrainer, KTOConfig
"""

from __future__ import annotations

__all__ = ["KTOConfig", "KTOTrainer"]


def __getattr__(name: str):
    if name == "KTOConfig":
        from posttrain_kto.config import KTOConfig

        return KTOConfig
    if name == "KTOTrainer":
        from posttrain_kto.trainer import KTOTrainer

        return KTOTrainer
    raise AttributeError(f"module 'posttrain_kto' has no attribute {name!r}")
