"""The method registry and the maturity gate (light: imports no torch).

Three loading tiers (DESIGN.md section 3):

1. *Discover*: read entry points of group ``posttrain.methods`` and distribution metadata.
2. *Load specs*: import each entry point's light ``_spec`` module, each in its own try/except, and
   give every method a status: ``ok``, ``experimental``, ``incompatible``, ``conflict`` or ``error``.
3. *Activate*: check status and maturity, and only then import the trainer and config classes.

Global state: this module keeps exactly one piece of process-level state, the activation records
in :data:`_ACTIVATIONS` (method name -> :class:`Activation`), together with the lazily built
default registry that those records refer to and the set of experimental methods already warned
about. Every trainer constructor calls :func:`ensure_activated`, which reads the records; the
training loop writes the record's maturity and opt-in route into the run manifest.
:func:`_reset_default_registry` clears all of it (tests only).
"""

from __future__ import annotations

import dataclasses

import contextlib
import difflib
import importlib
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from posttrain._errors import PosttrainError
from posttrain._spec import MethodSpec, SpecError

__all__ = [
    "Activation",
    "ENTRY_POINT_GROUP",
    "ExperimentalMethodWarning",
    "HEAVY_MODULES",
    "MethodInfo",
    "MethodNotAllowedError",
    "MethodNotFoundError",
    "PluginWarning",
    "Registry",
    "STATUSES",
    "WrongNamespaceError",
    "activate",
    "default_registry",
    "ensure_activated",
    "temporary_method",
]

#: Entry-point group of method plugins; the entry point's name is the method id.
ENTRY_POINT_GROUP = "posttrain.methods"

#: Modules a spec module must not import (``posttrain list`` must stay fast).
HEAVY_MODULES = ("torch", "transformers", "datasets", "accelerate", "peft", "deepspeed", "vllm")

#: Every status a method can have; only ``ok`` and ``experimental`` can be activated.
STATUSES = ("ok", "experimental", "incompatible", "conflict", "error")

_LOADABLE = ("ok", "experimental")

#: ``via`` argument of :meth:`Registry.activate` -> how an experimental opt-in is recorded.
_VIA_LABELS = {
    "python": "python allow_experimental=True",
    "cli": "cli --allow-experimental",
    "experimental": "import posttrain.experimental",
}


class MethodNotFoundError(PosttrainError, LookupError):
    """No installed method has the requested name; the message suggests close names and a package."""


class MethodNotAllowedError(PosttrainError, RuntimeError):
    """The method cannot be activated: experimental without opt-in, or not loadable (see its status)."""


class WrongNamespaceError(ImportError, MethodNotAllowedError):
    """A method was imported through the wrong namespace; the message names the right import path."""


class PluginWarning(UserWarning):
    """A plugin misbehaves without being fatal (e.g. its spec module imports torch)."""


class ExperimentalMethodWarning(UserWarning):
    """An experimental method was activated (emitted once per process per method)."""


@dataclass
class MethodInfo:
    """What the registry knows about one method name (tiers 1 and 2; nothing heavy is imported).

    Args:
        name: Method id (the entry point's name).
        distribution: Distribution that registers it (for a conflict: every claimant, comma-separated).
        version: The distribution's version.
        maturity: ``"stable"`` or ``"experimental"`` (empty when the spec could not be loaded).
        plugin_api: API version the plugin was built for (empty when unknown).
        status: One of :data:`STATUSES`.
        summary: One line from the spec.
        error: One-line reason when the status is ``incompatible``, ``conflict`` or ``error``.
        spec: The loaded :class:`MethodSpec`, or None.
        family: Method family from the spec.
        presets: Preset names from the spec.
    """

    name: str
    distribution: str
    version: str
    maturity: str = ""
    plugin_api: str = ""
    status: str = "error"
    summary: str = ""
    error: str | None = None
    spec: MethodSpec | None = None
    family: str = ""
    presets: tuple[str, ...] = ()

    @property
    def is_loadable(self) -> bool:
        """Return whether the method can be activated (status ``ok`` or ``experimental``)."""
        return self.status in _LOADABLE

    def to_dict(self, *, presets: bool = False) -> dict[str, Any]:
        """Return the JSON form used by ``posttrain list --format json``."""
        out: dict[str, Any] = {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "maturity": self.maturity,
            "plugin_api": self.plugin_api,
            "status": self.status,
            "summary": self.summary,
            "error": self.error,
        }
        if presets:
            out["presets"] = list(self.presets)
        return out


