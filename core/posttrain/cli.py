"""The ``posttrain`` command line: ``list``, ``info``, ``train``, ``env`` and ``doctor``.

Importing this module is light (no torch): ``list``, ``info`` and ``--help`` only read entry
points, spec modules and config modules. ``train`` imports the method's trainer after the
maturity gate, and ``env`` imports torch to list devices.

User mistakes (unknown method, method not allowed, unknown field, bad value) print one line to
stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import types
import typing
import warnings
from typing import Any, Mapping, Sequence

from posttrain._registry import (
    MethodInfo,
    MethodNotAllowedError,
    MethodNotFoundError,
    Registry,
    _import_path,
    default_registry,
)
from posttrain._errors import PosttrainError
from posttrain.config import ConfigError, TrainingConfig, closest_field_names, config_fields

__all__ = ["main", "build_parser", "build_config", "parse_field_args", "UsageError"]

#: Exit status for user mistakes (argparse uses the same).
EXIT_USAGE = 2

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")
#: ``posttrain train`` options that are not config fields.
_TRAIN_OPTIONS = {"--config": "config", "--preset": "preset", "--allow-experimental": "allow_experimental"}


_TRAIN_USAGE = "usage: posttrain train METHOD [--config FILE.yaml] [--preset NAME] [--allow-experimental NAME] [--print-config] [--FIELD VALUE ...]"


class UsageError(PosttrainError):
    """A user mistake on the command line; printed as one line, exit status 2."""


# -- argument parsing for config fields -------------------------------------------------------


def _arms(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _list_arm(hint: Any) -> Any | None:
    for arm in _arms(hint):
        if arm in (list, tuple) or typing.get_origin(arm) in (list, tuple):
            return arm
    return None


def _element_type(list_hint: Any) -> Any:
    args = typing.get_args(list_hint)
    return args[0] if args and args[0] is not Ellipsis else str


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _parse_string(name: str, hint: Any, text: str) -> Any:
    """Convert one command-line string to ``hint``; raise ConfigError naming the field."""
    arms = _arms(hint)
    if hint is Any or hint is typing.Any:
        return text
    lowered = text.strip().lower()
    for arm in arms:
        if arm is type(None) and lowered in ("none", "null"):
            return None
    for arm in arms:
        if arm is bool:
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
        elif typing.get_origin(arm) is typing.Literal:
            for choice in typing.get_args(arm):
                if str(choice) == text:
                    return choice
    for arm in arms:
        try:
            if arm is int:
                return int(text)
            if arm is float:
                return float(text)
        except ValueError:
            continue
    for arm in arms:
        if (arm is dict or typing.get_origin(arm) is dict) and text.lstrip().startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--{name}: {text!r} is not valid JSON ({exc.msg}); pass a JSON object like '{{\"key\": 1}}'.") from None
            return value
    list_arm = _list_arm(hint)
    if list_arm is not None and text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--{name}: {text!r} is not a valid JSON list ({exc.msg}); pass several values or '[\"a\", \"b\"]'.") from None
        return [_coerce_value(name, _element_type(list_arm), item) for item in value]
    if str in arms:
        return text
    if list_arm is not None:
        return [_parse_string(name, _element_type(list_arm), text)]
    raise ConfigError(f"--{name}: {text!r} is not a valid {_type_name(hint)}.")


def _coerce_value(name: str, hint: Any, value: Any) -> Any:
    """Check a typed value (from YAML or a preset) against ``hint``; strings are parsed."""
    if hint is Any or hint is typing.Any:
        return value
    arms = _arms(hint)
    if value is None:
        if type(None) in arms:
            return None
        raise ConfigError(f"{name}: null is not allowed; it expects {_type_name(hint)}.")
    if isinstance(value, bool):
        if bool in arms:
            return value
    elif isinstance(value, int) and (int in arms or float in arms):
        return value if int in arms else float(value)
    elif isinstance(value, float) and float in arms:
        return value
    elif isinstance(value, str):
        return _parse_string(name, hint, value)
    elif isinstance(value, Mapping) and any(a is dict or typing.get_origin(a) is dict for a in arms):
        return dict(value)
    elif isinstance(value, (list, tuple)) and _list_arm(hint) is not None:
        return [_coerce_value(name, _element_type(_list_arm(hint)), item) for item in value]
    if any(typing.get_origin(arm) is typing.Literal and value in typing.get_args(arm) for arm in arms):
        return value
    raise ConfigError(f"{name}: {value!r} ({type(value).__name__}) is not a valid {_type_name(hint)}.")


def _unknown_field(config_cls: type, name: str, prefix: str = "--") -> ConfigError:
    close = closest_field_names(config_cls, name)
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(
        f"unknown config field {prefix}{name} for {config_cls.__name__}.{hint} "
        "(`posttrain info METHOD` lists every field.)"
    )


def parse_field_args(config_cls: type, tokens: Sequence[str]) -> dict[str, Any]:
    """Parse ``--field value`` / ``--field=value`` tokens against the fields of ``config_cls``.

    Bools accept true/false/1/0/yes/no and a bare ``--flag`` means true; ``Optional`` fields accept
    ``none``/``null``; list fields take several values or a JSON list; dict fields take JSON.
    Hyphens in field names are read as underscores.

    Args:
        config_cls: The method's config dataclass.
        tokens: Command-line tokens after the method's own options were removed.

    Returns:
        Field name -> converted value.

    Raises:
        ConfigError: an unknown field (with the closest names), a missing or invalid value.
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}: give config fields as --name value (see `posttrain info METHOD`).")
        key, has_value, inline = token[2:].partition("=")
        name = key.replace("-", "_")
        if name not in names:
            raise _unknown_field(config_cls, name)
        hint = hints.get(name, str)
        i += 1
        raw = [inline] if has_value else []
        if not has_value:
            takes_many = _list_arm(hint) is not None
            while i < len(tokens) and not tokens[i].startswith("--"):
                raw.append(tokens[i])
                i += 1
                if not takes_many:
                    break
        if not raw:
            if bool not in _arms(hint):
                raise ConfigError(f"--{name} needs a value ({_type_name(hint)}).")
            values[name] = True
        elif len(raw) == 1:
            values[name] = _parse_string(name, hint, raw[0])
        else:
            values[name] = [_parse_string(name, _element_type(_list_arm(hint)), item) for item in raw]
    return values


