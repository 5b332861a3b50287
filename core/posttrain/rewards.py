"""Reward functions: the calling convention shared by online methods, and built-in rewards.

A reward function follows TRL's convention: it is called with keyword arguments only,

    f(prompts=..., completions=..., completion_ids=..., <every dataset column>, trainer_state=..., **kwargs)

and returns one ``float`` (or ``None`` = "not applicable to this sample") per completion.
``completions`` are strings, or conversational lists ``[{"role": "assistant", "content": ...}]``.
Functions may be ``async def`` (run concurrently). A function without ``**kwargs`` receives only
the arguments it names, so ``def f(completions, solution)`` works too.

Built-ins (:data:`BUILTIN_REWARDS`, registered through the ``register_reward_functions`` hook):

* ``"accuracy"``: 1.0 / 0.0 exact match of the final answer against the ``solution`` (or
  ``answer``) column; ``None`` when the gold answer is missing or unparseable.
* ``"format"`` (alias ``"think_format"``): 1.0 when the completion is ``<think>...</think>...``.
* ``"overlong_penalty"``: DAPO's soft overlong punishment with ``max_completion_len=256``,
  ``soft_punish_cache=64`` (256 is the default ``max_completion_length`` of GRPO configs).
  Instantiate :class:`SoftOverlongPunishment` for other lengths.

This module imports no torch at import time (reward registration stays light).
"""

from __future__ import annotations

from posttrain._errors import PosttrainError
from posttrain.config import ConfigError

import asyncio
import concurrent.futures
import importlib
import inspect
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = [
    "BUILTIN_REWARDS",
    "RewardFunctionError",
    "RewardResult",
    "RewardModelFunction",
    "SoftOverlongPunishment",
    "accuracy_reward",
    "format_reward",
    "completion_text",
    "extract_final_answer",
    "resolve_reward_functions",
    "compute_rewards",
]