@dataclass
class Activation:
    """The record of one activated method: its classes and how its use was allowed.

    Args:
        spec: The method's spec.
        info: The registry entry it was activated from.
        trainer_cls: The imported trainer class.
        config_cls: The imported config dataclass.
        allowed_via: ``"stable"``, ``"cli --allow-experimental"``, ``"env POSTTRAIN_ALLOW_EXPERIMENTAL"``,
            ``"python allow_experimental=True"`` or ``"import posttrain.experimental"``.
    """

    spec: MethodSpec
    info: MethodInfo
    trainer_cls: type
    config_cls: type
    allowed_via: str

    def to_manifest(self) -> dict[str, Any]:
        """Return the fields written into every run manifest and checkpoint."""
        return {
            "method": self.spec.name,
            "distribution": self.info.distribution,
            "version": self.info.version,
            "maturity": self.spec.maturity,
            "plugin_api": self.spec.plugin_api,
            "allowed_via": self.allowed_via,
        }


@dataclass
class _Candidate:
    """One registration of a name by one distribution, before conflicts are resolved."""

    name: str
    distribution: str
    version: str
    spec: MethodSpec | None = None
    error: str | None = None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _env_list(var: str) -> set[str]:
    return {item.strip() for item in os.environ.get(var, "").split(",") if item.strip()}


def _major(version: str) -> int | None:
    match = re.match(r"\s*v?(\d+)", version or "")
    return int(match.group(1)) if match else None


def _core_api() -> tuple[int, int]:
    from posttrain import API_VERSION

    major, minor = API_VERSION.split(".")
    return int(major), int(minor)


def _core_version() -> str:
    from posttrain import __version__

    return __version__