def build_config(
    config_cls: type,
    *,
    presets: Mapping[str, Any] | None = None,
    preset: str | None = None,
    yaml_values: Mapping[str, Any] | None = None,
    cli_values: Mapping[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> TrainingConfig:
    """Build a config with precedence: dataclass defaults < YAML < preset overrides < command-line flags.

    A preset is named on the command line, so it is the user's latest explicit choice: it applies in
    full over the YAML file (``--config dpo.yaml --preset ipo`` trains IPO even though the YAML says
    ``loss_type: sigmoid``); a flag still wins over the preset.

    Args:
        config_cls: The method's config dataclass.
        presets: The spec's presets (name -> :class:`posttrain.Preset`).
        preset: Name of the preset to apply, or None.
        yaml_values: Field values from the YAML file (without its ``env`` section).
        cli_values: Field values from :func:`parse_field_args`.
        sources: If given, filled with field name -> where its value came from (``"default"``,
            ``"yaml"``, ``"preset NAME"`` or ``"flag"``) for every field of ``config_cls``.

    Returns:
        The config instance.

    Raises:
        ConfigError: an unknown preset or field, an invalid value, or a failed config validation.
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    merged: dict[str, Any] = {}
    origin = {name: "default" for name in names}
    layers: list[tuple[str, str, Mapping[str, Any]]] = [("the YAML file", "yaml", yaml_values or {})]
    if preset is not None:
        presets = presets or {}
        if preset not in presets:
            available = ", ".join(sorted(presets)) or "none"
            raise ConfigError(f"unknown preset {preset!r} for {config_cls.__name__}; available presets: {available}.")
        layers.append((f"preset {preset!r}", f"preset {preset}", presets[preset].overrides))
    for source, label, layer in layers:
        for name, value in layer.items():
            if name not in names:
                error = _unknown_field(config_cls, name, prefix="")
                raise ConfigError(f"{source}: {error}")
            merged[name] = _coerce_value(name, hints.get(name, Any), value)
            origin[name] = label
    for name in cli_values or {}:
        origin[name] = "flag"
    merged.update(cli_values or {})
    if sources is not None:
        sources.update(origin)
    try:
        return config_cls(**merged)
    except TypeError as exc:  # e.g. a required field without default
        raise ConfigError(f"{config_cls.__name__}: {exc}") from None


def _read_yaml(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Return ``(field values, env section)`` of a YAML config file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except OSError as exc:
        raise UsageError(f"--config {path}: {exc.strerror or exc}.") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: invalid YAML: {' '.join(str(exc).split())}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: the top level must be a mapping of field: value, not a {type(data).__name__}.")
    env = data.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UsageError(f"--config {path}: 'env' must be a mapping of NAME: value.")
    return data, {str(k): "" if v is None else str(v) for k, v in env.items()}


def _split_train_tokens(tokens: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Separate ``--config``, ``--preset`` and ``--allow-experimental`` from config-field tokens."""
    options: dict[str, Any] = {"config": None, "preset": None, "allow_experimental": [], "print_config": False}
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        flag, has_value, inline = tokens[i].partition("=")
        if flag == "--print-config" and not has_value:
            options["print_config"] = True
            i += 1
            continue
        if flag not in _TRAIN_OPTIONS:
            rest.append(tokens[i])
            i += 1
            continue
        if has_value:
            value = inline
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value = tokens[i + 1]
            i += 2
        else:
            raise UsageError(f"{flag} needs a value.")
        key = _TRAIN_OPTIONS[flag]
        if key == "allow_experimental":
            options[key].extend(v.strip() for v in value.split(",") if v.strip())
        else:
            options[key] = value
    return options, rest


def _raw_allow_experimental(yaml_values: dict[str, Any], field_tokens: Sequence[str]) -> bool:
    """Return whether the YAML or a ``--allow_experimental VALUE`` flag opts in (read without the config class)."""
    value: Any = yaml_values.get("allow_experimental", False)
    for i, token in enumerate(field_tokens):
        flag, has_value, inline = token.partition("=")
        if flag == "--allow_experimental":
            value = inline if has_value else (field_tokens[i + 1] if i + 1 < len(field_tokens) and not field_tokens[i + 1].startswith("--") else "true")
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value is True


# -- commands ---------------------------------------------------------------------------------


def _code_allowed(registry: Registry, info: MethodInfo, opted_in: Sequence[str] = ()) -> bool:
    """Return whether the gate lets ``info``'s code (beyond its spec) be imported now.

    Stable methods: yes. Experimental ones: only with an opt-in (``--allow-experimental NAME``,
    ``POSTTRAIN_ALLOW_EXPERIMENTAL``); nothing is imported to decide.
    """
    if not info.is_loadable:
        return False
    names = {name.replace("-", "_") for name in opted_in}
    try:
        registry.check_allowed(info.name, allow_experimental=info.name in names or "all" in names, via="cli")
    except MethodNotAllowedError:
        return False
    return True


def _opt_in_hint(name: str, command: str) -> str:
    target = f"{command} {name}" if command != "doctor" else command
    return f"`posttrain {target} --allow-experimental {name}` (or POSTTRAIN_ALLOW_EXPERIMENTAL={name})"


_PAPER_REF = re.compile(r"arXiv:\s*\d{4}\.\d{4,5}|https?://\S+", re.IGNORECASE)


def paper_backed_count(infos: list) -> tuple[int, int]:
    """``(methods, families)``: presets whose ``paper`` cites a paper (an arXiv id or a URL), and the methods having one."""
    methods = families = 0
    for info in infos:
        spec = getattr(info, "spec", None)
        cited = [p for p in (spec.presets.values() if spec is not None and spec.presets else ()) if _PAPER_REF.search(p.paper or "")]
        methods += len(cited)
        families += bool(cited)
    return methods, families


def _cmd_list_environments(args: argparse.Namespace) -> int:
    """``posttrain list --environments``: the installed environments (entry-point group ``posttrain.environments``), each imported to check it."""
    from posttrain._environments import list_environments

    infos = list_environments()
    if args.format == "json":
        print(json.dumps({"schema_version": 1, "environments": [info.to_dict() for info in infos]}, indent=2))
    elif not infos:
        print('No posttrain environments installed. A distribution adds one with [project.entry-points."posttrain.environments"] '
              'name = "package.module:EnvClass"; or pass environment_factory=EnvClass directly.')
    else:
        header = ("name", "distribution", "version", "status", "tools / error")
        rows = [(i.name, i.distribution, i.version, i.status,
                 i.error if i.error else (", ".join(i.tools) or "-") + (" (+ get_reward)" if i.has_reward else "")) for i in infos]
        widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header) - 1)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 1 if args.strict and any(i.status != "ok" for i in infos) else 0


