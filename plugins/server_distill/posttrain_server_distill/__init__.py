"""posttrain-server-distill: on-policy distillation from a teacher served over HTTP (experimental).

Keep this file light: ``posttrain list`` imports ``posttrain_server_distill._spec``, which imports this
package first. Use the method through the gate::

    from posttrain.experimental.server_distill import ServerDistillationConfig, ServerDistillationTrainer
"""

from __future__ import annotations

__all__ = ["ServerDistillationConfig", "ServerDistillationTrainer"]


def __getattr__(name: str):
    if name == "ServerDistillationConfig":
        from posttrain_server_distill.config import ServerDistillationConfig

        return ServerDistillationConfig
    if name == "ServerDistillationTrainer":
        from posttrain_server_distill.trainer import ServerDistillationTrainer

        return ServerDistillationTrainer
    raise AttributeError(f"module 'posttrain_server_distill' has no attribute {name!r}")