def _import_path(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class Registry:
    """Discover method plugins, give each a status, and activate them through the maturity gate.

    Discovery and spec loading happen once, on first use. One broken plugin never breaks the
    registry: its failure becomes its status and one-line error.

    Args:
        entry_points: Objects shaped like :class:`importlib.metadata.EntryPoint` (``.name``,
            ``.group``, ``.load()``, ``.dist.name``, ``.dist.version``); None reads the installed
            entry points of group :data:`ENTRY_POINT_GROUP`.
    """

    def __init__(self, entry_points: Iterable[Any] | None = None) -> None:
        self._entry_points = None if entry_points is None else list(entry_points)
        self._loaded: list[_Candidate] | None = None  # from entry points, loaded once
        self._added: list[_Candidate] = []  # from add_spec
        self._infos: dict[str, MethodInfo] | None = None  # resolved view, rebuilt on change

    # -- tier 1 and 2: discovery and spec loading -------------------------------------------

    def _discover(self) -> list[Any]:
        if self._entry_points is not None:
            return [ep for ep in self._entry_points if getattr(ep, "group", ENTRY_POINT_GROUP) == ENTRY_POINT_GROUP]
        from importlib.metadata import entry_points

        return list(entry_points(group=ENTRY_POINT_GROUP))

    def _load_entry_points(self) -> list[_Candidate]:
        disabled = _env_list("POSTTRAIN_DISABLE_PLUGINS")
        candidates = []
        seen: set[tuple[str, str]] = set()
        for ep in self._discover():
            dist = getattr(ep, "dist", None)
            dist_name = getattr(dist, "name", None) or "unknown-distribution"
            version = getattr(dist, "version", None) or "0+unknown"
            if ep.name in disabled or dist_name in disabled:
                continue  # skipped before importing anything
            if (ep.name, dist_name) in seen:  # one distribution seen twice on sys.path
                continue
            seen.add((ep.name, dist_name))
            candidates.append(self._load_one(ep, dist_name, version))
        return candidates

    def _load_one(self, ep: Any, dist_name: str, version: str) -> _Candidate:
        candidate = _Candidate(name=ep.name, distribution=dist_name, version=version)
        heavy_before = {m for m in HEAVY_MODULES if m in sys.modules}
        try:
            obj = ep.load()
        except Exception as exc:  # one broken plugin never breaks the registry
            candidate.error = f"loading spec {getattr(ep, 'value', ep.name)!r} failed: {_one_line(exc)}"
            return candidate
        finally:
            heavy_new = sorted(m for m in HEAVY_MODULES if m in sys.modules and m not in heavy_before)
            if heavy_new:
                warnings.warn(
                    f"posttrain plugin {ep.name!r} (distribution {dist_name}) imported {', '.join(heavy_new)} while "
                    "loading its spec; this makes `posttrain list` slow. Move heavy imports out of the spec "
                    "module (and the package __init__) into trainer.py.",
                    PluginWarning,
                    stacklevel=3,
                )
        if not isinstance(obj, MethodSpec):
            candidate.error = (
                f"entry point {ep.name!r} points to a {type(obj).__name__}, not a posttrain.MethodSpec; point it at "
                "the module-level SPEC object (e.g. 'posttrain_x._spec:SPEC')."
            )
            return candidate
        candidate.spec = obj
        return candidate

    def _all_candidates(self) -> list[_Candidate]:
        if self._loaded is None:
            self._loaded = self._load_entry_points()
        # a spec added directly for a distribution replaces that distribution's own entry point
        # (tests and the testing kit re-register installed plugins; one distribution is never a conflict)
        added = {(c.name, c.distribution) for c in self._added}
        return [c for c in self._loaded if (c.name, c.distribution) not in added] + self._added

    def _resolve(self) -> dict[str, MethodInfo]:
        if self._infos is None:
            by_name: dict[str, list[_Candidate]] = {}
            for cand in self._all_candidates():
                by_name.setdefault(cand.name, []).append(cand)
            self._infos = {name: self._make_info(cands) for name, cands in by_name.items()}
        return self._infos

    def _make_info(self, cands: list[_Candidate]) -> MethodInfo:
        if len(cands) > 1:
            claimants = [f"{c.distribution} {c.version}" for c in cands]
            specs = [c.spec for c in cands if c.spec is not None]
            first = specs[0] if specs else None
            return MethodInfo(
                name=cands[0].name,
                distribution=", ".join(c.distribution for c in cands),
                version=", ".join(c.version for c in cands),
                maturity=first.maturity if first else "",
                plugin_api=first.plugin_api if first else "",
                status="conflict",
                summary=first.summary if first else "",
                error=(
                    f"method {cands[0].name!r} is registered by {' and '.join(claimants)}; neither is loaded. "
                    f"Uninstall one of them (pip uninstall {cands[-1].distribution}) or skip one with "
                    f"POSTTRAIN_DISABLE_PLUGINS={cands[-1].distribution}."
                ),
                spec=None,
                family=first.family if first else "",
            )
        cand = cands[0]
        info = MethodInfo(name=cand.name, distribution=cand.distribution, version=cand.version)
        spec = cand.spec
        if spec is None:
            info.error = cand.error
            return info
        info.maturity, info.plugin_api, info.summary = spec.maturity, spec.plugin_api, spec.summary
        info.family, info.presets = spec.family, tuple(spec.presets)
        info.status, info.error = self._judge(cand, spec)
        info.spec = spec  # kept for every status so `posttrain info` can show a refused method
        return info

    def _judge(self, cand: _Candidate, spec: MethodSpec) -> tuple[str, str | None]:
        """Return ``(status, error)`` for one valid-looking registration."""
        if spec.name != cand.name:
            return "error", (
                f"entry point name {cand.name!r} differs from MethodSpec.name {spec.name!r}; rename the entry point "
                f"in {cand.distribution}'s pyproject.toml to {spec.name!r}."
            )
        try:
            spec.validate()
        except SpecError as exc:
            return "error", _one_line(exc)
        if spec.maturity == "stable" and _major(cand.version) in (0, None):
            return "error", (
                f"maturity 'stable' needs a distribution version >= 1.0, but {cand.distribution} is {cand.version}; "
                "declare maturity='experimental' or release it as 1.0 (see STABILITY.md)."
            )
        core_major, core_minor = _core_api()
        major, minor = spec.api_major_minor
        core = f"posttrain {_core_version()} (plugin API {core_major}.{core_minor})"
        if major != core_major:
            fix = (
                f"install a {cand.distribution} release built for API {core_major}.x"
                if major < core_major
                else f"upgrade posttrain to a release with plugin API {major}.x (pip install -U posttrain)"
            )
            return "incompatible", f"built for plugin API {spec.plugin_api}, but this is {core}: {fix}."
        if minor > core_minor:
            return "incompatible", (
                f"built for plugin API {spec.plugin_api}, newer than {core}: upgrade posttrain "
                f"(pip install -U posttrain), or install a {cand.distribution} release built for API {core_major}.{core_minor}."
            )
        return ("experimental" if spec.maturity == "experimental" else "ok"), None

    # -- queries ------------------------------------------------------------------------------

    def add_spec(self, spec: MethodSpec, *, distribution: str = "x", version: str = "1.0.0") -> MethodInfo:
        """Register a spec directly, as if ``distribution`` at ``version`` declared it.

        Args:
            spec: The method's spec.
            distribution: Distribution name to report.
            version: Distribution version (decides whether ``stable`` is allowed).

        Returns:
            The method's :class:`MethodInfo` after the registration (it may be a conflict).

        Raises:
            TypeError: ``spec`` is not a :class:`MethodSpec`.
        """
        if not isinstance(spec, MethodSpec):
            raise TypeError(f"add_spec() needs a posttrain.MethodSpec, got {type(spec).__name__}.")
        self._added = [c for c in self._added if not (c.name == spec.name and c.distribution == distribution)]
        self._added.append(_Candidate(name=spec.name, distribution=distribution, version=version, spec=spec))
        self._infos = None
        return self.get_info(spec.name)

    def remove_spec(self, name: str, *, distribution: str) -> None:
        """Undo :meth:`add_spec` for ``name`` registered by ``distribution`` (no error if absent)."""
        self._added = [c for c in self._added if not (c.name == name and c.distribution == distribution)]
        self._infos = None

    def list_methods(self) -> list[MethodInfo]:
        """Return every registered method, sorted by name (broken ones included, with their status)."""
        return [info for _, info in sorted(self._resolve().items())]

    def get_info(self, name: str) -> MethodInfo:
        """Return the :class:`MethodInfo` of ``name`` (hyphens are read as underscores).

        Raises:
            MethodNotFoundError: no method has that name; the message suggests close names.
        """
        infos = self._resolve()
        if name in infos:
            return infos[name]
        normalized = name.strip().lower().replace("-", "_")
        if normalized in infos:
            return infos[normalized]
        close = difflib.get_close_matches(normalized, list(infos), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        available = ", ".join(sorted(infos)) or "none"
        raise MethodNotFoundError(
            f"No posttrain method named {name!r}.{hint} Installed methods: {available}. "
            f"If it is published as a plugin: pip install posttrain-{normalized.replace('_', '-')}? "
            "(`posttrain list` shows what is installed.)"
        )

    # -- tier 3: activation -------------------------------------------------------------------

    def check_allowed(self, name: str, *, allow_experimental: bool = False, via: str = "python") -> tuple[MethodInfo, str]:
        """Run the maturity gate for ``name`` without importing any of its code.

        Args:
            name: Method id.
            allow_experimental: The caller opted in (argument, CLI flag or experimental import).
            via: Where the opt-in came from: ``"python"``, ``"cli"`` or ``"experimental"``.

        Returns:
            ``(info, allowed_via)``.

        Raises:
            MethodNotFoundError: no such method.
            MethodNotAllowedError: the method is not loadable, or experimental and not opted in,
                or ``POSTTRAIN_STABLE_ONLY=1`` is set.
        """
        if via not in _VIA_LABELS:
            raise ValueError(f"via={via!r} is invalid: use one of {', '.join(_VIA_LABELS)}.")
        info = self.get_info(name)
        who = f"{info.distribution} {info.version}"
        if not info.is_loadable:
            raise MethodNotAllowedError(f"posttrain method {info.name!r} ({who}) cannot be used: status {info.status}: {info.error}")
        if info.maturity == "stable":
            return info, "stable"
        if os.environ.get("POSTTRAIN_STABLE_ONLY", "").strip().lower() in ("1", "true", "yes", "on"):
            raise MethodNotAllowedError(
                f"posttrain method {info.name!r} ({who}) is experimental and POSTTRAIN_STABLE_ONLY is set, which refuses "
                "every experimental method. Unset POSTTRAIN_STABLE_ONLY to use it, or pick a stable method (`posttrain list`)."
            )
        if allow_experimental:
            return info, _VIA_LABELS[via]
        env = _env_list("POSTTRAIN_ALLOW_EXPERIMENTAL")
        if info.name in env or "all" in env:
            return info, "env POSTTRAIN_ALLOW_EXPERIMENTAL"
        raise MethodNotAllowedError(
            f"posttrain method {info.name!r} ({who}) is experimental: it may change in any release, so it needs an explicit "
            f"opt-in. Use one of: `posttrain train {info.name} --allow-experimental {info.name}` (CLI), "
            f"POSTTRAIN_ALLOW_EXPERIMENTAL={info.name} (environment), allow_experimental=True in the config "
            f"(Python), or `from posttrain.experimental.{info.name} import ...`. See STABILITY.md."
        )

    def check_config(self, info: MethodInfo) -> MethodInfo:
        """Return ``info``, or a copy with status ``error`` when its config class is not a valid config.

        Imports the spec's config module (light by contract: it may import only ``posttrain``);
        ``posttrain train`` calls it only after the maturity gate has allowed the method, so an
        experimental plugin's code never runs before the opt-in. A valid config class is a
        dataclass subclass of :class:`posttrain.TrainingConfig`.
        """
        if info.spec is None or not info.is_loadable:
            return info
        path = info.spec.config
        try:
            config_cls = _import_path(path)
        except Exception as exc:
            problem = f"its config {path!r} cannot be imported: {_one_line(exc)}"
        else:
            from posttrain.config import TrainingConfig

            if not isinstance(config_cls, type):
                problem = f"its config {path!r} is a {type(config_cls).__name__}, not a class"
            elif not dataclasses.is_dataclass(config_cls):
                problem = f"its config {path!r} is not a dataclass: decorate it with @dataclass(kw_only=True)"
            elif not issubclass(config_cls, TrainingConfig):
                problem = f"its config {path!r} does not subclass posttrain.TrainingConfig: derive it from TrainingConfig"
            else:
                return info
        return dataclasses.replace(info, status="error", error=f"{problem} (fix the plugin {info.distribution} {info.version})")

    def activate(self, name: str, *, allow_experimental: bool = False, via: str = "python") -> Activation:
        """Check the gate, then import the method's trainer and config classes.

        Status and maturity are checked *before* any of the method's code is imported. An allowed
        experimental method warns once per process.

        Args:
            name: Method id.
            allow_experimental: Opt in to an experimental method.
            via: Where the opt-in came from: ``"python"``, ``"cli"`` or ``"experimental"``.

        Returns:
            The :class:`Activation` record (also stored process-wide, see :func:`ensure_activated`).

        Raises:
            MethodNotFoundError: no such method.
            MethodNotAllowedError: see :meth:`check_allowed`.
            ImportError: the trainer or config path cannot be imported (the message names the plugin).
        """
        info, allowed_via = self.check_allowed(name, allow_experimental=allow_experimental, via=via)
        checked = self.check_config(info)
        if checked.status == "error":
            raise MethodNotAllowedError(f"posttrain method {info.name!r} ({info.distribution} {info.version}) cannot be used: status error: {checked.error}")
        spec = info.spec  # loadable infos always carry their spec
        if spec.maturity == "experimental" and spec.name not in _WARNED_EXPERIMENTAL:
            _WARNED_EXPERIMENTAL.add(spec.name)
            warnings.warn(
                f"posttrain method {spec.name!r} ({info.distribution} {info.version}) is experimental (allowed via "
                f"{allowed_via}): its config fields, metrics and behaviour may change in any release.",
                ExperimentalMethodWarning,
                stacklevel=3,
            )
        classes = []
        for role, path in (("trainer", spec.trainer), ("config", spec.config)):
            try:
                classes.append(_import_path(path))
            except Exception as exc:
                raise ImportError(
                    f"posttrain method {spec.name!r} ({info.distribution} {info.version}): cannot import its {role} "
                    f"{path!r}: {_one_line(exc)}. Reinstall the plugin or run `posttrain doctor`."
                ) from exc
        record = Activation(spec=spec, info=info, trainer_cls=classes[0], config_cls=classes[1], allowed_via=allowed_via)
        _ACTIVATIONS[spec.name] = record
        return record


# -- process-level state (see the module docstring) -------------------------------------------

#: Method name -> its activation in this process. The one piece of global state.
_ACTIVATIONS: dict[str, Activation] = {}
#: Experimental methods already warned about in this process.
_WARNED_EXPERIMENTAL: set[str] = set()
#: The registry of installed plugins, built on first use.
_DEFAULT_REGISTRY: Registry | None = None


def default_registry() -> Registry:
    """Return the registry of installed plugins, built on first use and cached for the process."""
    global _DEFAULT_REGISTRY
    if _DEFAULT_REGISTRY is None:
        _DEFAULT_REGISTRY = Registry()
    return _DEFAULT_REGISTRY


def _reset_default_registry() -> None:
    """Forget the default registry, the activation records and the experimental warnings (tests only)."""
    global _DEFAULT_REGISTRY
    _DEFAULT_REGISTRY = None
    _ACTIVATIONS.clear()
    _WARNED_EXPERIMENTAL.clear()


def activate(name: str, **kwargs: Any) -> Activation:
    """Activate ``name`` on the default registry; see :meth:`Registry.activate` for the arguments."""
    return default_registry().activate(name, **kwargs)


def get_activation(name: str) -> Activation | None:
    """Return the activation record of ``name`` in this process, or None."""
    return _ACTIVATIONS.get(name)


def ensure_activated(name: str, *, allow_experimental: bool = False) -> Activation:
    """Return the activation of ``name``, activating it now (through the gate) if needed.

    Every trainer constructor calls this, so constructing an experimental trainer without an
    opt-in raises the same :class:`MethodNotAllowedError` as the CLI: importing a plugin's module
    directly does not bypass the gate.

    Args:
        name: Method id.
        allow_experimental: The Python opt-in (usually ``args.allow_experimental``).

    Returns:
        The :class:`Activation` record.

    Raises:
        MethodNotFoundError: no such method is installed.
        MethodNotAllowedError: the gate refused it.
    """
    record = _ACTIVATIONS.get(name)
    if record is not None:
        return record
    return default_registry().activate(name, allow_experimental=allow_experimental, via="python")


@contextlib.contextmanager
def temporary_method(spec: MethodSpec, *, distribution: str = "test-dist", version: str = "1.0.0") -> Iterator[MethodInfo]:
    """Make ``spec`` visible in the default registry for the duration of the ``with`` block.

    Args:
        spec: The spec to register.
        distribution: Distribution name to report.
        version: Distribution version to report.

    Yields:
        The method's :class:`MethodInfo`.
    """
    registry = default_registry()
    info = registry.add_spec(spec, distribution=distribution, version=version)
    try:
        yield info
    finally:
        registry.remove_spec(spec.name, distribution=distribution)
        record = _ACTIVATIONS.get(spec.name)
        if record is not None and record.spec is spec:
            del _ACTIVATIONS[spec.name]
        _WARNED_EXPERIMENTAL.discard(spec.name)