def _cmd_list(args: argparse.Namespace, registry: Registry) -> int:
    if getattr(args, "environments", False):
        return _cmd_list_environments(args)
    # tier 2 only (DESIGN.md section 3): entry points and spec modules, never a plugin's config or trainer
    infos = registry.list_methods()
    papers, families = paper_backed_count(infos)
    if args.format == "json":
        payload = {"schema_version": 1, "methods": [info.to_dict(presets=args.presets) for info in infos]}
        if args.presets:
            payload["paper_backed"] = {"methods": papers, "families": families}
        print(json.dumps(payload, indent=2))
    elif not infos:
        print("No posttrain methods installed. Install one, e.g. `pip install posttrain-sft`.")
    else:
        header = ("name", "distribution", "version", "maturity", "status", "summary")
        rows = []
        for info in infos:
            summary = info.summary if info.status in ("ok", "experimental") else f"{info.error}"
            if args.presets and info.presets:
                summary += f" [presets: {', '.join(info.presets)}]"
            rows.append((info.name, info.distribution, info.version, info.maturity or "-", info.status, summary))
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if args.presets:
            print(f"\n{papers} paper-backed methods (presets citing a paper) across {families} method families.")
    if args.strict and any(info.status not in ("ok", "experimental") for info in infos):
        return 1
    return 0


