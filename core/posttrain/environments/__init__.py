"""Environment libraries as ``environment_factory=`` classes: OpenEnv and verifiers.

Each adapter turns an environment written for another library into what
:class:`posttrain.ToolCallingRollout` (and so ``GRPOTrainer(environment_factory=...)``) takes: a
class instantiated without arguments whose ``reset(**row)`` starts an episode, whose public
methods are the tools (type hints and a Google-style docstring, synthesized from the library's
own tool schemas) and, where the library computes the reward from the environment's own state,
``get_reward()``.

* :func:`posttrain.environments.openenv.environment_class` (``pip install openenv-core``): an
  OpenEnv ``Environment`` run in-process, or an ``EnvClient`` of an OpenEnv server.
* :func:`posttrain.environments.verifiers.environment_class` (``pip install verifiers``): a
  verifiers taskset (its tasks become the rows, its ``Toolset`` tools the tools, its
  ``@vf.reward`` rubric the reward function).

Importing this package imports neither library; each adapter imports its own on first use and a
missing one is reported in one line with the ``pip`` command.
"""

from __future__ import annotations

import importlib
import inspect
import json
import keyword
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Union

__all__ = ["openenv", "verifiers"]

_SUBMODULES = ("openenv", "verifiers")


def __getattr__(name: str) -> Any:  # ``posttrain.environments.openenv`` without an explicit import of the submodule
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- shared by the adapters
def _require(module: str, *, pip: str, adapter: str) -> Any:
    """Import ``module`` or raise one line naming the ``pip`` command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = getattr(exc, "name", None) or module
        raise ImportError(f"{adapter} needs the {pip.split()[-1]!r} library ({missing!r} is not importable): pip install {pip}") from None


# one implementation, shared with the tool runner
from posttrain._tools import _run_sync  # noqa: E402


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _one_line(text: Any) -> str:
    return " ".join(str(text or "").split())


def _text(value: Any) -> str:
    """A tool result or observation value as the text the model reads (strings as they are, anything else as JSON when it can be)."""
    if isinstance(value, str):
        return value
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


_JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": float, "boolean": bool, "object": dict, "array": list, "null": type(None)}


def _hint_from_schema(schema: Any, defs: dict | None = None) -> Any:
    """A Python type hint whose ``transformers.utils.get_json_schema`` rendering is (close to) ``schema``."""
    if not isinstance(schema, dict):
        return Any
    defs = defs if defs is not None else schema.get("$defs", {})
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return _hint_from_schema(defs.get(ref.split("/")[-1], {}), defs)
    if "const" in schema:
        return Literal[schema["const"]]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and all(isinstance(v, (str, int, float, bool)) for v in enum):
        return Literal[tuple(enum)]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            hints = [_hint_from_schema(o, defs) for o in options]
            return hints[0] if len(hints) == 1 else Union[tuple(hints)]
    kind = schema.get("type")
    if isinstance(kind, list):
        hints = [_hint_from_schema({**schema, "type": k}, defs) for k in kind]
        return hints[0] if len(hints) == 1 else Union[tuple(hints)]
    if kind == "array":
        items = schema.get("items")
        return list[_hint_from_schema(items, defs)] if isinstance(items, dict) and items else list
    if kind == "object":
        extra = schema.get("additionalProperties")
        return dict[str, _hint_from_schema(extra, defs)] if isinstance(extra, dict) and extra else dict
    return _JSON_TYPES.get(kind, Any)


def _usable_hint(hint: Any) -> Any:
    """``hint`` if ``get_json_schema`` can render it, else a hint built from pydantic's JSON schema of it."""
    from transformers.utils.chat_template_utils import _parse_type_hint

    try:
        _parse_type_hint(hint)
        return hint
    except Exception:
        pass
    try:
        from pydantic import TypeAdapter

        return _hint_from_schema(TypeAdapter(hint).json_schema())
    except Exception:
        return Any


@dataclass
class _Param:
    name: str
    hint: Any
    description: str
    required: bool = True
    default: Any = None


