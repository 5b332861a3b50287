"""OpenEnv environments (``pip install openenv-core``) as ``environment_factory=`` classes.

An OpenEnv environment is a Gym-style server object, ``reset(...) -> Observation`` and
``step(Action) -> Observation`` (pydantic ``Action`` / ``Observation`` types; an observation carries
``reward`` and ``done``), run in-process or behind OpenEnv's HTTP / WebSocket server
(``openenv.core.create_app``) and reached with an ``EnvClient``. :func:`environment_class` turns one
into a posttrain environment class:

* ``reset(**row)`` resets the OpenEnv environment (passing the row's ``seed`` / ``episode_id``, and
  for an in-process environment every column its ``reset`` names) and returns the initial
  observation as text, appended to the prompt;
* the tools are the environment's MCP tools for an ``MCPEnvironment`` (or an ``MCPToolClient``),
  otherwise one tool whose arguments are the action type's fields (``EchoAction(message=...)`` ->
  ``echo(message: str)``): a call builds the action, steps the environment and returns the
  observation as text;
* ``get_reward()`` is the sum (or the last) of the rewards the steps returned; the attributes
  ``reward``, ``done``, ``observation`` and ``environment`` (the OpenEnv object) are readable by
  reward functions through ``environments=``.

Example::

    from posttrain.environments.openenv import environment_class
    EchoTools = environment_class(EchoEnvironment)                      # in-process
    EchoTools = environment_class(lambda: EchoEnv(base_url=URL))        # an OpenEnv server
    trainer = GRPOTrainer(..., environment_factory=EchoTools)           # reward: get_reward()
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import weakref

from posttrain.environments import _check_tool_names, _one_line, _params_from_json_schema, _require, _snake, _text, _tool_method, _ToolSpec

__all__ = ["environment_class", "observation_text", "close"]

_ADAPTER = "posttrain.environments.openenv"
_OBSERVATION_BASE_FIELDS = ("done", "reward", "metadata")


def _openenv() -> Any:
    return _require("openenv.core", pip="openenv-core", adapter=_ADAPTER)


def observation_text(observation: Any) -> str:
    """The default text of an OpenEnv observation: its own fields (not ``done`` / ``reward`` / ``metadata``), the value alone when there is one field, else JSON."""
    if observation is None:
        return ""
    if hasattr(observation, "model_dump"):
        data = observation.model_dump(mode="json")
    elif isinstance(observation, dict):
        data = dict(observation)
    else:
        return _text(observation)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in _OBSERVATION_BASE_FIELDS}
        if not data:
            return ""
        if len(data) == 1:
            return _text(next(iter(data.values())))
    return _text(data)


class _Backend:
    """One OpenEnv environment (in-process) or client (remote), stepped synchronously; ``reset`` / ``step`` return ``(observation, reward, done)``."""

    def __init__(self, obj: Any, where: str):
        core = _openenv()
        from openenv.core.env_client import EnvClient
        from openenv.core.sync_client import SyncEnvClient

        self.obj = obj
        if isinstance(obj, core.Environment):
            self.local, self.target = True, obj
            self.mcp = core.MCPEnvironment is not None and isinstance(obj, core.MCPEnvironment)
        elif isinstance(obj, (EnvClient, SyncEnvClient)):
            self.local = False
            self.target = obj.sync() if isinstance(obj, EnvClient) else obj
            from openenv.core.mcp_client import MCPClientBase

            self.mcp = isinstance(self.target.async_client, MCPClientBase)
        else:
            raise TypeError(f"{where}: the factory returned {type(obj).__name__}, not an OpenEnv Environment or EnvClient; pass an "
                            "openenv.core.Environment subclass, or a zero-argument factory returning one or a client (lambda: MyEnv(base_url=URL)).")

    def _unpack(self, out: Any) -> tuple[Any, Any, bool]:
        if self.local:
            return out, getattr(out, "reward", None), bool(getattr(out, "done", False))
        return out.observation, out.reward, bool(out.done)

    def reset(self, kwargs: dict) -> tuple[Any, Any, bool]:
        return self._unpack(self.target.reset(**kwargs))

    def step(self, action: Any) -> tuple[Any, Any, bool]:
        return self._unpack(self.target.step(action))

    def reset_parameters(self) -> set[str]:
        """The reset keywords an in-process environment names (a client's server filters them itself: seed and episode_id only)."""
        if not self.local:
            return {"seed", "episode_id"}
        names = set()
        for name, param in inspect.signature(self.target.reset).parameters.items():
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                names.add(name)
        return names

    def close(self) -> None:
        closer = getattr(self.target, "close", None)
        if callable(closer):
            closer()

    def list_tools(self) -> list:
        from openenv.core import ListToolsAction

        if self.local:
            observation = self.target.step(ListToolsAction())
            if getattr(observation, "metadata", {}).get("error"):
                raise RuntimeError(f"listing the MCP tools failed: {observation.metadata['error']}")
            return list(observation.tools)
        return list(self.target.list_tools())

    def action_type(self) -> type | None:
        """The action class the environment's ``step`` (or the client's generic parameters) names, if any."""
        core = _openenv()
        from typing import get_args, get_type_hints

        def usable(candidate: Any) -> bool:
            return isinstance(candidate, type) and issubclass(candidate, core.Action) and candidate is not core.Action

        owner = type(self.target) if self.local else type(self.target.async_client)
        if self.local:
            try:
                hint = get_type_hints(owner.step).get("action")
            except Exception:  # a string annotation naming a class get_type_hints cannot reach (defined in a function)
                hint = inspect.signature(owner.step).parameters.get("action")
                hint = None if hint is None else hint.annotation
                if isinstance(hint, str):  # the Action subclass of that name, in step's module (the latest defined, when several)
                    named = [c for c in _subclasses(core.Action) if c.__name__ == hint.split(".")[-1] and c.__module__ == owner.__module__]
                    hint = named[-1] if named else None
            if usable(hint):
                return hint
        for klass in owner.__mro__:
            for base in getattr(klass, "__orig_bases__", ()):
                args = get_args(base)
                if args and usable(args[0]):
                    return args[0]
        return None


def _subclasses(cls: type) -> list[type]:
    """Every subclass of ``cls``, in definition order within each level."""
    out = []
    for klass in cls.__subclasses__():
        out.append(klass)
        out.extend(_subclasses(klass))
    return out


def _mcp_result_text(observation: Any) -> str:
    """The text of a ``CallToolObservation``; a tool error is raised (the model reads it as the call's error)."""
    error = getattr(observation, "error", None)
    if error is not None:
        message = getattr(error, "message", None) or (error.get("message") if isinstance(error, dict) else str(error))
        raise RuntimeError(message)
    result = getattr(observation, "result", observation)
    content = result.get("content") if isinstance(result, dict) else getattr(result, "content", None)
    if isinstance(content, list):
        texts = [block.get("text") if isinstance(block, dict) else getattr(block, "text", None) for block in content]
        texts = [t for t in texts if isinstance(t, str)]
        if texts:
            return "\n".join(texts)
    data = result.get("data") if isinstance(result, dict) else getattr(result, "data", None)
    return _text(data if data is not None else result)


def _action(action_type: type, arguments: dict) -> Any:
    """The action a tool call describes; invalid arguments are one line the model reads."""
    try:
        return action_type(**arguments)
    except Exception as exc:  # pydantic's ValidationError spans several lines
        raise ValueError(f"invalid arguments for {action_type.__name__}: {_one_line(exc)}") from None


def environment_class(env: Any, *, action: type | None = None, tool_name: str | None = None, tool_description: str | None = None,
                      observation_to_text: Callable[[Any], str] | None = None, reset_columns: Sequence[str] | None = None,
                      reset_observation: bool = True, reward: str | None = "sum", name: str | None = None) -> type:
    """Return a posttrain environment class (``environment_factory=``) that runs the OpenEnv environment ``env``.

    Every instance owns one OpenEnv environment (or client session), reused across the episodes the
    rollout gives it. The environment is built once here to read its tools, and that instance
    serves the first episode.

    Args:
        env: An ``openenv.core.Environment`` subclass (instantiated without arguments), or a
            zero-argument callable returning an ``Environment``, an ``EnvClient`` (its ``.sync()``
            wrapper is used) or a ``SyncEnvClient``, e.g. ``lambda: EchoEnv(base_url=URL)``.
        action: The action class of a non-MCP environment; by default the one its ``step``
            annotation (or the client's ``EnvClient[Action, ...]`` parameters) names.
        tool_name: The name of the action's tool (default: the action class's name in snake case
            without ``Action``: ``EchoAction`` -> ``echo``). Not used for MCP environments.
        tool_description: The action tool's description (default: the action class's docstring).
        observation_to_text: Renders an observation as the text the model reads (default:
            :func:`observation_text`).
        reset_columns: The row columns passed to the environment's ``reset`` (default: ``seed`` and
            ``episode_id``, plus every parameter an in-process ``reset`` names, when the row has them).
        reset_observation: Append the reset observation's text to the prompt.
        reward: ``"sum"`` (``get_reward()`` is the sum of the steps' rewards), ``"last"`` (the last
            step's), or None (no ``get_reward``: pass your own ``reward_funcs``, reading ``reward`` /
            ``observation`` through ``environments=``).
        name: The class name (the reward's name in the logs); default the OpenEnv class's.

    Returns:
        The environment class.

    Raises:
        ImportError: ``openenv-core`` is not installed (the ``pip`` command is named).
        TypeError: ``env`` is not an environment class or factory, or an instance was passed.
        ValueError: The action type cannot be told, a bad ``reward``, or a tool name that cannot be a method.
    """
    core = _openenv()
    from openenv.core.env_client import EnvClient
    from openenv.core.sync_client import SyncEnvClient

    if reward not in ("sum", "last", None):
        raise ValueError(f"{_ADAPTER}.environment_class: reward={reward!r}; use 'sum', 'last' or None.")
    reward_mode = reward
    if isinstance(env, (core.Environment, EnvClient, SyncEnvClient)):
        raise TypeError(f"{_ADAPTER}.environment_class: got an instance of {type(env).__name__}; episodes run side by side and each needs its "
                        f"own environment: pass the class, or a zero-argument factory (lambda: {type(env).__name__}(...)).")
    if not callable(env):
        raise TypeError(f"{_ADAPTER}.environment_class: {env!r} is not an OpenEnv environment class or a zero-argument factory.")
    where = f"{_ADAPTER}.environment_class({getattr(env, '__name__', type(env).__name__)})"
    try:
        built = env()
    except TypeError as exc:
        raise TypeError(f"{where}: it could not be built without arguments ({_one_line(exc)}); pass a zero-argument factory, "
                        "e.g. lambda: EchoEnv(base_url=URL) or functools.partial(MyEnvironment, size=5).") from None
    probe = _Backend(built, where)
    class_name = name or (env.__name__ if isinstance(env, type) else type(probe.obj).__name__)
    if not class_name.isidentifier():
        class_name = "OpenEnvEnvironment"
    render = observation_to_text or observation_text

    if probe.mcp:
        specs = []
        for tool in probe.list_tools():
            specs.append(_ToolSpec(tool.name, _one_line(tool.description), _params_from_json_schema(tool.input_schema),
                                   lambda self, arguments, _name=tool.name: self._call_tool(_name, arguments)))
    else:
        action_type = action or probe.action_type()
        if action_type is None:
            raise ValueError(f"{where}: cannot tell the action type (neither step's 'action' annotation nor the client's "
                             "EnvClient[Action, ...] parameters name one); pass action=TheActionClass.")
        if not (isinstance(action_type, type) and hasattr(action_type, "model_json_schema")):
            raise ValueError(f"{where}: action={action_type!r} is not a pydantic Action class; pass the environment's Action subclass.")
        params = [p for p in _params_from_json_schema(action_type.model_json_schema()) if p.name != "metadata"]
        doc = action_type.__dict__.get("__doc__") or ""
        description = tool_description or _one_line(doc.split("\n\n")[0]) or f"Act in the {class_name} environment."
        default_name = _snake(action_type.__name__.removesuffix("Action")) or "step"
        specs = [_ToolSpec(tool_name or default_name, _one_line(description), params,
                           lambda self, arguments, _type=action_type: self._act(_action(_type, arguments)))]
    _check_tool_names(specs, where)
    columns = tuple(reset_columns) if reset_columns is not None else None
    named = probe.reset_parameters()
    spare = [probe]
    live: weakref.WeakSet = weakref.WeakSet()

    def __init__(self) -> None:
        backend = spare.pop() if spare else _Backend(env(), where)
        self._backend = backend
        self.environment = backend.obj
        self.observation = None
        self.rewards: list[float] = []
        self.reward = 0.0
        self.done = False
        live.add(self)

    def reset(self, **row: Any) -> str | None:
        if columns is not None:
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{class_name}.reset: the row has no column {missing[0]!r} (named in reset_columns); add it to the dataset "
                                 "or drop it from reset_columns.")
            kwargs = {c: row[c] for c in columns}
        else:
            kwargs = {k: v for k, v in row.items() if k in named and k != "prompt"}
        observation, _, done = self._backend.reset(kwargs)
        self.observation, self.rewards, self.reward, self.done = observation, [], 0.0, done
        if not reset_observation:
            return None
        text = render(observation)
        if not text:
            return None
        prompt = row.get("prompt")
        opened = isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict) and prompt[-1].get("content")
        return ("\n\n" if opened else "") + text

    def _record(self, observation: Any, step_reward: Any, done: bool) -> None:
        self.observation, self.done = observation, done
        if step_reward is not None:
            self.rewards.append(float(step_reward))
        if self.rewards:
            self.reward = self.rewards[-1] if reward_mode == "last" else sum(self.rewards)

    def _act(self, action_value: Any) -> str:
        if self.done:
            raise RuntimeError("the episode is over (the environment returned done=True); answer without calling tools")
        observation, step_reward, done = self._backend.step(action_value)
        self._record(observation, step_reward, done)
        return render(observation)

    def _call_tool(self, tool: str, arguments: dict) -> str:
        if self.done:
            raise RuntimeError("the episode is over (the environment returned done=True); answer without calling tools")
        from openenv.core import CallToolAction

        observation, step_reward, done = self._backend.step(CallToolAction(tool_name=tool, arguments=arguments))
        self._record(observation, step_reward, done)
        return _mcp_result_text(observation)

    def get_reward(self) -> float:
        return float(self.reward)

    namespace: dict[str, Any] = {
        "__init__": __init__, "reset": reset, "_record": _record, "_act": _act, "_call_tool": _call_tool, "__module__": __name__,
        "_live": live, "_spare": spare,
        "__doc__": f"The OpenEnv environment {class_name} as a posttrain environment (tools: {', '.join(s.name for s in specs)}).",
    }
    if reward_mode is not None:
        namespace["get_reward"] = get_reward
    for spec in specs:
        namespace[spec.name] = _tool_method(spec, class_name)
    cls = type(class_name, (), namespace)
    for attr in ("__init__", "reset", "get_reward", "_record", "_act", "_call_tool"):
        if attr in namespace:
            namespace[attr].__qualname__ = f"{class_name}.{attr}"
    return cls


def close(target: Any) -> None:
    """Close the OpenEnv environments (or client sessions) of ``target``: an instance of a class made by :func:`environment_class`, or the class (every live instance, and the unused probe).

    Call it when training ends to close an ``EnvClient``'s WebSocket session (and a container or
    process the client started) instead of leaving it to interpreter exit.
    """
    if not hasattr(target, "_live"):
        raise TypeError(f"{_ADAPTER}.close: {target!r} is not a class made by environment_class (or an instance of one).")
    if isinstance(target, type):
        backends = [instance._backend for instance in list(target._live)] + list(target._spare)
        target._spare.clear()
    else:
        backends = [target._backend]
    for backend in backends:
        backend.close()