def _format_default(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else repr(value)


def _cmd_info(args: argparse.Namespace, registry: Registry) -> int:
    info = registry.get_info(args.method)
    allowed = _code_allowed(registry, info, getattr(args, "allow_experimental", None) or ())
    if allowed:  # the config class is imported only once the gate lets the method's code run
        info = registry.check_config(info)
    spec = info.spec
    print(f"{info.name}: {info.summary or '(no summary)'}")
    print(f"  status:       {info.status}" + (f" ({info.error})" if info.error else ""))
    print(f"  maturity:     {info.maturity or '-'}")
    print(f"  distribution: {info.distribution} {info.version}")
    print(f"  plugin api:   {info.plugin_api or '-'}")
    print(f"  family:       {info.family or '-'}")
    if spec is not None:
        print(f"  data format:  {spec.data_format or '-'}")
    if spec is None:
        return 1
    print("  papers:" + ("" if spec.papers else " none"))
    for paper in spec.papers:
        print(f"    - {paper}")
    print("  presets:" + ("" if spec.presets else " none"))
    for name, preset in sorted(spec.presets.items()):
        print(f"    {name}: {preset.summary}")
        overrides = ", ".join(f"{k}={_format_default(v)}" for k, v in preset.overrides.items())
        print(f"      overrides: {overrides or '-'}")
        if preset.paper:
            print(f"      paper: {preset.paper}")
    if not info.is_loadable:
        return 1
    if not allowed:
        print(f"  config fields: not shown: {info.name} is experimental, and showing its fields imports its code. "
              f"Opt in to see them: {_opt_in_hint(info.name, 'info')}.")
        return 0
    try:
        config_cls = _import_path(spec.config)
        fields = config_fields(config_cls)
    except Exception as exc:
        print(f"  config: cannot import {spec.config!r}: {type(exc).__name__}: {exc}")
        return 1
    print(f"  config fields ({config_cls.__name__}; set with --name value or in --config FILE.yaml):")
    for item in fields:
        print(f"    --{item['name']} ({item['type']}, default {_format_default(item['default'])})")
        if item["help"]:
            print(f"        {item['help']}")
    return 0


def _cmd_train(args: argparse.Namespace, registry: Registry) -> int:
    if not args.method:
        raise UsageError("name a method: posttrain train METHOD [--config FILE.yaml] [--FIELD VALUE ...] (`posttrain list` shows the installed ones).")
    options, field_tokens = _split_train_tokens(args.rest)
    if any(token in ("-h", "--help") for token in field_tokens):
        print(_TRAIN_USAGE.replace("METHOD", args.method, 1))
        print("  --config FILE.yaml          YAML of field: value (an 'env:' mapping sets environment variables)")
        print("  --preset NAME               a paper's settings (see presets below)")
        print("  --allow-experimental NAME   opt in to an experimental method")
        print("  --print-config              print the resolved config with each field's source, and stop")
        print("  --FIELD VALUE               any config field below; precedence: defaults < --config < --preset < flags")
        print()
        return _cmd_info(argparse.Namespace(method=args.method, allow_experimental=options["allow_experimental"]), registry)
    info = registry.get_info(args.method)
    yaml_values, env = _read_yaml(options["config"]) if options["config"] else ({}, {})
    for key, value in env.items():  # the shell's environment wins, like flags over YAML
        os.environ.setdefault(key, value)
    # The gate runs on the flags, the environment and the raw YAML/flag values, before any module of
    # the plugin (its config included) is imported: an experimental method without an opt-in never
    # runs a line of its code.
    opted_in = {name.replace("-", "_") for name in options["allow_experimental"]}
    by_flag = info.name in opted_in or "all" in opted_in
    raw_opt_in = _raw_allow_experimental(yaml_values, field_tokens)
    registry.check_allowed(info.name, allow_experimental=by_flag or raw_opt_in, via="cli" if by_flag else "python")
    checked = registry.check_config(info)
    if checked.status == "error":
        raise UsageError(f"posttrain method {info.name!r} cannot be used: {checked.error}")
    config_cls = _import_path(info.spec.config)
    sources: dict[str, str] = {}
    config = build_config(
        config_cls,
        presets=info.spec.presets,
        preset=options["preset"],
        yaml_values=yaml_values,
        cli_values=parse_field_args(config_cls, field_tokens),
        sources=sources,
    )
    if by_flag:
        config.allow_experimental = True
        sources["allow_experimental"] = "flag"
    config._field_sources = sources  # read by the loop into run_manifest.json ("config_sources")
    if options["print_config"]:
        _print_config(config, sources)
        return 0
    activation = registry.activate(info.name, allow_experimental=config.allow_experimental, via="cli" if by_flag else "python")
    if not config.model_name_or_path:
        raise UsageError("model_name_or_path is not set: pass --model_name_or_path (a Hub id or a local directory).")
    from posttrain._data import load_dataset_from_config

    try:
        train_dataset, eval_dataset = load_dataset_from_config(config)
    except (ValueError, FileNotFoundError) as exc:
        if isinstance(exc, PosttrainError):
            raise
        raise UsageError(" ".join(str(exc).split())) from None
    try:
        trainer = activation.trainer_cls(
            model=config.model_name_or_path, args=config, train_dataset=train_dataset, eval_dataset=eval_dataset
        )
    except (ValueError, ImportError) as exc:
        # bad data, a bad --reward_funcs path, ...: one line, unless the traceback is asked for
        if isinstance(exc, PosttrainError) or os.environ.get("POSTTRAIN_DEBUG", "").strip() not in ("", "0"):
            raise
        raise UsageError(f"{type(exc).__name__}: {exc}") from exc
    trainer.train()
    _end_distributed()
    return 0


def _end_distributed() -> None:
    """End a finished multi-process run's process here (the CLI owns the process; a library caller's ``train()`` never does this).

    Every rank reaches this point after the last save. The process group is torn down, the streams
    and log handlers are flushed, and the process exits with status 0 without running C++ static
    destructors: left to a normal interpreter exit, a rank of a DeepSpeed run on CPU (gloo) aborts
    now and then with "terminate called without an active exception" in a destructor that runs
    after Python is gone (no Python frame; seen about once in 10 ZeRO-3 runs on a loaded 2-core
    machine, with or without ``destroy_process_group``), which turns a good run's exit status into a
    failure. Nothing is lost by skipping them: checkpoints and the final model are written and
    synced by then, and trackers were ended by the loop. Single-process runs exit normally.
    """
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _print_config(config: TrainingConfig, sources: Mapping[str, str]) -> None:
    """Print the resolved config as YAML, each field with where its value came from (default / yaml / preset NAME / flag)."""
    import yaml

    print(f"# {type(config).__name__}: the resolved config (precedence: default < yaml < preset < flag)")
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        text = yaml.safe_dump({item.name: value}, default_flow_style=True, width=10**6).strip()[1:-1]
        print(f"{text}  # {sources.get(item.name, 'default')}")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _cmd_env(args: argparse.Namespace, registry: Registry) -> int:
    import importlib.util
    import platform

    print(f"python: {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.platform()}")
    for name in ("posttrain", "torch", "transformers", "accelerate", "datasets", "peft", "trl", "deepspeed", "vllm", "pluggy"):
        print(f"{name}: {_dist_version(name)}")
    print(f"cpu count: {os.cpu_count()}")
    if importlib.util.find_spec("torch") is None:
        print("cuda: torch not installed")
    else:
        try:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            print(f"cuda: {count} device(s)" + (f", CUDA {torch.version.cuda}" if count else ""))
            for index in range(count):
                print(f"  cuda:{index}: {torch.cuda.get_device_name(index)}")
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                print("mps: available")
        except Exception as exc:  # a broken torch install must not hide the rest of the report
            print(f"cuda: unknown ({type(exc).__name__}: {exc})")
    print("environment:")
    names = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "CUDA_VISIBLE_DEVICES"]
    names += sorted(k for k in os.environ if k.startswith("POSTTRAIN_"))
    for name in names:
        print(f"  {name}={os.environ[name]}" if name in os.environ else f"  {name} (unset)")
    return 0


