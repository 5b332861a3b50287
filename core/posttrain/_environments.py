"""Environments shipped as their own distributions: the entry-point group ``posttrain.environments`` (plugin API 1.8).

A distribution declares ``[project.entry-points."posttrain.environments"] echo = "my_pkg.envs:EchoEnv"``; the
object is an environment class (TRL's contract: instantiated without arguments, ``reset(**row)``, public methods
are tools, optional ``get_reward()``) or a zero-argument factory returning such instances.
``posttrain list --environments`` shows them with their status; ``load_environment("echo")`` returns the class, for
``environment_factory=`` (which also takes the name itself, or ``"module:attribute"``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass
from typing import Any, Iterable

__all__ = ["ENVIRONMENT_ENTRY_POINT_GROUP", "EnvironmentInfo", "list_environments", "load_environment"]

ENVIRONMENT_ENTRY_POINT_GROUP = "posttrain.environments"


@dataclass(frozen=True)
class EnvironmentInfo:
    """One installed environment: ``status`` is ``"ok"`` or ``"broken"`` (``error`` says why, in one line)."""

    name: str
    target: str
    distribution: str
    version: str
    status: str
    error: str = ""
    tools: tuple[str, ...] = ()
    has_reward: bool = False

    def to_dict(self) -> dict:
        return {**asdict(self), "tools": list(self.tools)}


def _entry_points(entry_points: Iterable[Any] | None) -> list:
    if entry_points is not None:
        return [ep for ep in entry_points if getattr(ep, "group", ENVIRONMENT_ENTRY_POINT_GROUP) == ENVIRONMENT_ENTRY_POINT_GROUP]
    from importlib.metadata import entry_points as installed

    return list(installed(group=ENVIRONMENT_ENTRY_POINT_GROUP))


def _describe(obj: Any) -> tuple[tuple[str, ...], bool, str]:
    """(tool names, has get_reward, problem) of an environment class or factory, without instantiating it when it is a class."""
    cls = obj if inspect.isclass(obj) else None
    if cls is None:
        if not callable(obj):
            return (), False, f"{type(obj).__name__} is neither an environment class nor a zero-argument factory"
        return (), False, ""  # a factory: what it builds is only known by calling it (done at training time)
    if not callable(getattr(cls, "reset", None)):
        return (), False, f"{cls.__name__} has no reset() method (an environment defines reset(**row))"
    tools = tuple(n for n, m in inspect.getmembers(cls, predicate=inspect.isfunction) if not n.startswith("_") and n not in ("reset", "get_reward"))
    return tools, callable(getattr(cls, "get_reward", None)), ""


def list_environments(entry_points: Iterable[Any] | None = None) -> list[EnvironmentInfo]:
    """Return every installed environment (group ``posttrain.environments``), sorted by name; each is imported to check it.

    Args:
        entry_points: Entry points to read instead of the installed ones (``importlib.metadata.EntryPoint`` objects).
    """
    infos = []
    for ep in _entry_points(entry_points):
        dist = getattr(ep, "dist", None)
        distribution = getattr(getattr(dist, "metadata", None) or {}, "get", lambda *_: None)("Name") if dist is not None else None
        version = getattr(dist, "version", None) if dist is not None else None
        try:
            obj = ep.load()
            tools, has_reward, problem = _describe(obj)
        except Exception as exc:  # a broken environment is listed, not raised
            tools, has_reward, problem = (), False, f"cannot import {ep.value!r}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        infos.append(EnvironmentInfo(ep.name, ep.value, distribution or "-", version or "-", "broken" if problem else "ok", problem, tools, has_reward))
    return sorted(infos, key=lambda info: info.name)


def load_environment(name: str, entry_points: Iterable[Any] | None = None) -> Any:
    """Return the environment class (or factory) registered as ``name``, or named by ``"module:attribute"``.

    Raises:
        ValueError: No such environment (the installed names are listed), or it cannot be imported (one line).
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"environment {name!r}: cannot import it ({type(exc).__name__}: {exc}); give 'package.module:ClassName'.") from None
    matches = [ep for ep in _entry_points(entry_points) if ep.name == name]
    if not matches:
        known = sorted(ep.name for ep in _entry_points(entry_points))
        raise ValueError(f"environment {name!r} is not installed (installed: {known or 'none'}); install its distribution, "
                         "or give 'package.module:ClassName'.")
    try:
        return matches[0].load()
    except Exception as exc:
        raise ValueError(f"environment {name!r} ({matches[0].value}) cannot be imported: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
