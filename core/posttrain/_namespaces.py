"""Import namespaces ``posttrain.methods.<name>`` (stable) and ``posttrain.experimental.<name>``.

A meta-path finder builds each ``posttrain.<namespace>.<name>`` module on import: it activates the
method through the maturity gate and exposes the trainer class (under its own class name), the
config class and every name in the trainer module's ``__all__``. Importing through
``posttrain.experimental`` is itself the opt-in for an experimental method.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

__all__ = ["install_finder", "NAMESPACES"]

#: Namespace package -> the maturity it serves.
NAMESPACES = {"posttrain.methods": "stable", "posttrain.experimental": "experimental"}


class _MethodModuleLoader(importlib.abc.Loader):
    """Create ``posttrain.<namespace>.<name>`` from the method's activation."""

    def __init__(self, namespace: str, method: str) -> None:
        self.namespace = namespace
        self.method = method

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        from posttrain import _registry

        fullname = spec.name
        try:
            info = _registry.default_registry().get_info(self.method)
        except _registry.MethodNotFoundError as exc:
            raise ModuleNotFoundError(f"No module named {fullname!r}: {exc}", name=fullname) from None
        wanted = NAMESPACES[self.namespace]
        if info.maturity in NAMESPACES.values() and info.maturity != wanted:
            right = "posttrain.methods" if info.maturity == "stable" else "posttrain.experimental"
            raise _registry.WrongNamespaceError(
                f"posttrain method {info.name!r} is {info.maturity}, so it is not in {self.namespace}: "
                f"import it as `from {right}.{info.name} import ...`.",
                name=fullname,
            )
        activation = _registry.default_registry().activate(
            self.method, allow_experimental=(wanted == "experimental"), via="experimental"
        )
        module = types.ModuleType(fullname, f"posttrain method {info.name!r} ({info.distribution} {info.version}).")
        trainer_cls, config_cls = activation.trainer_cls, activation.config_cls
        exported = {trainer_cls.__name__: trainer_cls, config_cls.__name__: config_cls}
        trainer_module = sys.modules.get(trainer_cls.__module__)
        for name in getattr(trainer_module, "__all__", ()):
            exported[name] = getattr(trainer_module, name)
        module.__dict__.update(exported)
        module.__all__ = sorted(exported)
        module.__posttrain_activation__ = activation
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing to execute: :meth:`create_module` filled the module."""


class _MethodFinder(importlib.abc.MetaPathFinder):
    """Answer imports of ``posttrain.methods.<name>`` and ``posttrain.experimental.<name>``."""

    def find_spec(self, fullname, path=None, target=None):
        namespace, _, method = fullname.rpartition(".")
        if namespace not in NAMESPACES or not method:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MethodModuleLoader(namespace, method))


def install_finder() -> None:
    """Put the namespace finder on ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(finder, _MethodFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MethodFinder())


def namespace_getattr(namespace: str, name: str):
    """Implement ``posttrain.<namespace>.<name>`` attribute access by importing the submodule."""
    if name.startswith("__"):
        raise AttributeError(f"module {namespace!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{namespace}.{name}")
    except ModuleNotFoundError as exc:  # keep hasattr() working for unknown names
        raise AttributeError(str(exc)) from None