def _module_exists(module_name: str) -> bool | None:
    """Return whether ``module_name`` can be imported, importing none of its package's code.

    ``find_spec("a.b.c")`` imports the package ``a.b``; when that package is not imported yet the
    answer is None (unknown) instead, so a check never runs a plugin's ``__init__`` before the opt-in.
    """
    import importlib.util

    parent = module_name.rpartition(".")[0]
    if parent and parent not in sys.modules:
        return None
    try:
        return importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):
        return False


def _doctor_problems(info: MethodInfo, code_allowed: bool = True) -> list[str]:
    """Return what is wrong with one method, without importing its trainer.

    With ``code_allowed=False`` (an experimental method without an opt-in) only what the spec and the
    distribution say is checked: the config module is not imported.
    """
    import importlib.util

    if info.spec is None or info.status not in ("ok", "experimental"):
        return [f"status {info.status}: {info.error}"]
    spec = info.spec
    problems = []
    if not code_allowed:
        for name in spec.requires:
            if _module_exists(name) is False:
                problems.append(f"requires {name!r}, which is not importable: pip install {name}")
        for role, path in (("trainer", spec.trainer), ("config", spec.config)):
            module_name = path.partition(":")[0]
            if _module_exists(module_name) is False:
                problems.append(f"{role} module {module_name!r} does not exist (spec.{role}={path!r})")
        return problems
    for name in spec.requires:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            problems.append(f"requires {name!r}, which is not importable: pip install {name}")
    try:
        config_cls = _import_path(spec.config)
    except Exception as exc:
        problems.append(f"config {spec.config!r} cannot be imported: {type(exc).__name__}: {exc}")
    else:
        if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls) and issubclass(config_cls, TrainingConfig)):
            problems.append(f"config {spec.config!r} is not a dataclass subclass of posttrain.TrainingConfig")
        else:
            names = {f.name for f in dataclasses.fields(config_cls)}
            for preset_name, preset in spec.presets.items():
                for field_name in preset.overrides:
                    if field_name not in names:
                        close = closest_field_names(config_cls, field_name)
                        hint = f" (did you mean {', '.join(close)}?)" if close else ""
                        problems.append(f"preset {preset_name!r} overrides unknown field {field_name!r}{hint}")
    module_name, _, _ = spec.trainer.partition(":")
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError) as exc:
        found = False
        problems.append(f"trainer module {module_name!r} cannot be resolved: {type(exc).__name__}: {exc}")
    else:
        if not found:
            problems.append(f"trainer module {module_name!r} does not exist (spec.trainer={spec.trainer!r})")
    return problems