class RewardFunctionError(PosttrainError, RuntimeError):
    """A reward function raised, or returned something other than one number/None per completion."""


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """Return the text of a completion: the string itself, or the last message's ``content``.

    Args:
        completion: A string or a conversational list ``[{"role": ..., "content": ...}, ...]``.

    Returns:
        The completion text (``""`` for an empty conversation).

    Raises:
        TypeError: ``completion`` is neither a string nor a list of message dicts.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and all(isinstance(m, dict) for m in completion):
        if not completion:
            return ""
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts: keep the text parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise TypeError(
        f"completion must be a string or a list of {{'role', 'content'}} messages, got {type(completion).__name__}."
    )


def _boxed_contents(text: str) -> list[str]:
    """Return the contents of every ``\\boxed{...}`` (balanced braces) in ``text``."""
    found = []
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:i])
                    break
    return found


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def extract_final_answer(text: str | None) -> str | None:
    """Return the normalized final answer of ``text``: the last ``\\boxed{}``, else after ``####``, else the last number, else the last line.

    Args:
        text: A completion or a gold solution.

    Returns:
        The normalized answer string (spaces, ``$``, thousands separators and a trailing period
        removed; numbers canonicalized so ``"3.0"``, ``"3"`` and ``"6/2"`` compare equal), or
        ``None`` when nothing can be extracted.
    """
    if text is None:
        return None
    text = str(text)
    boxed = _boxed_contents(text)
    if boxed:
        candidate = boxed[-1]
    elif "####" in text:
        candidate = text.rsplit("####", 1)[1]
    else:
        numbers_found = _NUMBER.findall(text)
        if numbers_found:
            candidate = numbers_found[-1]
        else:
            lines = [line for line in text.strip().splitlines() if line.strip()]
            if not lines:
                return None
            candidate = lines[-1]
    return _normalize(candidate)


def _normalize(answer: str) -> str | None:
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]?frac\{([^}]*)\}\{([^}]*)\}", r"\1/\2", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "")
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", "", s)
    if not s:
        return None
    numeric = s.replace(",", "") if re.fullmatch(r"-?[\d,]*\.?\d+(/\d+)?", s) else None
    if numeric is not None:
        try:
            if "/" in numeric:
                num, den = numeric.split("/")
                value = float(num) / float(den)
            else:
                value = float(numeric)
        except (ValueError, ZeroDivisionError):
            return s.lower()
        return repr(round(value, 9)) if math.isfinite(value) else s
    return s.lower()


# --------------------------------------------------------------------------------------------------
# built-in reward functions
# --------------------------------------------------------------------------------------------------


def accuracy_reward(completions: list, solution: list | None = None, answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """Return 1.0 when the completion's final answer equals the gold one, else 0.0 (None without a usable gold answer).

    The final answer is the last ``\\boxed{...}``, else the text after ``####``, else the last
    number, else the last line; both sides are normalized (see :func:`extract_final_answer`).

    Args:
        completions: Completions (strings or conversational lists).
        solution: Gold solutions, one per completion (the ``solution`` dataset column).
        answer: Used when there is no ``solution`` column.
        **kwargs: Other columns and call arguments (ignored).

    Returns:
        One ``1.0`` / ``0.0`` / ``None`` per completion.

    Raises:
        ValueError: Neither a ``solution`` nor an ``answer`` column was provided.
    """
    gold = solution if solution is not None else answer
    if gold is None:
        raise ValueError(
            "accuracy reward needs a 'solution' (or 'answer') dataset column with the gold answers; "
            "add one to the dataset or drop 'accuracy' from reward_funcs."
        )
    rewards: list[float | None] = []
    for completion, gold_answer in zip(completions, gold):
        target = extract_final_answer(gold_answer) if gold_answer is not None else None
        if target is None:
            rewards.append(None)
            continue
        rewards.append(1.0 if extract_final_answer(completion_text(completion)) == target else 0.0)
    return rewards


_THINK_FORMAT = re.compile(r"^<think>.*?</think>.*$", re.DOTALL)


def format_reward(completions: list, **kwargs: Any) -> list[float]:
    """Return 1.0 when a completion has the ``<think>...</think>answer`` reasoning format, else 0.0.

    Args:
        completions: Completions (strings or conversational lists).
        **kwargs: Other call arguments (ignored).

    Returns:
        One ``1.0`` / ``0.0`` per completion.
    """
    return [1.0 if _THINK_FORMAT.match(completion_text(c).strip()) else 0.0 for c in completions]


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment: 0 up to ``max - cache`` tokens, linear down to -1 at ``max``, -1 beyond.

    A picklable callable class (works with multi-process rollout workers).

    Args:
        max_completion_len: Completion length (tokens) that receives the full -1 penalty.
        soft_punish_cache: Width of the linear ramp before ``max_completion_len`` (0: a hard step).

    Raises:
        ValueError: ``max_completion_len < 1`` or ``soft_punish_cache`` outside ``[0, max_completion_len]``.
    """

    def __init__(self, max_completion_len: int = 256, soft_punish_cache: int = 64):
        if not isinstance(max_completion_len, int) or max_completion_len < 1:
            raise ValueError(f"SoftOverlongPunishment: max_completion_len must be a positive integer, got {max_completion_len!r}.")
        if not isinstance(soft_punish_cache, int) or not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                f"SoftOverlongPunishment: soft_punish_cache must be an integer in [0, max_completion_len={max_completion_len}], "
                f"got {soft_punish_cache!r}."
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache
        self.__name__ = "overlong_penalty"

    def penalty(self, length: int) -> float:
        """Return the penalty for a completion of ``length`` tokens."""
        threshold = self.max_completion_len - self.soft_punish_cache
        if length <= threshold:
            return 0.0
        if length <= self.max_completion_len:
            return (threshold - length) / self.soft_punish_cache  # cache > 0 here
        return -1.0

    def __call__(self, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        """Return one penalty in ``[-1, 0]`` per completion, from the lengths of ``completion_ids``."""
        return [self.penalty(len(ids)) for ids in completion_ids]

    def __repr__(self) -> str:
        return f"SoftOverlongPunishment(max_completion_len={self.max_completion_len}, soft_punish_cache={self.soft_punish_cache})"


#: Built-in reward functions by name (registered through the ``register_reward_functions`` hook).
BUILTIN_REWARDS: dict[str, Callable[..., list]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "think_format": format_reward,
    "overlong_penalty": SoftOverlongPunishment(max_completion_len=256, soft_punish_cache=64),
}


class RewardModelFunction:
    """Score completions with a sequence-classification reward model (one label): returns ``logits[:, 0]``.

    Conversational inputs are chat-templated (``prompt + completion`` messages); plain strings are
    concatenated. Runs under ``torch.no_grad()`` in eval mode, restoring the training mode.

    Args:
        model: An ``AutoModelForSequenceClassification``-style model with ``num_labels == 1``.
        tokenizer: Its tokenizer (needs a pad token).
        batch_size: Texts scored per forward pass.
        max_length: Truncate texts to this many tokens (None: no truncation).
        name: Name used in logs (default ``"reward_model"`` or the model's name).

    Raises:
        ValueError: The model has more than one label, or the tokenizer has no pad token.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int | None = None, name: str | None = None):
        num_labels = getattr(getattr(model, "config", None), "num_labels", 1)
        if num_labels != 1:
            raise ValueError(
                f"RewardModelFunction: the reward model has num_labels={num_labels}; a reward model needs exactly one "
                "label (load it with AutoModelForSequenceClassification.from_pretrained(..., num_labels=1))."
            )
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("RewardModelFunction: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the EOS token).")
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tokenizer.pad_token_id  # needed to find each sequence's last token
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        path = getattr(model.config, "_name_or_path", "") or ""
        self.__name__ = name or (f"reward_model:{os.path.basename(path.rstrip('/'))}" if path else "reward_model")

    def _texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> tuple[list[str], bool]:
        texts = []
        conversational = False
        for prompt, completion in zip(prompts, completions):
            if isinstance(completion, (list, tuple)) or isinstance(prompt, (list, tuple)):
                conversational = True
                prompt_msgs = list(prompt) if isinstance(prompt, (list, tuple)) else [{"role": "user", "content": str(prompt)}]
                completion_msgs = list(completion) if isinstance(completion, (list, tuple)) else [{"role": "assistant", "content": completion}]
                texts.append(self.tokenizer.apply_chat_template(prompt_msgs + completion_msgs, tokenize=False))
            else:
                texts.append(str(prompt) + str(completion))
        return texts, conversational

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        """Return one reward-model score per ``prompt + completion``."""
        import torch

        texts, templated = self._texts(prompts, completions)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        scores: list[float] = []
        self.model.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(texts), self.batch_size):
                    enc = self.tokenizer(
                        texts[start : start + self.batch_size],
                        return_tensors="pt",
                        padding=True,
                        truncation=self.max_length is not None,
                        max_length=self.max_length,
                        add_special_tokens=not templated,  # the chat template already has them
                    ).to(device)
                    logits = self.model(**enc).logits  # (b, 1)
                    scores += logits[:, 0].float().tolist()
        finally:
            self.model.train(was_training)
        return scores


# --------------------------------------------------------------------------------------------------
# resolving specs
# --------------------------------------------------------------------------------------------------


def _function_name(func: Any) -> str:
    name = getattr(func, "__name__", None)
    if name is None and hasattr(func, "func"):  # functools.partial
        name = getattr(func.func, "__name__", None)
    return name or type(func).__name__


def _available_rewards(pm: Any) -> dict[str, Any]:
    from posttrain._plugins import collect_registrations, get_plugin_manager

    pm = pm if pm is not None else get_plugin_manager()
    return collect_registrations(pm, "register_reward_functions")


def _import_path(spec: str) -> Callable:
    module_name, _, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if os.getcwd() not in sys.path:  # like TRL: let `my_rewards:f` find a file next to the script
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({exc}). Use 'module:function' with the "
            "module importable from the current directory or installed."
        ) from exc
    func = getattr(module, attr, None)
    if func is None or not callable(func):
        raise ConfigError(f"reward function {spec!r}: module {module_name!r} has no callable named {attr!r}.")
    return func


def resolve_reward_functions(specs: Any, pm: Any = None) -> list[tuple[str, Callable]]:
    """Turn reward specs into ``[(name, callable), ...]``.

    Args:
        specs: One spec or a list. Each is a callable, a ``(name, callable)`` pair, a registered
            name (built-ins or a plugin's ``register_reward_functions``), or an import path
            ``"module:function"`` / ``"module.function"`` (the current directory is importable).
        pm: A plugin manager for name lookup (default: a fresh one with installed plugins).

    Returns:
        ``(name, callable)`` pairs in order; duplicate names get a ``_2``, ``_3`` suffix.

    Raises:
        ValueError: An unknown name (the message lists the registered ones) or a failed import.
        TypeError: A spec is neither callable nor a string, or is a bare model (wrap it in
            :class:`RewardModelFunction`).
    """
    if specs is None:
        return []
    if isinstance(specs, (str, tuple)) or callable(specs):
        specs = [specs]
    registry: dict[str, Any] | None = None
    resolved: list[tuple[str, Callable]] = []
    for i, spec in enumerate(specs):
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and callable(spec[1]):
            name, func = spec
        elif isinstance(spec, str):
            if registry is None:
                registry = _available_rewards(pm)
            if spec in registry:
                name, func = spec, registry[spec]
            elif ":" in spec or "." in spec:
                name, func = spec.split(":")[-1].split(".")[-1], _import_path(spec)
            else:
                raise ConfigError(
                    f"Unknown reward function {spec!r}. Registered names: {', '.join(sorted(registry)) or '(none)'}; "
                    "or pass a callable, or an import path 'module:function'."
                )
        elif callable(spec):
            if hasattr(spec, "config") and hasattr(spec, "parameters") and not isinstance(spec, RewardModelFunction):
                raise TypeError(
                    f"reward_funcs[{i}] is a model ({type(spec).__name__}); wrap it with its tokenizer: "
                    "posttrain.rewards.RewardModelFunction(model, tokenizer)."
                )
            name, func = _function_name(spec), spec
        else:
            raise TypeError(f"reward_funcs[{i}] must be a callable, a registered name or 'module:function', got {type(spec).__name__}.")
        base, k = name, 2
        while any(name == n for n, _ in resolved):
            name, k = f"{base}_{k}", k + 1
        resolved.append((name, func))
    return resolved


# --------------------------------------------------------------------------------------------------
# computing rewards
# --------------------------------------------------------------------------------------------------


@dataclass
class RewardResult:
    """Rewards of one batch.

    Attributes:
        per_function: ``(N, F)`` float32 tensor, NaN where a function returned None.
        total: ``(N,)`` float32 weighted nansum over functions (0.0 where every function returned None).
        all_none: ``(N,)`` bool tensor: every function returned None (methods should zero the advantage).
        names: The ``F`` function names (column order of ``per_function``).
        weights: The ``F`` weights used for ``total``.
    """

    per_function: Any
    total: Any
    all_none: Any
    names: list[str]
    weights: list[float]

    def metrics(self, prefix: str = "rewards") -> dict[str, float]:
        """Return loggable means/stds: per function (NaN-aware) and of the weighted ``total`` under ``reward``."""
        import torch

        out: dict[str, float] = {}
        for j, name in enumerate(self.names):
            col = self.per_function[:, j]
            valid = col[~torch.isnan(col)]
            out[f"{prefix}/{name}/mean"] = valid.mean().item() if valid.numel() else float("nan")
            out[f"{prefix}/{name}/std"] = valid.std().item() if valid.numel() > 1 else 0.0
        out["reward"] = self.total.mean().item() if self.total.numel() else float("nan")
        out["reward_std"] = self.total.std().item() if self.total.numel() > 1 else 0.0
        return out


def _select_kwargs(func: Any, kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """Pass everything to ``**kwargs`` functions, otherwise only the parameters ``func`` names."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    missing = [
        p.name
        for p in params.values()
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
    ]
    if missing:
        raise RewardFunctionError(
            f"reward function {name!r} needs argument(s) {missing} that the batch does not provide. Available: "
            f"{sorted(kwargs)}. Add the column(s) to the dataset, or accept **kwargs."
        )
    return {k: v for k, v in kwargs.items() if k in params}


def _run_coroutines(coros: list) -> list:
    async def gather():
        return await asyncio.gather(*coros, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # already inside an event loop (notebooks, async trainers): run on a private loop in a thread
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _to_floats(name: str, values: Any, n: int) -> list[float]:
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # tensor / ndarray
    if not isinstance(values, (list, tuple)):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(values).__name__}; it must return a list with one float (or None) per completion."
        )
    if len(values) != n:
        raise RewardFunctionError(f"reward function {name!r} returned {len(values)} rewards for {n} completions (expected {n}, got {len(values)}).")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, numbers.Real):
            v = float(v)
            if math.isinf(v):
                raise RewardFunctionError(f"reward function {name!r} returned {v} for sample {i}; rewards must be finite (use None for 'not applicable').")
            out.append(v)
        else:
            raise RewardFunctionError(
                f"reward function {name!r} returned a non-numeric reward for sample {i}: {v!r} ({type(v).__name__}); "
                "return a float or None per completion."
            )
    return out


