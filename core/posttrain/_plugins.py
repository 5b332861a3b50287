"""Build the pluggy manager for cross-cutting plugins (hooks in :mod:`posttrain.hookspecs`)."""

from __future__ import annotations

import os
import warnings
from importlib.metadata import entry_points

import pluggy

from posttrain import hookspecs

__all__ = ["get_plugin_manager", "PLUGIN_GROUP", "DEFAULT_PLUGINS"]

#: Entry-point group of cross-cutting plugins (loggers, diagnostics, rewards, rollout backends).
PLUGIN_GROUP = "posttrain.plugins"

#: Core modules that register built-ins through the same hooks third-party plugins use.
DEFAULT_PLUGINS = ("posttrain._builtin_plugins",)


_MANAGER: pluggy.PluginManager | None = None  # the process-wide manager, built on first use


def get_plugin_manager(*, load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Return the process's plugin manager: the built-in plugins and every installed ``posttrain.plugins`` entry point.

    The manager is built once per process and shared by every trainer, reward lookup and rollout
    backend lookup, so a hook module registered at run time
    (``posttrain.get_plugin_manager().register(my_hooks)``) fires in every later training run.
    Each entry point is loaded in its own try/except: a broken plugin is reported with a warning
    naming it and the error, and the others still load. ``POSTTRAIN_DISABLE_PLUGINS=a,b`` skips
    entry points by name before importing them (read when the manager is built).

    Args:
        load_entrypoints: Load installed third-party plugins. False returns a new, isolated
            manager with only the built-ins (tests use it), never the shared one.

    Returns:
        A :class:`pluggy.PluginManager`.
    """
    global _MANAGER
    if not load_entrypoints:
        return _build(load_entrypoints=False)
    if _MANAGER is None:
        _MANAGER = _build(load_entrypoints=True)
    return _MANAGER


def _reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests only): the next call builds a new one."""
    global _MANAGER
    _MANAGER = None


def _build(*, load_entrypoints: bool) -> pluggy.PluginManager:
    import importlib

    pm = pluggy.PluginManager("posttrain")
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if load_entrypoints:
        disabled = {n.strip() for n in os.environ.get("POSTTRAIN_DISABLE_PLUGINS", "").split(",") if n.strip()}
        for ep in entry_points(group=PLUGIN_GROUP):
            if ep.name in disabled or pm.has_plugin(ep.name):
                continue
            try:
                pm.register(ep.load(), name=ep.name)
                # validate at registration, per plugin: a misspelled hook name is reported for
                # this plugin only instead of failing the whole manager
                pm.check_pending()
            except Exception as exc:  # one broken plugin never breaks the others
                if pm.has_plugin(ep.name):
                    pm.unregister(name=ep.name)
                dist = getattr(ep.dist, "name", "?")
                warnings.warn(
                    f"posttrain plugin {ep.name!r} (distribution {dist}) failed to load and is skipped: "
                    f"{type(exc).__name__}: {exc}. Fix or uninstall it, or set POSTTRAIN_DISABLE_PLUGINS={ep.name}.",
                    stacklevel=2,
                )
    pm.check_pending()
    return pm


def collect_registrations(pm: pluggy.PluginManager, hook_name: str) -> dict:
    """Call a ``register_*`` hook and return ``{name: object}``; a name registered twice raises naming both."""
    found: dict = {}
    owners: dict = {}

    def make_register(owner: str):
        def register(name: str, obj) -> None:
            if name in found:
                raise ValueError(
                    f"{hook_name}: name {name!r} is registered by both {owners[name]!r} and {owner!r}; "
                    "rename one of them or disable a plugin with POSTTRAIN_DISABLE_PLUGINS."
                )
            found[name] = obj
            owners[name] = owner

        return register

    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        impl.function(register=make_register(impl.plugin_name))
    return found
