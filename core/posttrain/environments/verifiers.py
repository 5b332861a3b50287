"""verifiers environments (``pip install verifiers``, its ``verifiers.v1`` stack) as ``environment_factory=`` classes.

A verifiers environment is a package exporting a ``Taskset``: ``load()`` yields ``Task`` objects
(``TaskData``: the prompt, a system prompt, any fields such as a reference answer), a task's
``toolsets`` are ``Toolset`` servers whose ``@vf.tool`` methods the model calls (named
``<server>_<tool>``), and its ``@vf.reward`` methods score the finished ``Trace`` (weighted, summed
into ``trace.reward``). :func:`environment_class` runs it in-process for posttrain:

* ``Env.dataset``: one row per task (``prompt``: the task's system prompt and prompt as messages;
  ``task_index``), the ``train_dataset`` to pass;
* ``reset(**row)`` starts the row's task with fresh per-episode toolsets (their ``setup`` and
  ``setup_task`` hooks run) and a fresh ``State`` shared by the tools and the rewards;
* the tools are the toolsets' ``@vf.tool`` methods, under verifiers' names and with the schema of
  their signature (an argument the docstring does not describe gets a generic description);
* ``Env.reward_funcs``: one reward function returning ``trace.reward``, the task's rubric run on a
  ``Trace`` built from the episode's messages (the environment never sees the model's last answer,
  so the rubric cannot be a ``get_reward()``). The scored trace stays on the environment as
  ``trace``, with its per-reward scores and metrics.

Example::

    from posttrain.environments.verifiers import environment_class
    Env = environment_class("my-taskset")         # an installed environment package, or a Taskset
    trainer = GRPOTrainer(model, reward_funcs=Env.reward_funcs, train_dataset=Env.dataset, environment_factory=Env, args=...)

Not supported (refused with one line, or left out): tasks that need a container runtime, runtime-
dependent rewards (skipped, as verifiers skips them offline), multi-agent ``Env`` subclasses,
harness-level tools, ``@vf.stop`` conditions and LLM judges that need a network.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from posttrain.environments import _check_tool_names, _one_line, _params_from_signature, _require, _run_sync, _text, _tool_method, _ToolSpec

__all__ = ["environment_class", "trace_from_messages"]

_ADAPTER = "posttrain.environments.verifiers"


def _vf() -> Any:
    return _require("verifiers.v1", pip="verifiers", adapter=_ADAPTER)


def _taskset_of(source: Any, config: Mapping | None) -> Any:
    vf = _vf()
    if isinstance(source, str):
        try:
            config_type = vf.taskset_config_type(source)
            return vf.load_taskset(config_type(id=source, **dict(config or {})))
        except (ModuleNotFoundError, AttributeError, TypeError, ValueError) as exc:
            raise ValueError(f"{_ADAPTER}.environment_class({source!r}): the taskset cannot be loaded ({_one_line(exc)}); install the "
                             "environment's package, or pass a vf.Taskset instance.") from None
    if config:
        raise ValueError(f"{_ADAPTER}.environment_class: config= applies to a taskset id; configure a Taskset instance when you build it.")
    if isinstance(source, vf.Taskset):
        return source
    if isinstance(source, vf.Env):
        return source.taskset
    if isinstance(source, type) and issubclass(source, vf.Taskset):
        from verifiers.v1.utils.generic import concrete_type

        config_type = concrete_type(source, vf.TasksetConfig, origin=vf.Taskset) or vf.TasksetConfig
        return source(config_type())
    raise TypeError(f"{_ADAPTER}.environment_class: {source!r} is not a verifiers taskset; pass a vf.Taskset (instance or class), a vf.Env, "
                    "or an installed environment's id.")


def _messages(data: Any) -> list[dict]:
    """A task's prompt as chat messages (system prompt first)."""
    from verifiers.v1.types import content_text

    messages = []
    if data.system_prompt:
        messages.append({"role": "system", "content": data.system_prompt})
    prompt = data.prompt
    if isinstance(prompt, str):
        messages.append({"role": "user", "content": prompt})
    elif prompt:
        for message in prompt:
            role = getattr(message, "role", None) or message.get("role")
            content = getattr(message, "content", None) if not isinstance(message, dict) else message.get("content")
            messages.append({"role": role, "content": content_text(content) if not isinstance(content, str) else content})
    if not messages or messages[-1]["role"] == "system":
        messages.append({"role": "user", "content": ""})
    return messages