def _cmd_doctor(args: argparse.Namespace, registry: Registry) -> int:
    import warnings

    failed = 0
    infos = registry.list_methods()
    if not infos:
        print("No posttrain methods installed.")
    for info in infos:
        allowed = _code_allowed(registry, info, args.allow_experimental or ())
        problems = _doctor_problems(registry.check_config(info) if allowed else info, code_allowed=allowed or not info.is_loadable)
        label = f"{info.name} ({info.distribution} {info.version}, {info.maturity or '?'})"
        if info.is_loadable and not allowed and not problems:
            label += f": spec checked; its code is not imported before the opt-in ({_opt_in_hint(info.name, 'doctor')} checks its config)"
        print(("FAIL  " if problems else "ok    ") + label)
        for problem in problems:
            print(f"      - {problem}")
        failed += bool(problems)
    from posttrain._plugins import _build

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pm = _build(load_entrypoints=True)  # a fresh build, so every load problem is reported now
        except Exception as exc:
            print(f"FAIL  hook plugins: {type(exc).__name__}: {exc}")
            return 1
    broken = [str(w.message) for w in caught if "posttrain plugin" in str(w.message)]
    names = sorted(name for name, _ in pm.list_name_plugin())
    print(("FAIL  " if broken else "ok    ") + f"hook plugins ({', '.join(names)})")
    for message in broken:
        print(f"      - {message}")
    return 1 if failed or broken else 0


def _cmd_new(args: argparse.Namespace, registry: Registry) -> int:
    from posttrain._scaffold import write_plugin

    try:
        root = write_plugin(args.name, family=args.family, directory=args.dir, class_prefix=args.class_prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"wrote {root} ({args.family} template, experimental 0.1.0). Next:")
    print(f"  pip install -e {root}")
    print(f"  posttrain list                      # shows {args.name} as experimental")
    print(f"  pytest {os.path.join(root, 'tests')}          # conformance suite + learning test")
    return 0