def compute_rewards(
    reward_funcs: Sequence[Any],
    *,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence[Any]] | None = None,
    trainer_state: Any = None,
    reward_weights: Sequence[float] | None = None,
    **extra_kwargs: Any,
) -> RewardResult:
    """Call every reward function on a batch and combine the results.

    Each function is called once per batch with ``prompts``, ``completions``, ``completion_ids``,
    every column of ``columns`` (except ``prompt`` / ``completion``), ``trainer_state`` and
    ``extra_kwargs``. ``async def`` functions run concurrently.

    Args:
        reward_funcs: ``(name, callable)`` pairs (from :func:`resolve_reward_functions`) or callables.
        prompts: ``N`` prompts (strings or message lists), repeated per generation.
        completions: ``N`` completions (strings or ``[{"role": "assistant", "content": ...}]``).
        completion_ids: ``N`` completion token-id lists.
        columns: Extra dataset columns, each a list of ``N`` values (e.g. ``{"solution": [...]}``).
        trainer_state: Passed through as ``trainer_state``.
        reward_weights: ``F`` weights (default all 1.0).
        **extra_kwargs: Passed through to every function (e.g. rollout extras).

    Returns:
        A :class:`RewardResult`.

    Raises:
        ValueError: Mismatched lengths of inputs, columns or ``reward_weights``, or no functions.
        RewardFunctionError: A function raised (naming it), returned the wrong count (expected and
            got), or a non-numeric / infinite entry (naming the sample index).
    """
    import torch

    funcs = [f if isinstance(f, tuple) else (_function_name(f), f) for f in reward_funcs]
    if not funcs:
        raise ValueError("compute_rewards: no reward functions; pass at least one in reward_funcs.")
    n = len(completions)
    for label, seq in (("prompts", prompts), ("completion_ids", completion_ids)):
        if len(seq) != n:
            raise ValueError(f"compute_rewards: {label} has {len(seq)} entries but completions has {n}; pass one per completion.")
    columns = dict(columns or {})
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"compute_rewards: column {key!r} has {len(values)} values but there are {n} completions; repeat each row per generation.")
    if reward_weights is None:
        weights = [1.0] * len(funcs)
    else:
        weights = [float(w) for w in reward_weights]
        if len(weights) != len(funcs):
            raise ValueError(f"compute_rewards: reward_weights has {len(weights)} entries but there are {len(funcs)} reward functions ({[n_ for n_, _ in funcs]}).")

    kwargs: dict[str, Any] = {k: list(v) for k, v in columns.items() if k not in ("prompt", "completion", "completion_ids")}
    kwargs.update(extra_kwargs)
    kwargs.update(prompts=list(prompts), completions=list(completions), completion_ids=[list(c) for c in completion_ids], trainer_state=trainer_state)

    results: list[Any] = [None] * len(funcs)
    pending: dict[int, Any] = {}
    for j, (name, func) in enumerate(funcs):
        call_kwargs = _select_kwargs(func, kwargs, name)
        try:
            out = func(**call_kwargs)
        except Exception as exc:
            raise RewardFunctionError(f"reward function {name!r} raised {type(exc).__name__}: {exc} (on a batch of {n} completions).") from exc
        if inspect.isawaitable(out):
            pending[j] = out
        else:
            results[j] = out
    if pending:
        outs = _run_coroutines(list(pending.values()))
        for j, out in zip(pending, outs):
            if isinstance(out, BaseException):
                name = funcs[j][0]
                raise RewardFunctionError(f"reward function {name!r} raised {type(out).__name__}: {out} (on a batch of {n} completions).") from out
            results[j] = out

    per_function = torch.tensor([_to_floats(name, results[j], n) for j, (name, _) in enumerate(funcs)], dtype=torch.float32).T  # (N, F)
    per_function = per_function.reshape(n, len(funcs))
    weight_t = torch.tensor(weights, dtype=torch.float32)  # (F,)
    all_none = torch.isnan(per_function).all(dim=1)  # (N,)
    total = torch.nansum(per_function * weight_t, dim=1)  # (N,), all-None rows -> 0.0
    total = total.masked_fill(all_none, 0.0)
    return RewardResult(per_function=per_function, total=total, all_none=all_none, names=[name for name, _ in funcs], weights=weights)
