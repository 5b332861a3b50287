"""posttrain-prime: PRIME, process reinforcement through implicit rewards (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_prime._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.prime import PRIMEConfig, PRIMETrainer
"""

from __future__ import annotations

__all__ = ["PRIMEConfig", "PRIMETrainer"]


def __getattr__(name: str):
    if name == "PRIMEConfig":
        from posttrain_prime.config import PRIMEConfig

        return PRIMEConfig
    if name == "PRIMETrainer":
        from posttrain_prime.trainer import PRIMETrainer

        return PRIMETrainer
    raise AttributeError(f"module 'posttrain_prime' has no attribute {name!r}")
