"""API snapshots: semver enforced by a test instead of by reviewers.

A stable plugin commits ``api_snapshot.json`` inside its package (next to ``_spec.py``): its public
surface at the version it was written for — the config fields it declares or re-defaults (name,
type, default), the trainer's ``__init__`` signature, the package's ``__all__``, preset names and
overrides, and the metric names a short tiny run logs. The core commits one for ``posttrain.__all__``,
``TrainingConfig`` and the plugin API (``MethodProtocol``, ``OptionalMethodMembers``, ``MethodSpec``,
``Preset``, ``TrainerSurface``).

:func:`compare` diffs a live surface against the snapshot. A removal or a change needs a major bump,
an addition a minor bump; :func:`check` says which bump the change needs and whether the installed
version has it. ``posttrain snapshot NAME --write`` (or ``--core``) rewrites a snapshot, and refuses
when the version bump is too small. Experimental (0.x) distributions are exempt: they may change in
any release.

The file format is versioned by its ``"schema"`` key (1); see STABILITY.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEMA",
    "SNAPSHOT_FILE",
    "Change",
    "SnapshotError",
    "check",
    "compare",
    "core_surface",
    "method_surface",
    "required_bump",
    "snapshot_path",
    "write",
]

SCHEMA = 1
SNAPSHOT_FILE = "api_snapshot.json"
_BUMPS = ("none", "patch", "minor", "major")


class SnapshotError(AssertionError):
    """The live public surface differs from the committed snapshot without the version bump it needs."""


@dataclass(frozen=True)
class Change:
    """One difference between a snapshot and the live surface.

    Args:
        where: What changed, e.g. ``"DPOConfig.beta default"``.
        kind: ``"removed"``, ``"changed"`` or ``"added"``.
        old: The snapshot's value (None for an addition).
        new: The live value (None for a removal).
        versioned: Which version the change is measured against: ``"distribution"`` or ``"api"``.
    """

    where: str
    kind: str
    old: Any = None
    new: Any = None
    versioned: str = "distribution"

    @property
    def bump(self) -> str:
        """The semver bump the change needs: ``"major"`` for removed/changed, ``"minor"`` for added."""
        return "minor" if self.kind == "added" else "major"

    def describe(self) -> str:
        if self.kind == "added":
            return f"{self.where} added ({_short(self.new)})"
        if self.kind == "removed":
            return f"{self.where} removed (was {_short(self.old)})"
        return f"{self.where} changed {_short(self.old)} -> {_short(self.new)}"


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- capturing a surface ----------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return _jsonable(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return _jsonable(f.default_factory())  # type: ignore[misc]
    return "<required>"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):
        return annotation
    return getattr(annotation, "__name__", None) or repr(annotation)


def config_fields(config_cls: type, *, base: type | None = None) -> dict[str, dict[str, Any]]:
    """Return ``{field: {"type", "default"}}`` of ``config_cls``.

    With ``base``, only the fields ``config_cls`` declares itself or re-defaults (the rest belong to
    ``base``'s owner and its snapshot).
    """
    inherited = {f.name: f for f in dataclasses.fields(base)} if base is not None else {}
    out = {}
    for f in dataclasses.fields(config_cls):
        entry = {"type": _type_name(f.type), "default": _field_default(f)}
        parent = inherited.get(f.name)
        if parent is not None and entry == {"type": _type_name(parent.type), "default": _field_default(parent)}:
            continue
        out[f.name] = entry
    return out


def signature_of(func: Any) -> list[dict[str, Any]]:
    """Return ``func``'s parameters (``self`` dropped) as ``[{"name", "kind", "default"}]`` in order."""
    params = []
    for p in inspect.signature(func).parameters.values():
        if p.name == "self":
            continue
        default = "<required>" if p.default is inspect.Parameter.empty else _jsonable(p.default)
        params.append({"name": p.name, "kind": p.kind.name, "default": default})
    return params


def _import_path(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def method_surface(info: Any, metrics: list[str] | None = None) -> dict[str, Any]:
    """Return the public surface of an installed method (a ``posttrain.MethodInfo``) as plain JSON data.

    Args:
        info: The method's registry entry (``posttrain.Registry().get_info(name)``).
        metrics: Metric names a short run logged (the conformance suite's tiny run); None leaves them out.
    """
    from posttrain.config import TrainingConfig

    spec = info.spec
    config_cls, trainer_cls = _import_path(spec.config), _import_path(spec.trainer)
    package = importlib.import_module(spec.trainer.split(":")[0].split(".")[0])
    surface: dict[str, Any] = {
        "schema": SCHEMA,
        "distribution": info.distribution,
        "version": info.version,
        "method": spec.name,
        "maturity": spec.maturity,
        "plugin_api": spec.plugin_api,
        "config": {"class": spec.config, "fields": config_fields(config_cls, base=TrainingConfig)},
        "trainer": {"class": spec.trainer, "signature": signature_of(trainer_cls.__init__)},
        "exports": sorted(getattr(package, "__all__", [])),
        "presets": {name: _jsonable(dict(p.overrides)) for name, p in sorted(spec.presets.items())},
        "data_format": spec.data_format,
    }
    if metrics is not None:
        surface["metrics"] = sorted(set(metrics))
    return surface


def _members(cls: type, names: list[str]) -> dict[str, Any]:
    out = {}
    for name in names:
        value = inspect.getattr_static(cls, name)
        if isinstance(value, property):
            out[name] = "property"
        elif callable(value) or isinstance(value, (staticmethod, classmethod)):
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            out[name] = signature_of(func)
        else:
            out[name] = "attribute"
    return out


def core_surface() -> dict[str, Any]:
    """Return the core's public surface: ``posttrain.__all__``, ``TrainingConfig`` and the plugin API."""
    import posttrain
    from posttrain import DATA_FORMATS, MethodProtocol, MethodSpec, OptionalMethodMembers, Preset, TrainerSurface, TrainingConfig, TrainingLoop

    exports = {}
    for name in sorted(posttrain.__all__):
        value = getattr(posttrain, name)
        exports[name] = "class" if isinstance(value, type) else "function" if callable(value) else "constant"

    def protocol_members(proto: type) -> dict[str, Any]:
        names = sorted(n for n in vars(proto) if not n.startswith("_"))
        return _members(proto, names) | {n: "attribute" for n in getattr(proto, "__annotations__", {})}

    surface_names = sorted(n for n in vars(TrainerSurface) if not n.startswith("_"))
    return {
        "schema": SCHEMA,
        "distribution": "posttrain",
        "version": posttrain.__version__,
        "api_version": posttrain.API_VERSION,
        "exports": exports,
        "training_config": config_fields(TrainingConfig),
        "plugin_api": {
            "MethodProtocol": protocol_members(MethodProtocol),
            "OptionalMethodMembers": protocol_members(OptionalMethodMembers),
            "MethodSpec": {f.name: {"type": _type_name(f.type), "default": _field_default(f)} for f in dataclasses.fields(MethodSpec)},
            "Preset": {f.name: {"type": _type_name(f.type), "default": _field_default(f)} for f in dataclasses.fields(Preset)},
            "TrainerSurface": _members(TrainerSurface, surface_names),
            # what plugins call on the loop (since 1.3): e.g. load_model(..., quantization_config=)
            "TrainingLoop": _members(TrainingLoop, sorted(n for n in dir(TrainingLoop) if not n.startswith("_"))),
            # a format a plugin's data_format may name; removing one breaks those plugins (since 1.3)
            "DATA_FORMATS": {name: "format" for name in DATA_FORMATS},
        },
    }


# -- comparing ----------------------------------------------------------------------------------


def _diff_mapping(old: dict, new: dict, label, versioned: str) -> list[Change]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            changes.append(Change(label(key), "removed", old[key], None, versioned))
        elif key not in old:
            changes.append(Change(label(key), "added", None, new[key], versioned))
        elif old[key] != new[key]:
            changes.append(Change(label(key), "changed", old[key], new[key], versioned))
    return changes


def _diff_fields(old: dict, new: dict, owner: str, versioned: str) -> list[Change]:
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            changes.append(Change(f"{owner}.{key}", "removed", old[key], None, versioned))
        elif key not in old:
            changes.append(Change(f"{owner}.{key}", "added", None, new[key], versioned))
        else:
            for attr in ("type", "default"):
                if old[key].get(attr) != new[key].get(attr):
                    changes.append(Change(f"{owner}.{key} {attr}", "changed", old[key].get(attr), new[key].get(attr), versioned))
    return changes


def _diff_signature(old: list, new: list, owner: str, versioned: str) -> list[Change]:
    changes = []
    old_by, new_by = {p["name"]: p for p in old}, {p["name"]: p for p in new}
    for p in old:
        if p["name"] not in new_by:
            changes.append(Change(f"{owner}({p['name']})", "removed", p, None, versioned))
        elif new_by[p["name"]] != p:
            changes.append(Change(f"{owner}({p['name']})", "changed", p, new_by[p["name"]], versioned))
    for p in new:
        if p["name"] not in old_by:
            # a new parameter without a default breaks every caller
            kind = "added" if p["default"] != "<required>" or p["kind"] == "VAR_KEYWORD" else "changed"
            changes.append(Change(f"{owner}({p['name']})", kind, None if kind == "added" else "<absent>", p, versioned))
    positional = ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")
    old_order = [p["name"] for p in old if p["kind"] in positional and p["name"] in new_by]
    new_order = [p["name"] for p in new if p["kind"] in positional and p["name"] in old_by]
    if old_order != new_order:
        changes.append(Change(f"{owner} positional order", "changed", old_order, new_order, versioned))
    return changes


def _diff_names(old: list, new: list, label: str, versioned: str) -> list[Change]:
    return [Change(f"{label} {n!r}", "removed", n, None, versioned) for n in sorted(set(old) - set(new))] + [
        Change(f"{label} {n!r}", "added", None, n, versioned) for n in sorted(set(new) - set(old))
    ]


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Return the changes from snapshot ``old`` to live surface ``new`` (a method's or the core's)."""
    if old.get("schema") != SCHEMA:
        raise SnapshotError(f"snapshot schema {old.get('schema')!r} is not {SCHEMA}: regenerate it with `posttrain snapshot ... --write`.")
    changes: list[Change] = []
    if "api_version" in new:  # the core
        changes += _diff_mapping(old.get("exports", {}), new["exports"], lambda k: f"posttrain.{k}", "distribution")
        changes += _diff_fields(old.get("training_config", {}), new["training_config"], "TrainingConfig", "distribution")
        old_api, new_api = old.get("plugin_api", {}), new["plugin_api"]
        for section in sorted(set(old_api) | set(new_api)):
            o, n = old_api.get(section, {}), new_api.get(section, {})
            if section in ("MethodSpec", "Preset"):
                changes += _diff_fields(o, n, section, "api")
                continue
            for member in sorted(set(o) | set(n)):
                where = f"{section}.{member}"
                if member not in n:
                    changes.append(Change(where, "removed", o[member], None, "api"))
                elif member not in o:
                    changes.append(Change(where, "added", None, n[member], "api"))
                elif isinstance(o[member], list) and isinstance(n[member], list):
                    changes += _diff_signature(o[member], n[member], where, "api")
                elif o[member] != n[member]:
                    changes.append(Change(where, "changed", o[member], n[member], "api"))
        return changes
    config = new["config"]["class"].split(":")[1]
    trainer = new["trainer"]["class"].split(":")[1]
    changes += _diff_fields(old.get("config", {}).get("fields", {}), new["config"]["fields"], config, "distribution")
    changes += _diff_signature(old.get("trainer", {}).get("signature", []), new["trainer"]["signature"], f"{trainer}.__init__", "distribution")
    changes += _diff_names(old.get("exports", []), new["exports"], "__all__ name", "distribution")
    changes += _diff_mapping(old.get("presets", {}), new["presets"], lambda k: f"preset {k!r}", "distribution")
    if old.get("data_format", "") != new.get("data_format", ""):
        changes.append(Change("MethodSpec.data_format", "changed" if old.get("data_format") else "added", old.get("data_format"), new.get("data_format")))
    if "metrics" in new and "metrics" in old:
        changes += _diff_names(old["metrics"], new["metrics"], "logged metric", "distribution")
    return changes


# -- versions -----------------------------------------------------------------------------------


def _parse(version: str) -> tuple[int, int, int]:
    from packaging.version import Version

    v = Version(version)
    release = tuple(v.release) + (0, 0, 0)
    return release[0], release[1], release[2]


def required_bump(changes: list[Change]) -> str:
    """Return the largest bump ``changes`` need: ``"none"``, ``"minor"`` or ``"major"``."""
    return max((c.bump for c in changes), key=_BUMPS.index, default="none")


def _bump_made(old: str, new: str) -> str:
    o, n = _parse(old), _parse(new)
    if n[0] > o[0]:
        return "major"
    if n[0] == o[0] and n[1] > o[1]:
        return "minor"
    if n[:2] == o[:2] and n[2] > o[2]:
        return "patch"
    return "none"


def _next(version: str, bump: str, api: bool = False) -> str:
    major, minor, patch = _parse(version)
    if bump == "major":
        return f"{major + 1}.0" if api else f"{major + 1}.0.0"
    return f"{major}.{minor + 1}" if api else f"{major}.{minor + 1}.0"


def _verdicts(old: dict, new: dict, changes: list[Change]) -> list[str]:
    """Return one line per version (distribution / API) whose bump is too small for its changes."""
    problems = []
    pairs = [("distribution", new.get("distribution", "?"), old.get("version", "0"), new.get("version", "0"))]
    if "api_version" in new:
        pairs.append(("api", "posttrain.API_VERSION", old.get("api_version", "0.0"), new["api_version"]))
    for versioned, who, old_v, new_v in pairs:
        group = [c for c in changes if c.versioned == versioned]
        needed = required_bump(group)
        if needed == "none":
            continue
        if _parse(old_v)[0] == 0 and versioned == "distribution":
            continue  # 0.x: anything may change (semver item 4)
        made = _bump_made(old_v, new_v)
        if _BUMPS.index(made) >= _BUMPS.index(needed):
            continue
        worst = [c for c in group if c.bump == needed]
        listed = "; ".join(c.describe() for c in worst[:5]) + (f"; and {len(worst) - 5} more" if len(worst) > 5 else "")
        problems.append(
            f"{listed}: this needs a {needed} version bump of {who} ({old_v} -> {_next(old_v, needed, versioned == 'api')}), "
            f"but it is {new_v}. Restore the old behaviour, or bump the version and run `posttrain snapshot --write`."
        )
    return problems


def snapshot_path(info: Any = None) -> str:
    """Return where the snapshot of a method (a ``MethodInfo``) or, with None, of the core lives."""
    if info is None:
        import posttrain

        return os.path.join(os.path.dirname(os.path.abspath(posttrain.__file__)), SNAPSHOT_FILE)
    package = importlib.import_module(info.spec.trainer.split(":")[0].split(".")[0])
    return os.path.join(os.path.dirname(os.path.abspath(package.__file__)), SNAPSHOT_FILE)


def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def check(live: dict[str, Any], path: str) -> list[Change]:
    """Diff ``live`` against the snapshot at ``path``; raise :class:`SnapshotError` when it is not allowed.

    Raises when a change lacks its version bump (the message names each change and the bump it
    needs), and also when the bump was made but the snapshot was not rewritten (the snapshot must
    describe the released surface). Returns the (allowed, empty) change list otherwise.
    """
    who = live.get("distribution", "?")
    if not os.path.isfile(path):
        target = "--core" if "api_version" in live else live.get("method", "NAME")
        raise SnapshotError(f"{who} has no API snapshot at {path}: create it with `posttrain snapshot {target} --write` and commit it.")
    old = _load(path)
    changes = compare(old, live)
    problems = _verdicts(old, live, changes)
    if problems:
        raise SnapshotError("\n".join(problems))
    if changes:
        target = "--core" if "api_version" in live else live.get("method", "NAME")
        raise SnapshotError(
            f"{who}'s public surface changed and its version allows it ({old.get('version')} -> {live.get('version')}), but the snapshot "
            f"is stale ({'; '.join(c.describe() for c in changes[:3])}{' ...' if len(changes) > 3 else ''}): "
            f"run `posttrain snapshot {target} --write` and commit {path}."
        )
    return []  # a release without surface changes may keep the snapshot of an older version


def write(live: dict[str, Any], path: str) -> list[Change]:
    """Write ``live`` to ``path`` after checking the version bump against the existing snapshot.

    Raises :class:`SnapshotError` (and writes nothing) when a change lacks its version bump.
    Returns the changes written.
    """
    changes: list[Change] = []
    if os.path.isfile(path):
        old = _load(path)
        changes = compare(old, live)
        problems = _verdicts(old, live, changes)
        if problems:
            raise SnapshotError("\n".join(problems))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(live, fh, indent=1, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
    return changes