def _cmd_snapshot(args: argparse.Namespace, registry: Registry) -> int:
    from posttrain.conformance import snapshot

    if args.core == bool(args.method):
        raise UsageError("name one method (posttrain snapshot NAME) or pass --core for posttrain's own surface.")
    if args.core:
        live, path = snapshot.core_surface(), snapshot.snapshot_path(None)
    else:
        info = registry.get_info(args.method)
        if not info.is_loadable:
            raise UsageError(f"method {info.name!r} has status {info.status}: {info.error}")
        if not args.write and info.version.split(".")[0].strip() in ("0", "v0"):
            print(f"{info.name} ({info.distribution} {info.version}) is a 0.x distribution: exempt from the snapshot check "
                  "(STABILITY.md: anything may change before 1.0); nothing to check. `--write` records one anyway.")
            return 0
        from posttrain.conformance.tiny import run_metric_names

        print(f"running {info.name} for a few steps on a tiny model to record its metric names ...", file=sys.stderr)
        live, path = snapshot.method_surface(info, metrics=run_metric_names(info)), snapshot.snapshot_path(info)
    try:
        if args.write:
            changes = snapshot.write(live, path)
            print(f"wrote {path}" + (f" ({len(changes)} changes: " + "; ".join(c.describe() for c in changes[:5]) + ")" if changes else ""))
        else:
            snapshot.check(live, path)
            print(f"{path}: the public surface matches (version {live['version']})")
    except snapshot.SnapshotError as exc:
        print(f"posttrain snapshot: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_diagnose(args: argparse.Namespace, registry: Registry) -> int:
    from posttrain.diagnostics import diagnose, format_report

    try:
        report = diagnose(args.output_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    print(json.dumps(report, indent=2, sort_keys=True) if args.format == "json" else format_report(report))
    if args.plot is not None:
        from posttrain._plot import plot_run

        path = plot_run(args.output_dir, args.plot or None)
        print(f"plot: {path}", file=sys.stderr if args.format == "json" else sys.stdout)
    return 0


def _cmd_serve_teacher(args: argparse.Namespace, registry: Registry) -> int:
    from posttrain._teacher_server import TeacherServer

    if not os.path.isdir(args.model_dir) and os.path.exists(args.model_dir):
        raise UsageError(f"{args.model_dir} is not a model directory: give a directory written by save_pretrained (or a Hub id).")
    server = TeacherServer(args.model_dir, host=args.host, port=args.port, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens)
    server.start()
    print(f"serving {server.model_name} at {server.url} (POST /v1/completions with prompt_logprobs, GET /health, GET /v1/models); "
          "Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.stop()
    return 0


# -- entry point ------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_line_warnings():
    """Print posttrain's own warnings (experimental opt-in, misbehaving plugin) as one line, without a source line."""
    from posttrain._registry import ExperimentalMethodWarning, PluginWarning

    original = warnings.formatwarning  # formatting only: code that records warnings still sees them

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, (ExperimentalMethodWarning, PluginWarning)):
            return f"posttrain: warning: {' '.join(str(message).split())}\n"
        return original(message, category, filename, lineno, line)

    warnings.formatwarning = format_warning
    try:
        yield
    finally:
        warnings.formatwarning = original


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (a cause's message is kept when the error has none of its own)."""
    text = " ".join(str(exc).split())
    if not text and exc.__cause__ is not None:
        text = " ".join(str(exc.__cause__).split())
    return text or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    """Return the ``posttrain`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="posttrain",
        description="Post-training for language models; every method is a plugin.",
        epilog="Multi-process: accelerate launch --multi_gpu --num_processes N -m posttrain train METHOD ...",
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="List installed methods with their maturity and status.", allow_abbrev=False)
    p.add_argument("--format", choices=("table", "json"), default="table", help="Output format (default: table).")
    p.add_argument("--presets", action="store_true", help="Also show each method's presets, and count the paper-backed ones.")
    p.add_argument("--strict", action="store_true", help="Exit 1 if a method is incompatible, conflicting or broken.")
    p.add_argument("--environments", action="store_true",
                   help="List the installed environments (entry-point group posttrain.environments) instead, with their tools and status.")
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("info", help="Show a method's spec, presets, papers and config fields.", allow_abbrev=False)
    p.add_argument("method", help="Method id (see `posttrain list`).")
    p.add_argument("--allow-experimental", action="append", default=[], metavar="NAME",
                   help="Opt in to an experimental method, so that its config fields (its code) are shown.")
    p.set_defaults(handler=_cmd_info)

    p = sub.add_parser(
        "train",
        help="Train with a method.",
        allow_abbrev=False,
        usage=_TRAIN_USAGE.removeprefix("usage: "),
        description=(
            "Train with METHOD. Precedence: config defaults < --preset < --config YAML < --FIELD flags. "
            "`posttrain train METHOD --help` lists the method's fields."
        ),
    )
    p.add_argument("method", nargs="?", help="Method id (see `posttrain list`).")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(handler=_cmd_train)

    p = sub.add_parser("env", help="Show versions, devices and relevant environment variables.", allow_abbrev=False)
    p.set_defaults(handler=_cmd_env)

    p = sub.add_parser("doctor", help="Validate every installed plugin without importing trainers.", allow_abbrev=False)
    p.add_argument("--allow-experimental", action="append", default=[], metavar="NAME",
                   help="Also import and check the config of this experimental method (all: every one). Without it an "
                        "experimental method's code is not imported.")
    p.set_defaults(handler=_cmd_doctor)

    p = sub.add_parser("new", help="Write a new method plugin (installable, passes the conformance suite).", allow_abbrev=False)
    p.add_argument("name", help="Method id: lowercase letters, digits, underscores (the distribution is posttrain-NAME).")
    p.add_argument("--family", default="sft", choices=("sft", "preference", "online"),
                   help="Template: sft (prompt/completion NLL), preference (pairwise logistic loss) or online (REINFORCE with a group-mean baseline from reward functions).")
    p.add_argument("--dir", default=".", help="Parent folder of the new posttrain-NAME/ (default: the current folder).")
    p.add_argument("--class-prefix", default=None, metavar="PREFIX",
                   help="Classes PREFIXConfig and PREFIXTrainer (default: NAME in CamelCase; TRL spells acronyms in capitals, e.g. BCO).")
    p.set_defaults(handler=_cmd_new)

    p = sub.add_parser("snapshot", help="Check (or --write) a stable plugin's or the core's API snapshot (semver by test).", allow_abbrev=False)
    p.add_argument("method", nargs="?", help="Method id (see `posttrain list`).")
    p.add_argument("--core", action="store_true", help="The core's surface: posttrain.__all__, TrainingConfig and the plugin API.")
    p.add_argument("--write", action="store_true", help="Rewrite the snapshot (refused when the version bump is too small).")
    p.set_defaults(handler=_cmd_snapshot)

    p = sub.add_parser("diagnose", help="Judge a finished or running run: verdict, evidence and top actions.", allow_abbrev=False)
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="The run's output_dir (holds metrics.jsonl, diagnostics.jsonl, run_manifest.json).")
    p.add_argument("--format", choices=("text", "json"), default="text", help="Output format (default: text; json follows schema 1, see STABILITY.md).")
    p.add_argument("--plot", nargs="?", const="", default=None, metavar="FILE.png",
                   help="Also write a PNG of the run's curves by signal role, each diagnostic event marked, the verdict in the title "
                        "(default file: OUTPUT_DIR/diagnose.png; needs matplotlib).")
    p.set_defaults(handler=_cmd_diagnose)

    p = sub.add_parser("serve-teacher", help="Serve a frozen model's prompt log-probs over HTTP (vLLM's /v1/completions protocol) for distillation.",
                       allow_abbrev=False)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="The teacher: a directory written by save_pretrained, or a Hub id.")
    p.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface).")
    p.add_argument("--port", type=int, default=8000, help="Port (default: 8000, vLLM's; 0 picks a free one).")
    p.add_argument("--dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"), help="Cast the teacher to this dtype (default: as loaded, float32).")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="Padded tokens per forward (default: 8192).")
    p.set_defaults(handler=_cmd_serve_teacher)
    return parser


def main(argv: Sequence[str] | None = None, *, registry: Registry | None = None) -> int:
    """Run the ``posttrain`` command line.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
        registry: The registry to use (default: the installed plugins; tests pass their own).

    Returns:
        The exit status: 0 on success, 1 on failed checks, 2 on user mistakes.
    """
    args = build_parser().parse_args(argv)
    try:
        with _one_line_warnings():
            return args.handler(args, registry if registry is not None else default_registry())
    except PosttrainError as exc:  # every error a user's input can cause (config, data, checkpoint, reward, gate)
        if os.environ.get("POSTTRAIN_DEBUG", "").strip() not in ("", "0"):
            raise
        print(f"posttrain {args.command}: error: {_one_line(exc)} (POSTTRAIN_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `posttrain info dpo | head`: stop quietly, like other CLI tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