def _toolset_tools(toolset: Any) -> list[tuple[str, str]]:
    """``(model-facing name, method name)`` of a toolset's ``@vf.tool`` methods, named as verifiers advertises them (``<server>_<tool>``)."""
    from verifiers.v1.utils.decorators import discover_decorated

    prefix = toolset.server_name
    out = []
    for method in discover_decorated(toolset, "tool"):
        raw = getattr(method, "tool_name", None) or method.__name__
        out.append((f"{prefix}_{raw}" if prefix else raw, method.__name__))
    return out


def trace_from_messages(task: Any, prompt: list, completion: list, *, state: Any = None) -> Any:
    """A verifiers ``Trace`` of ``task`` holding an episode's messages (posttrain's chat messages: the prompt, then the episode's assistant and tool turns).

    The completion's assistant messages are the model-written (``sampled``) ones; each tool call
    gets an id, matched by the tool messages that follow it, in order.
    """
    vf = _vf()
    from verifiers.v1.graph import MessageNode
    from verifiers.v1.trace import AgentInfo, TraceTask

    nodes, pending, call_index = [], [], 0
    for i, message in enumerate(list(prompt) + list(completion)):
        role, content = message.get("role"), message.get("content")
        text = content if isinstance(content, str) else _text(content) if content is not None else ""
        sampled = False
        if role == "system":
            typed = vf.SystemMessage(content=text)
        elif role == "user":
            typed = vf.UserMessage(content=text)
        elif role == "assistant":
            calls = []
            for call in message.get("tool_calls") or []:
                function = call.get("function") or {}
                arguments = function.get("arguments", {})
                calls.append(vf.ToolCall(id=f"call_{call_index}", name=str(function.get("name")),
                                         arguments=arguments if isinstance(arguments, str) else json.dumps(arguments)))
                call_index += 1
            pending = [c.id for c in calls]
            typed = vf.AssistantMessage(content=text, tool_calls=calls or None)
            sampled = i >= len(prompt)
        elif role == "tool":
            typed = vf.ToolMessage(tool_call_id=pending.pop(0) if pending else f"call_{call_index}", content=text, name=message.get("name"))
        else:
            raise ValueError(f"{_ADAPTER}: message {i} has role {role!r}; expected system, user, assistant or tool.")
        nodes.append(MessageNode(parent=i - 1 if i else None, message=typed, sampled=sampled))
    trace_kwargs = {} if state is None else {"state": state}
    trace = vf.Trace(task=TraceTask(type=type(task).__name__, data=task.data, key=task.key, hash=task.hash),
                     agent=AgentInfo(config=vf.AgentConfig()), nodes=nodes, **trace_kwargs)
    trace.is_completed = trace.ok = True
    return trace


