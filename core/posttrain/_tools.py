"""Tool calling and environments during rollouts: TRL's ``tools=`` / ``environment_factory=`` contract, once for every online method.

:class:`ToolCallingRollout` turns a step's prompt rows into multi-turn episodes: the policy writes
a turn, the tool calls in it are parsed and executed, their results are rendered by the chat
template and inserted as tokens, and the policy writes the next turn, until a turn has no tool call,
``max_tool_calling_iterations`` tool rounds ran, or ``max_completion_length`` tokens (model-written
and inserted, over all turns) are spent. It runs on :func:`posttrain.rollout_episodes`, so every
rollout backend works and every model turn's sampling log-probs are those of its full context.

Token-in / token-out: the trained sequence is exactly the sampled tokens plus the inserted tool
tokens (the chat template's rendering of the tool messages, cut from a rendering of a dummy
conversation, as TRL does); nothing is re-tokenized from text. ``tool_mask`` marks the
model-written tokens: losses, KL and importance ratios multiply by it.

Tools are plain functions (or ``async def``) with type hints and a Google-style docstring (their
schema is ``transformers.utils.get_json_schema``'s). An environment class is instantiated without
arguments (instances are pooled and reused), ``reset(**row)`` starts each episode (a returned string
is appended to the prompt's last message), every other public method is a tool, and an optional
``get_reward()`` is a reward.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

if TYPE_CHECKING:
    from posttrain._rollout import RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["tool_schema", "parse_tool_calls", "tool_response_ids", "run_tool_call", "ToolCallResult", "ToolCallingRollout", "ToolRolloutResult"]

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def tool_schema(tool: Callable) -> dict:
    """Return the JSON schema of a tool function (``transformers.utils.get_json_schema``).

    Raises:
        ValueError: The function lacks the type hints or the docstring the schema needs (one line naming it and the fix).
    """
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(tool)
    except Exception as exc:
        name = getattr(tool, "__name__", repr(tool))
        raise ValueError(
            f"tool {name!r}: its schema cannot be built ({' '.join(str(exc).split())}); give every argument a type hint and write a "
            "Google-style docstring with a description and an 'Args:' entry per argument."
        ) from None


def _tool_name(tool: Callable) -> str:
    return getattr(tool, "__name__", type(tool).__name__)


def parse_tool_calls(tokenizer: Any, ids: Sequence[int]) -> dict:
    """Parse one model turn into an assistant message: ``{"role": "assistant", "content": str, "tool_calls": [...]}``.

    With a tokenizer that carries a response schema (``tokenizer.response_schema`` /
    ``response_template``, as TRL's ``add_response_schema`` sets), its ``parse_response`` is used (a
    turn it cannot parse is plain text, as in TRL). Otherwise the Hermes / Qwen format is read:
    ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block per call. A block that is
    not such JSON becomes a call named ``None`` with ``"error"`` set, so running it reports the
    problem to the model (and counts as a failed call) instead of silently ending the episode.

    Args:
        tokenizer: The policy's tokenizer.
        ids: The turn's token ids (its stop token included or not).

    Returns:
        The message; ``tool_calls`` is ``[]`` when the turn calls no tool. Each call is
        ``{"type": "function", "function": {"name": str, "arguments": dict}}``.
    """
    ids = list(ids)
    if getattr(tokenizer, "response_schema", None) is not None or getattr(tokenizer, "response_template", None) is not None:
        try:
            parsed = tokenizer.parse_response(ids)
        except Exception:
            parsed = None
        if isinstance(parsed, dict):
            content = parsed.get("content") or ""
            if isinstance(content, str) and tokenizer.eos_token:
                content = content.removesuffix(tokenizer.eos_token)
            calls = [c for c in (parsed.get("tool_calls") or []) if isinstance(c, dict) and isinstance(c.get("function"), dict)]
            return {"role": "assistant", "content": content, "tool_calls": calls}
        return {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True), "tool_calls": []}
    text = tokenizer.decode(ids, skip_special_tokens=True)
    calls = []
    for block in _HERMES_CALL.findall(text):
        try:
            call = json.loads(block)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ValueError('expected an object with a "name" string')
            arguments = call.get("arguments", call.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = json.loads(arguments) if arguments.strip() else {}
            if not isinstance(arguments, dict):
                raise ValueError('"arguments" must be an object')
            calls.append({"type": "function", "function": {"name": call["name"], "arguments": arguments}})
        except (ValueError, TypeError) as exc:
            calls.append({"type": "function", "function": {"name": None, "arguments": {}}, "error": f"invalid tool call {block[:80]!r}: {exc}"})
    content = _HERMES_CALL.sub("", text).strip() if calls else text
    return {"role": "assistant", "content": content, "tool_calls": calls}


def tool_response_ids(tokenizer: Any, tool_messages: Sequence[Mapping], *, chat_template_kwargs: Mapping | None = None) -> list[int]:
    """Return the token ids the chat template writes for ``tool_messages`` after an assistant turn, up to the next assistant header.

    The template renders a dummy conversation (a user message, an assistant turn calling the first
    tool) with and without the tool messages; the ids after the first rendering, cut at its last EOS
    (the token a sampled turn ends on), are the insertion. No text is re-tokenized: the sampled turn
    keeps its own ids.

    Raises:
        ValueError: The template's rendering with the tool messages does not extend the one without
            (a template that rewrites earlier turns cannot be used token-in / token-out).
    """
    kwargs = dict(chat_template_kwargs or {})
    name = tool_messages[0].get("name") or "tool"
    dummy = [
        {"role": "user", "content": "dummy"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {}}}]},
    ]
    prefix = list(tokenizer.apply_chat_template(dummy, add_generation_prompt=False, tokenize=True, return_dict=False, **kwargs))
    full = list(tokenizer.apply_chat_template(dummy + list(tool_messages), add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs))
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[: eos[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError(
            "tool_response_ids: the chat template's rendering with the tool messages does not start with its rendering without them "
            "(cut at the last EOS), so tool results cannot be inserted as tokens; use a template that appends turns."
        )
    return full[len(prefix):]


class ToolCallResult(NamedTuple):
    """What :func:`run_tool_call` returns: the tool's name, its result (a string, or a list of content
    blocks; ``{"error": message}`` on failure), the error message (None on success) and whether the
    call timed out."""

    name: str
    result: Any
    error: str | None = None
    timed_out: bool = False


def run_tool_call(call: Mapping, tools: Mapping[str, Callable], *, timeout: float | None = None) -> ToolCallResult:
    """Execute one parsed tool call; return a :class:`ToolCallResult`.

    The tool runs in a daemon thread (an ``async def`` tool in its own event loop there), at most
    ``timeout`` seconds: a tool that hangs is abandoned (its thread cannot be killed; it keeps no
    lock of ours) and reported as timed out. A result that is a list (content blocks) is kept, any
    other is ``str(result)``. An exception, an unknown tool or a malformed call gives
    ``result = {"error": message}`` and ``error = message``.
    """
    name = call.get("function", {}).get("name")
    if call.get("error"):
        return ToolCallResult(str(name), {"error": call["error"]}, call["error"])
    if call.get("type", "function") != "function":
        msg = f"unsupported tool call type {call.get('type')!r}"
        return ToolCallResult(str(name), {"error": msg}, msg)
    tool = tools.get(name)
    if tool is None:
        msg = f"tool {name!r} not found; available: {sorted(tools)}"
        return ToolCallResult(str(name), {"error": msg}, msg)
    arguments = call["function"].get("arguments") or {}
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            value = tool(**arguments)
            if inspect.isawaitable(value):
                value = _run_sync(value)
            box["value"] = value
        except BaseException as exc:  # reported to the model, never raised into the run
            box["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    thread = threading.Thread(target=target, name=f"posttrain-tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        msg = f"tool {name!r} timed out after {timeout:g}s"
        return ToolCallResult(name, {"error": msg}, msg, True)
    if "error" in box:
        return ToolCallResult(name, {"error": box["error"]}, box["error"])
    value = box.get("value")
    return ToolCallResult(name, value if isinstance(value, list) else str(value))


def _run_sync(awaitable: Any) -> Any:
    """Run a coroutine to completion from synchronous code (in a worker thread when this thread already runs an event loop)."""
    if not inspect.isawaitable(awaitable):
        return awaitable

    async def main() -> Any:
        return await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(main())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="posttrain-environment-async", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class ToolRolloutResult(NamedTuple):
    """What :meth:`ToolCallingRollout.rollout` returns.

    Attributes:
        prompts: One prompt per episode (message lists; a ``reset`` observation appended).
        rollout: The episodes as a ``RolloutBatch``: ``completion_ids`` holds model-written and
            inserted tokens, ``logprobs`` is 0 at inserted ones, and ``extras`` has ``tool_mask`` (1 at
            model-written tokens), ``tool_call_count``, ``tool_failure_count``, ``turns`` (one int per
            episode) and ``stop_reason`` (``"stop"``, ``"length"``, ``"max_turns"`` or ``"tool_timeout"``).
        completions: One message list per episode (parsed assistant turns and tool messages), what
            reward functions receive as ``completions``.
        environments: The environment instance of each episode (reward functions receive them as
            ``environments=``), or None without ``environment_factory``.
    """

    prompts: list
    rollout: Any
    completions: list
    environments: list | None


@dataclass
class _EpisodeTools:
    tools: dict[str, Callable]
    schemas: list[dict]
    environment: Any = None


class ToolCallingRollout:
    """Multi-turn rollouts with tools and environments (TRL's ``tools=`` / ``environment_factory=``), for any online method.

    Args:
        tokenizer: The policy's tokenizer; its chat template must render ``tools``, assistant
            ``tool_calls`` and ``tool`` messages.
        tools: Tool functions (sync or ``async def``), given to every episode.
        environment_factory: A class (or zero-argument callable) whose instances are environments,
            or a dict ``{name: factory}`` selected per row by its ``environment`` column. A string
            names an installed environment (entry-point group ``posttrain.environments``) or a
            ``"module:attribute"``.
        max_tool_calling_iterations: Most tool rounds per episode (None: until
            ``max_completion_length``).
        max_completion_length: Most completion tokens per episode, model-written and inserted.
        tool_timeout: Seconds a tool call may run (None: no limit); a call that runs longer is
            abandoned and ends its episode with stop reason ``"tool_timeout"``.
        chat_template_kwargs: Passed to every ``apply_chat_template`` call.

    Raises:
        ValueError: No tools and no environment, an environment without ``reset``, a tool whose schema
            cannot be built, or two tools with one name.
    """

    def __init__(self, tokenizer: Any, *, tools: Sequence[Callable] | None = None, environment_factory: Any = None,
                 max_tool_calling_iterations: int | None = None, max_completion_length: int = 256, tool_timeout: float | None = None,
                 chat_template_kwargs: Mapping | None = None):
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        for tool in self.tools:
            if not callable(tool):
                raise ValueError(f"tools: {tool!r} is not callable; pass functions with type hints and a Google-style docstring.")
        self.max_tool_calling_iterations = max_tool_calling_iterations
        self.max_completion_length = int(max_completion_length)
        self.tool_timeout = tool_timeout
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.multi_environment = isinstance(environment_factory, Mapping)
        if environment_factory is None:
            self.factories: dict[Any, Callable] | None = None
        elif self.multi_environment:
            self.factories = dict(environment_factory)
        else:
            self.factories = {None: environment_factory}
        if self.factories is not None:  # an installed environment's name, or "module:attribute"
            from posttrain._environments import load_environment

            self.factories = {k: load_environment(v) if isinstance(v, str) else v for k, v in self.factories.items()}
        if not self.tools and not self.factories:
            raise ValueError("ToolCallingRollout: give tools=[...] or environment_factory=...; with neither there is nothing to call.")
        self._pools: dict[Any, list] = {}
        self._schemas: dict[Any, list[dict]] = {}  # environment class (None: no environment) -> the tools' schemas
        self._reward_types: list[type] = []
        if self.factories is not None:
            for name, factory in self.factories.items():
                if not callable(factory):
                    raise ValueError(f"environment_factory[{name!r}] is not callable; pass the environment class (instantiated without arguments).")
                instance = factory()  # probed once: validates reset, seeds the pool
                if not callable(getattr(instance, "reset", None)):
                    raise ValueError(f"environment_factory{'' if name is None else f'[{name!r}]'}: {type(instance).__name__} has no reset() method; "
                                     "an environment defines reset(**row) (returning None or a string appended to the prompt).")
                self._pools[name] = [instance]
                if callable(getattr(instance, "get_reward", None)) and type(instance) not in self._reward_types:
                    self._reward_types.append(type(instance))
                self._episode_tools(instance)  # schemas build now: a bad docstring fails at construction
        else:
            self._episode_tools(None)

    # ------------------------------------------------------------------ tools of an episode
    @staticmethod
    def environment_methods(environment: Any) -> list[Callable]:
        """The public methods of ``environment`` that are tools (all but ``reset`` and ``get_reward``)."""
        return [m for n, m in inspect.getmembers(environment, predicate=inspect.ismethod) if not n.startswith("_") and n not in ("reset", "get_reward")]

    def _episode_tools(self, environment: Any) -> _EpisodeTools:
        tools: dict[str, Callable] = {}
        for tool in self.tools + (self.environment_methods(environment) if environment is not None else []):
            name = _tool_name(tool)
            if name in tools:
                raise ValueError(f"tools: two tools are named {name!r}; tool names must be unique (rename one).")
            tools[name] = tool
        key = type(environment) if environment is not None else None  # a class's methods have one schema: built once
        schemas = self._schemas.get(key)
        if schemas is None:
            schemas = self._schemas[key] = [tool_schema(t) for t in tools.values()]
        return _EpisodeTools(tools, schemas, environment)

    def all_tools(self) -> list[Callable]:
        """Every tool an episode may get: ``tools=`` then each probed environment's methods (TRL's ``trainer.tools``), without repeats."""
        out = list(self.tools)
        for pool in self._pools.values():
            out += [m for m in self.environment_methods(pool[0]) if m not in out]
        return out

    def reward_functions(self) -> list[tuple[str, Callable]]:
        """One reward function per environment class that defines ``get_reward()`` (named after the class), as TRL adds them.

        Each returns ``environment.get_reward()`` for episodes of its class and None for others.
        """
        funcs = []
        for env_type in self._reward_types:
            def get_reward(environments=None, _type=env_type, **kwargs):
                if environments is None:
                    raise ValueError(f"{_type.__name__}.get_reward: the reward needs environments=; score with the trainer's reward loop.")
                out = []
                for env in environments:
                    if type(env) is not _type:
                        out.append(None)
                        continue
                    value = env.get_reward()
                    if inspect.isawaitable(value):
                        value = _run_sync(value)
                    out.append(value)
                return out
            get_reward.__name__ = env_type.__name__
            funcs.append((env_type.__name__, get_reward))
        return funcs

    def _environments_for(self, rows: Sequence[Mapping]) -> list:
        names = [row.get("environment") if self.multi_environment else None for row in rows]
        cursor: dict[Any, int] = {}
        out = []
        for i, name in enumerate(names):
            if name not in self.factories:
                raise ValueError(f"row {i}: environment={name!r} is not among the environments of environment_factory {sorted(map(str, self.factories))}; "
                                 "fix the row's 'environment' column.")
            pool, index = self._pools[name], cursor.get(name, 0)
            if index == len(pool):
                pool.append(self.factories[name]())
            cursor[name] = index + 1
            out.append(pool[index])
        return out

    # ------------------------------------------------------------------ one step's episodes
    def rollout(self, engine: RolloutEngine | Any, rows: Sequence[Mapping], sampling: SamplingParams) -> ToolRolloutResult:
        """Roll out one episode per row (pass each prompt row ``G`` times in a row for ``G`` episodes per prompt).

        Args:
            engine: The rollout engine.
            rows: The prompt rows, one per episode: a conversational ``prompt`` (list of messages;
                may be absent with an environment, whose ``reset`` then writes the user message) and
                any columns (``reset`` receives them all, minus ``environment`` with a dict factory).
            sampling: Sampling of every model turn (``n`` must be 1; ``max_tokens`` is capped by
                ``max_completion_length``).

        Returns:
            A :class:`ToolRolloutResult`.

        Raises:
            ValueError: A row's prompt is not a list of messages (the row is named), or a row names an
                unknown environment.
        """
        import dataclasses

        from posttrain._episode import rollout_episodes
        from posttrain._rollout import RolloutBatch

        if sampling.n != 1:
            raise ValueError(f"ToolCallingRollout.rollout: sampling.n must be 1 (got {sampling.n}); repeat each row once per episode.")
        environments = self._environments_for(rows) if self.factories is not None else None
        prompts, prompt_ids, per_episode = [], [], []
        for i, row in enumerate(rows):
            prompt = row.get("prompt", [{"role": "user", "content": ""}] if environments is not None else None)
            if not (isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) and "role" in m for m in prompt)):
                raise ValueError(f"row {i}: tool calling needs a conversational 'prompt' (a list of {{'role', 'content'}} messages), got {str(prompt)[:60]!r}; "
                                 "wrap a text prompt as [{'role': 'user', 'content': text}].")
            prompt = [dict(m) for m in prompt]
            environment = environments[i] if environments is not None else None
            if environment is not None:
                reset_kwargs = {k: v for k, v in row.items() if not (self.multi_environment and k == "environment")}
                observation = environment.reset(**reset_kwargs)
                if observation is not None:
                    prompt[-1] = {**prompt[-1], "content": prompt[-1].get("content", "") + str(observation)}
            tools = self._episode_tools(environment)
            ids = self.tokenizer.apply_chat_template(prompt, tools=tools.schemas or None, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False, **self.chat_template_kwargs)
            prompts.append(prompt)
            prompt_ids.append(list(ids))
            per_episode.append(tools)

        messages: list[list[dict]] = [[] for _ in rows]
        calls = [0] * len(rows)
        failures = [0] * len(rows)
        max_turns = 1 + (self.max_tool_calling_iterations if self.max_tool_calling_iterations is not None else self.max_completion_length)

        def step(episode):
            j = episode.extras["_tool_episode"]
            if not episode.segments or episode.segments[-1].source != "model":  # the turn wrote nothing: nothing to call
                return None, "stop"
            turn = sum(seg.source == "model" for seg in episode.segments)
            message = parse_tool_calls(self.tokenizer, episode.segments[-1].token_ids)
            messages[j].append({k: v for k, v in message.items() if k != "tool_calls" or v})
            if not message["tool_calls"]:
                return None, "stop"
            if turn >= max_turns:  # no model turn would read the results: do not run the tools
                return None, "max_turns"
            tool_messages, timed_out = [], False
            for call in message["tool_calls"]:
                calls[j] += 1
                done = run_tool_call(call, per_episode[j].tools, timeout=self.tool_timeout)
                failures[j] += done.error is not None
                timed_out = timed_out or done.timed_out
                tool_messages.append({"role": "tool", "name": done.name, "content": done.result if isinstance(done.result, list) else str(done.result)})
            messages[j].extend(tool_messages)
            if timed_out:  # a hung tool: end the episode (its thread is abandoned), the run goes on
                return None, "tool_timeout"
            from posttrain._episode import Segment

            ids = tool_response_ids(self.tokenizer, tool_messages, chat_template_kwargs=self.chat_template_kwargs)
            return Segment(ids, "inserted", role="tool", name=tool_messages[0]["name"]), None

        turn_sampling = dataclasses.replace(sampling, max_tokens=min(sampling.max_tokens, self.max_completion_length))
        batch = rollout_episodes(engine, prompt_ids, turn_sampling, environment=step, max_turns=max_turns,
                                 max_episode_tokens=self.max_completion_length, extras=[{"_tool_episode": j} for j in range(len(rows))])
        for j, ep in enumerate(batch):  # a last turn cut by the budget (never parsed by step) still belongs to the messages
            last = ep.segments[-1] if ep.segments else None
            if last is not None and last.source == "model" and ep.stop_reason == "length":
                message = parse_tool_calls(self.tokenizer, last.token_ids)
                messages[j].append({k: v for k, v in message.items() if k != "tool_calls" or v})
        versions = batch.policy_versions
        rollout = RolloutBatch(
            prompt_ids=[ep.prompt_ids for ep in batch],
            completion_ids=[ep.completion_ids for ep in batch],
            logprobs=[ep.sampling_logprobs for ep in batch],
            truncated=[ep.truncated for ep in batch],
            policy_version=min(versions) if versions else 0,
            extras={"tool_mask": [ep.model_mask for ep in batch], "tool_call_count": calls, "tool_failure_count": failures,
                    "turns": [sum(s.source == "model" for s in ep.segments) for ep in batch], "stop_reason": [ep.stop_reason for ep in batch]},
            policy_versions=versions,
        )
        return ToolRolloutResult(prompts, rollout, messages, environments)