@dataclass
class _ToolSpec:
    """One tool of an adapted environment: ``call(environment, arguments)`` runs it."""

    name: str
    description: str
    params: list[_Param]
    call: Callable[[Any, dict], Any]


def _params_from_json_schema(schema: Any) -> list[_Param]:
    """The parameters of a JSON-schema object (an MCP tool's ``input_schema``, an action model's schema)."""
    schema = schema if isinstance(schema, dict) else {}
    defs = schema.get("$defs", {})
    required = set(schema.get("required") or [])
    params = []
    for name, prop in (schema.get("properties") or {}).items():
        prop = prop if isinstance(prop, dict) else {}
        description = _one_line(prop.get("description") or prop.get("title") or f"The {name} argument.")
        params.append(_Param(name, _hint_from_schema(prop, defs), description, name in required, prop.get("default")))
    return params


def _params_from_signature(function: Callable) -> tuple[str, list[_Param]]:
    """A Python tool's description and parameters: its signature, type hints and (Google-style, when present) docstring."""
    from transformers.utils.chat_template_utils import parse_google_format_docstring
    from typing import get_type_hints

    doc = inspect.getdoc(function) or ""
    try:
        summary, described, _ = parse_google_format_docstring(doc) if doc else ("", {}, None)
    except Exception:
        summary, described = doc, {}
    try:
        hints = get_type_hints(function)
    except Exception:
        hints = getattr(function, "__annotations__", {})
    params = []
    for name, param in inspect.signature(function).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = _usable_hint(hints.get(name, Any))
        required = param.default is inspect.Parameter.empty
        params.append(_Param(name, hint, _one_line(described.get(name) or f"The {name} argument."), required, None if required else param.default))
    return _one_line(summary), params


def _tool_method(spec: _ToolSpec, owner: str) -> Callable:
    """A method named ``spec.name`` whose signature, annotations and Google-style docstring describe the tool (so its schema is the library's)."""
    for param in spec.params:
        if not param.name.isidentifier() or keyword.iskeyword(param.name) or param.name == "self":
            raise ValueError(f"{owner}: tool {spec.name!r} has an argument named {param.name!r}, which cannot be a Python argument name; "
                             "rename it in the environment's tool schema.")
    ordered = [p for p in spec.params if p.required] + [p for p in spec.params if not p.required]
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for p in ordered:
        hint = p.hint if p.required or p.default is not None else Optional[p.hint]
        parameters.append(inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hint,
                                            default=inspect.Parameter.empty if p.required else p.default))
    signature = inspect.Signature(parameters, return_annotation=str)
    call = spec.call

    def method(self, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{spec.name}: {exc}; expected arguments: {[p.name for p in ordered]}") from None
        arguments = dict(bound.arguments)
        arguments.pop("self")
        return call(self, arguments)

    lines = [spec.description or f"The {spec.name} tool."]
    if ordered:
        lines += ["", "Args:"] + [f"    {p.name}: {p.description}" for p in ordered]
    method.__name__ = spec.name
    method.__qualname__ = f"{owner}.{spec.name}"
    method.__doc__ = "\n".join(lines)
    method.__signature__ = signature  # type: ignore[attr-defined]
    method.__annotations__ = {**{p.name: parameters[i + 1].annotation for i, p in enumerate(ordered)}, "return": str}
    return method


def _check_tool_names(specs: list[_ToolSpec], owner: str) -> None:
    seen: set[str] = set()
    for spec in specs:
        if not spec.name.isidentifier() or spec.name.startswith("_") or spec.name in ("reset", "get_reward"):
            raise ValueError(f"{owner}: tool name {spec.name!r} cannot be an environment method (it must be an identifier, not start with '_', "
                             "and not be 'reset' or 'get_reward'); rename the tool in the environment.")
        if spec.name in seen:
            raise ValueError(f"{owner}: two tools are named {spec.name!r}; tool names must be unique (rename one).")
        seen.add(spec.name)
