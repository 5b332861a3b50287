"""posttrain: post-training for language models, every method a plugin.

Importing ``posttrain`` is light (no torch): the heavy names below are resolved lazily on first
attribute access, so ``posttrain list`` and plugin specs stay fast. Plugins import only names in
``__all__``; everything in ``_private`` modules may change without notice.
"""

from __future__ import annotations

import importlib
from typing import Any

from posttrain._spec import MethodSpec, Preset, SpecError
from posttrain.config import ConfigError, TrainingConfig, closest_field_names, config_fields

#: Version of the plugin contract ("MAJOR.MINOR"). A plugin built for another major, or for a
#: newer minor, is refused (see STABILITY.md).
API_VERSION = "1.0"

try:  # the distribution's version, single-sourced from pyproject.toml
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("posttrain")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

# Heavy names, imported on first access: name -> "module:attribute".
_LAZY = {
    # registry and maturity gate
    "Registry": "posttrain._registry:Registry",
    "MethodInfo": "posttrain._registry:MethodInfo",
    "MethodNotAllowedError": "posttrain._registry:MethodNotAllowedError",
    "MethodNotFoundError": "posttrain._registry:MethodNotFoundError",
    "activate": "posttrain._registry:activate",
    "get_plugin_manager": "posttrain._plugins:get_plugin_manager",
    "hookimpl": "posttrain.hookspecs:hookimpl",
    # training loop shell and checkpoints
    "TrainingLoop": "posttrain._loop:TrainingLoop",
    "TrainingState": "posttrain._loop:TrainingState",
    "find_latest_checkpoint": "posttrain._checkpoint:find_latest_checkpoint",
    "load_dataset_from_config": "posttrain._data:load_dataset_from_config",
    # numerics shared by methods
    "selective_log_softmax": "posttrain._ops:selective_log_softmax",
    "entropy_from_logits": "posttrain._ops:entropy_from_logits",
    "pad": "posttrain._ops:pad",
    # rollout engine
    "RolloutEngine": "posttrain._rollout:RolloutEngine",
    "SamplingParams": "posttrain._rollout:SamplingParams",
    "RolloutBatch": "posttrain._rollout:RolloutBatch",
    "get_rollout_backend": "posttrain._rollout:get_rollout_backend",
}

__all__ = [
    "API_VERSION",
    "ConfigError",
    "MethodSpec",
    "Preset",
    "SpecError",
    "TrainingConfig",
    "__version__",
    "closest_field_names",
    "config_fields",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