def environment_class(taskset: Any, *, config: Mapping | None = None, num_tasks: int | None = None, name: str | None = None) -> type:
    """Return a posttrain environment class (``environment_factory=``) that runs the verifiers taskset ``taskset`` in-process.

    The class carries ``dataset`` (the rows to train on: ``prompt`` and ``task_index``), ``tasks``,
    ``taskset`` and ``reward_funcs`` (pass them to the trainer; see the module docstring).

    Args:
        taskset: A ``vf.Taskset`` (instance, or class built with its default config), a ``vf.Env``
            (its taskset), or the id of an installed verifiers environment package.
        config: The taskset config's fields, with an id.
        num_tasks: Use the first ``num_tasks`` tasks (required for an infinite taskset).
        name: The class name (the reward's name in the logs); default the taskset class's.

    Returns:
        The environment class.

    Raises:
        ImportError: ``verifiers`` is not installed (the ``pip`` command is named).
        ValueError: The taskset cannot be loaded, has no tasks, is infinite without ``num_tasks``,
            needs a container, or a tool name cannot be a method.
    """
    vf = _vf()
    from verifiers.v1.state import state_cls

    source = _taskset_of(taskset, config)
    class_name = name or type(source).__name__
    where = f"{_ADAPTER}.environment_class({class_name})"
    if num_tasks is not None:
        source = source.take(int(num_tasks))
    elif not source.bounded:
        raise ValueError(f"{where}: the taskset is infinite; pass num_tasks=N to train on its first N tasks.")
    tasks = list(source)
    if not tasks:
        raise ValueError(f"{where}: the taskset yielded no tasks; check its config (or num_tasks).")
    task_type = type(tasks[0])
    if getattr(task_type, "NEEDS_CONTAINER", False) or any(getattr(t.data, "image", None) for t in tasks):
        raise ValueError(f"{where}: its tasks need a container runtime, which posttrain's in-process tools cannot provide; use a taskset "
                         "whose tools run in-process.")
    state_type = state_cls(task_type)

    # the toolsets: taskset-wide ones are shared by every episode (as verifiers serves them once), a task's are made per episode
    shared = list(type(source).toolsets(source.config))
    for toolset in shared:
        _run_sync(toolset.setup())
    probe = list(task_type.toolsets(tasks[0].config))
    specs: list[_ToolSpec] = []
    for k, toolset in enumerate(shared + probe):
        for tool_name, method_name in _toolset_tools(toolset):
            summary, params = _params_from_signature(getattr(toolset, method_name))
            specs.append(_ToolSpec(tool_name, summary or f"The {tool_name} tool.", params,
                                   lambda self, arguments, _k=k, _m=method_name: self._call_tool(_k, _m, arguments)))
    _check_tool_names(specs, where)
    dataset = [{"prompt": _messages(task.data), "task_index": i} for i, task in enumerate(tasks)]
    n_shared = len(shared)
    made: list[type] = []  # the class, once built (the reward function scores only its episodes)

    def __init__(self) -> None:
        self.task = None
        self.state = None
        self.trace = None
        self._toolsets: list = []

    def reset(self, **row: Any) -> str | None:
        index = row.get("task_index")
        if not isinstance(index, int) or not 0 <= index < len(tasks):
            raise ValueError(f"{class_name}.reset: the row's task_index is {index!r}, not a task of this taskset (0..{len(tasks) - 1}); train on "
                             f"{class_name}.dataset, or give each row the index of its task in {class_name}.tasks.")
        task = tasks[index]
        self.task, self.state, self.trace = task, state_type(), None
        toolsets = list(type(task).toolsets(task.config))
        for toolset in toolsets:
            _run_sync(toolset.setup())
            _run_sync(toolset.setup_task(task))
        for toolset in shared + toolsets:
            if isinstance(getattr(toolset, "_inert_state", None), state_type):
                toolset._inert_state = self.state  # in-process: the tools read and write the episode's state (verifiers syncs it over HTTP)
        self._toolsets = shared + toolsets
        if row.get("prompt") is None:  # the rollout's placeholder prompt: the task's own prompt is the observation
            return _messages(task.data)[-1]["content"]
        return None

    def _call_tool(self, k: int, method_name: str, arguments: dict) -> Any:
        if self.task is None:
            raise RuntimeError("no episode is running: reset() first")
        toolset = self._toolsets[k] if k < len(self._toolsets) else None
        if toolset is None:
            raise RuntimeError(f"tool server {k} is not running")
        return _text(_run_sync(getattr(toolset, method_name)(**arguments)))  # an async tool runs to completion here

    def reward(prompts: list | None = None, completions: list | None = None, environments: list | None = None, **kwargs: Any) -> list[float]:
        if environments is None or completions is None or prompts is None:
            raise ValueError(f"{class_name} reward: it needs prompts=, completions= and environments= (the trainer's reward loop passes them); "
                             f"use it with environment_factory={class_name}.")
        out = []
        for i, (environment, prompt, completion) in enumerate(zip(environments, prompts, completions)):
            if type(environment) is not made[0] or environment.task is None:
                out.append(None)
                continue
            trace = trace_from_messages(environment.task, prompt, completion, state=environment.state)
            try:
                _run_sync(environment.task.score(trace))
            except Exception as exc:
                raise RuntimeError(f"{class_name} reward: scoring task {environment.task.data.idx} (completion {i}) failed: "
                                   f"{_one_line(exc)}") from exc
            environment.trace = trace
            out.append(float(trace.reward))
        return out

    reward.__name__ = reward.__qualname__ = class_name
    namespace: dict[str, Any] = {
        "__init__": __init__, "reset": reset, "_call_tool": _call_tool, "__module__": __name__,
        "__doc__": f"The verifiers taskset {class_name} as a posttrain environment (tools: {', '.join(s.name for s in specs) or 'none'}).",
        "dataset": dataset, "tasks": tasks, "taskset": source, "reward_funcs": [reward], "_n_shared": n_shared,
    }
    for spec in specs:
        namespace[spec.name] = _tool_method(spec, class_name)
    for attr in ("__init__", "reset", "_call_tool"):
        namespace[attr].__qualname__ = f"{class_name}.{attr}"
    made.append(type(class_name, (), namespace))
    return made[0]
