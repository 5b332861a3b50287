"""Pairwise judges: which of two completions of a prompt is better (Online DPO, XPO, Nash-MD).

A pairwise judge follows TRL's ``BasePairwiseJudge`` convention::

    judge.judge(prompts, completions, shuffle_order=True) -> preferences

``prompts`` holds ``B`` prompts (strings or message lists), ``completions`` ``B`` pairs
``[first, second]``, and the answer is one ``int`` per pair: ``0`` when the first completion is
preferred, ``1`` when the second is, ``-1`` when the judge cannot tell (a tie, an unscorable
completion, an answer it could not parse). Turn preferences into chosen / rejected rows with
:func:`posttrain.pair_preferences_to_chosen_rejected`.

Built-ins (:data:`BUILTIN_JUDGES`, registered through the ``register_judges`` hook; build one
by name with :func:`get_judge`):

* ``"reward_functions"``: :class:`RewardFunctionJudge` -- the higher weighted reward wins
  (any reward function of :mod:`posttrain.rewards`, dataset columns included).
* ``"reward_model"``: :class:`RewardModelJudge` -- the higher reward-model score wins.
* ``"openai"``: :class:`OpenAICompatibleJudge` -- an LLM asked over an OpenAI-compatible
  ``/v1/chat/completions`` endpoint (vLLM, TGI, llama.cpp, OpenAI, ...), standard library only.

This module imports no torch at import time (judge registration stays light).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import random
import string
import urllib.error
import urllib.request
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from posttrain._errors import PosttrainError
from posttrain.config import ConfigError

__all__ = [
    "BUILTIN_JUDGES",
    "DEFAULT_PAIRWISE_PROMPT",
    "JudgeError",
    "OpenAICompatibleJudge",
    "PairwiseJudge",
    "RewardFunctionJudge",
    "RewardModelJudge",
    "get_judge",
]

logger = logging.getLogger(__name__)


class JudgeError(PosttrainError, RuntimeError):
    """A judge could not get an answer: its HTTP endpoint failed, was unreachable or answered something unreadable."""


@runtime_checkable
class PairwiseJudge(Protocol):
    """What online preference methods call: one preference per pair of completions (TRL's ``BasePairwiseJudge``).

    Any object with this ``judge`` method is a judge; no base class is needed.
    """

    def judge(self, prompts: list, completions: list, shuffle_order: bool = True) -> list[int]:
        """Return which completion of each pair is better.

        Args:
            prompts: ``B`` prompts (strings or conversational message lists).
            completions: ``B`` pairs ``[first, second]`` (strings or ``[{"role": "assistant", "content": ...}]``).
            shuffle_order: Present each pair in a random (seeded) order and map the answer back, so
                a judge that favours a position is not biased towards the first completion.

        Returns:
            One ``int`` per pair: ``0`` (first preferred), ``1`` (second preferred) or ``-1`` (cannot tell).
        """
        ...


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_pairs(owner: str, prompts: Sequence[Any], completions: Sequence[Any]) -> list[tuple[Any, Any]]:
    """Return ``completions`` as a list of 2-tuples, or raise one line naming the bad entry."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"{owner}: got {len(prompts)} prompts but {len(completions)} completion pairs; pass one pair [first, second] per prompt."
        )
    pairs = []
    for i, pair in enumerate(completions):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            got = f"a {type(pair).__name__} of length {len(pair)}" if isinstance(pair, (list, tuple)) else f"a {type(pair).__name__}"
            raise ValueError(f"{owner}: completions[{i}] must be a pair [first, second] of completions of prompts[{i}], got {got}.")
        pairs.append((pair[0], pair[1]))
    return pairs


def _check_tie(owner: str, tie: Any) -> int:
    if tie not in (-1, 0, 1) or isinstance(tie, bool):
        raise ConfigError(f"{owner}: tie={tie!r} must be -1 (cannot tell), 0 (prefer the first) or 1 (prefer the second).")
    return int(tie)


def _compare(first: float, second: float, tie: int) -> int:
    """0 / 1 for the higher score, ``tie`` for equal scores, -1 when either is NaN (unscorable)."""
    if first != first or second != second:  # NaN
        return -1
    if first > second:
        return 0
    if second > first:
        return 1
    return tie


def _draw_flips(rng: random.Random, n: int) -> list[bool]:
    """One seeded coin per pair: True swaps the pair before the judge sees it."""
    return [rng.random() < 0.5 for _ in range(n)]


def _unflip(preferences: list[int], flips: list[bool]) -> list[int]:
    """Map answers about swapped pairs back to the original order (-1 stays -1)."""
    return [1 - p if flip and p in (0, 1) else p for p, flip in zip(preferences, flips)]


def _render(value: Any) -> str:
    """A prompt or completion as plain text: strings as they are, messages as ``Role: content`` blocks (TRL's SIMPLE_CHAT_TEMPLATE)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        parts = []
        for message in value:
            content = message.get("content", "")
            if isinstance(content, list):  # multimodal parts: keep the text
                content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
            parts.append(f"{str(message.get('role', '')).capitalize()}: {content}\n\n")
        return "".join(parts)
    raise TypeError(f"a judge needs strings or lists of {{'role', 'content'}} messages, got {type(value).__name__}.")


# --------------------------------------------------------------------------------------------------
# judges from rewards
# --------------------------------------------------------------------------------------------------


class RewardFunctionJudge:
    """Prefer the completion with the higher weighted reward (reward functions of :mod:`posttrain.rewards`).

    Rewards come from :func:`posttrain.rewards.compute_rewards`, so every spec
    :func:`posttrain.rewards.resolve_reward_functions` accepts works (callables, registered names,
    ``"module:function"``), functions receive dataset columns, and ``async def`` functions run
    concurrently. A pair is ``-1`` when either completion is unscorable (every function returned
    ``None``); equal rewards give ``tie``.

    ``shuffle_order`` has no effect: each completion is scored on its own, so there is no position
    to be biased by, and ties follow ``tie`` in the original order.

    Args:
        reward_funcs: One reward spec or a list (see :func:`posttrain.rewards.resolve_reward_functions`).
        weights: One weight per reward function (default all 1.0).
        tokenizer: Used to build ``completion_ids`` when :meth:`judge` is not given them
            (``add_special_tokens=False``). Without either, functions receive empty id lists,
            and a function that names ``completion_ids`` is refused.
        tie: The answer for equal rewards: ``-1`` (cannot tell, the default), ``0`` (the first,
            as TRL 1.16's ``OnlineDPOTrainer`` orders ``first >= second``) or ``1``.
        pm: A plugin manager for name lookup (default: the process's).

    Raises:
        ValueError: No reward function, an unknown name, or ``weights`` of the wrong length.
        posttrain.ConfigError: ``tie`` is not -1, 0 or 1.
    """

    def __init__(self, reward_funcs: Any, weights: Sequence[float] | None = None, *, tokenizer: Any = None, tie: int = -1, pm: Any = None):
        from posttrain.rewards import resolve_reward_functions

        self.reward_funcs = resolve_reward_functions(reward_funcs, pm=pm)
        if not self.reward_funcs:
            raise ConfigError("RewardFunctionJudge: reward_funcs is empty; pass at least one reward function, name or 'module:function'.")
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise ConfigError(
                f"RewardFunctionJudge: weights has {len(weights)} entries but there are {len(self.reward_funcs)} reward functions "
                f"({[name for name, _ in self.reward_funcs]}); pass one weight per function."
            )
        self.weights = None if weights is None else [float(w) for w in weights]
        self.tokenizer = tokenizer
        self.tie = _check_tie("RewardFunctionJudge", tie)

    def _completion_ids(self, flat_completions: list, completion_ids: Sequence[Any] | None, n_pairs: int) -> list[list[int]]:
        if completion_ids is not None:
            if len(completion_ids) != n_pairs or any(len(pair) != 2 for pair in completion_ids):
                raise ValueError(
                    f"RewardFunctionJudge.judge: completion_ids must hold one pair of token-id lists per prompt ({n_pairs} pairs), "
                    "in the same order as completions."
                )
            return [list(ids) for pair in completion_ids for ids in pair]
        if self.tokenizer is not None:
            from posttrain.rewards import completion_text

            texts = [completion_text(c) for c in flat_completions]
            return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        import inspect

        for name, func in self.reward_funcs:
            try:
                params = inspect.signature(func).parameters
            except (TypeError, ValueError):
                continue
            if "completion_ids" in params:
                raise ValueError(
                    f"RewardFunctionJudge: reward function {name!r} reads completion_ids; pass completion_ids=... to judge() "
                    "or a tokenizer to RewardFunctionJudge(..., tokenizer=...)."
                )
        return [[] for _ in flat_completions]

    def score_pairs(
        self, prompts: list, completions: list, *, completion_ids: Sequence[Any] | None = None, trainer_state: Any = None, **columns: Sequence[Any]
    ) -> list[tuple[float, float]]:
        """Return the weighted reward of each completion of each pair (NaN where every function returned ``None``).

        Args:
            prompts: ``B`` prompts.
            completions: ``B`` pairs ``[first, second]``.
            completion_ids: ``B`` pairs of token-id lists (optional, see the class).
            trainer_state: Passed to the reward functions.
            **columns: Dataset columns, one value per prompt (each is given to both completions).

        Returns:
            ``B`` tuples ``(reward of first, reward of second)``.

        Raises:
            ValueError: Mismatched lengths, or a pair that is not two completions.
            posttrain.RewardFunctionError: A reward function failed (naming it).
        """
        from posttrain.rewards import compute_rewards

        pairs = _check_pairs("RewardFunctionJudge", prompts, completions)
        n = len(pairs)
        flat_prompts = [p for p in prompts for _ in range(2)]  # pair i -> rows 2i (first), 2i+1 (second)
        flat_completions = [c for pair in pairs for c in pair]
        flat_columns = {}
        for key, values in columns.items():
            if len(values) != n:
                raise ValueError(f"RewardFunctionJudge: column {key!r} has {len(values)} values for {n} prompts; pass one value per prompt.")
            flat_columns[key] = [v for v in values for _ in range(2)]
        result = compute_rewards(
            self.reward_funcs,
            prompts=flat_prompts,
            completions=flat_completions,
            completion_ids=self._completion_ids(flat_completions, completion_ids, n),
            columns=flat_columns,
            trainer_state=trainer_state,
            reward_weights=self.weights,
        )
        total = result.total.masked_fill(result.all_none, float("nan")).tolist()
        return [(total[2 * i], total[2 * i + 1]) for i in range(n)]

    def judge(
        self, prompts: list, completions: list, shuffle_order: bool = True, *, completion_ids: Sequence[Any] | None = None,
        trainer_state: Any = None, **columns: Sequence[Any],
    ) -> list[int]:
        """Return 0 / 1 for the completion with the higher weighted reward, ``tie`` on equal rewards, -1 if either is unscorable.

        Args:
            prompts: ``B`` prompts.
            completions: ``B`` pairs ``[first, second]``.
            shuffle_order: Accepted for the protocol; no effect (see the class).
            completion_ids: ``B`` pairs of token-id lists (optional).
            trainer_state: Passed to the reward functions.
            **columns: Dataset columns, one value per prompt.

        Returns:
            One preference per pair.

        Raises:
            ValueError: Mismatched lengths, or a pair that is not two completions.
            posttrain.RewardFunctionError: A reward function failed (naming it).
        """
        scores = self.score_pairs(prompts, completions, completion_ids=completion_ids, trainer_state=trainer_state, **columns)
        return [_compare(a, b, self.tie) for a, b in scores]

    def __repr__(self) -> str:
        return f"RewardFunctionJudge({[name for name, _ in self.reward_funcs]}, weights={self.weights}, tie={self.tie})"


class RewardModelJudge:
    """Prefer the completion a sequence-classification reward model scores higher.

    Scores come from :class:`posttrain.rewards.RewardModelFunction` (chat-templated for
    conversational inputs, ``prompt + completion`` for strings, no gradients, the model's training
    mode restored). ``shuffle_order`` has no effect: each completion is scored on its own.

    Args:
        model: An ``AutoModelForSequenceClassification``-style model with ``num_labels == 1``.
        tokenizer: Its tokenizer (needs a pad token).
        batch_size: Texts scored per forward pass.
        max_length: Truncate texts to this many tokens (None: no truncation).
        tie: The answer for equal scores: ``-1`` (default), ``0`` or ``1``.

    Raises:
        ValueError: The model has more than one label, or the tokenizer has no pad token.
        posttrain.ConfigError: ``tie`` is not -1, 0 or 1.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16, max_length: int | None = None, tie: int = -1):
        from posttrain.rewards import RewardModelFunction

        self.reward_model = RewardModelFunction(model, tokenizer, batch_size=batch_size, max_length=max_length)
        self.tie = _check_tie("RewardModelJudge", tie)

    def score_pairs(self, prompts: list, completions: list) -> list[tuple[float, float]]:
        """Return the reward-model score of each completion of each pair.

        Args:
            prompts: ``B`` prompts.
            completions: ``B`` pairs ``[first, second]``.

        Returns:
            ``B`` tuples ``(score of first, score of second)``.

        Raises:
            ValueError: Mismatched lengths, or a pair that is not two completions.
        """
        pairs = _check_pairs("RewardModelJudge", prompts, completions)
        scores = self.reward_model(prompts=[p for p in prompts for _ in range(2)], completions=[c for pair in pairs for c in pair])
        return [(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))]

    def judge(self, prompts: list, completions: list, shuffle_order: bool = True) -> list[int]:
        """Return 0 / 1 for the completion the reward model scores higher (``tie`` on equal scores).

        Args:
            prompts: ``B`` prompts.
            completions: ``B`` pairs ``[first, second]``.
            shuffle_order: Accepted for the protocol; no effect (see the class).

        Returns:
            One preference per pair.

        Raises:
            ValueError: Mismatched lengths, or a pair that is not two completions.
        """
        return [_compare(a, b, self.tie) for a, b in self.score_pairs(prompts, completions)]

    def __repr__(self) -> str:
        return f"RewardModelJudge({self.reward_model.__name__!r}, tie={self.tie})"


# --------------------------------------------------------------------------------------------------
# LLM-as-judge over HTTP
# --------------------------------------------------------------------------------------------------

#: TRL's ``DEFAULT_PAIRWISE_SYSTEM_PROMPT`` (its OpenAI/HF pairwise judges), word for word: the
#: placeholders ``{prompt}``, ``{response0}``, ``{response1}``; the answer is "0" or "1".
DEFAULT_PAIRWISE_PROMPT = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{prompt}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "0",
        "output": """{response0}"""
    }},
    {{
        "model_identifier": "1",
        "output": """{response1}"""
    }}
}}

## Task

Evaluate the models on the basis of the quality and relevance of their results, and select the model that generated the best result. Reply with the identifier of the best model. Our evaluation will only take into account the first character of your answer, so make sure it contains only one of the identifiers and nothing else (no quotation marks, no spaces, no new lines, ...).
'''

_PLACEHOLDERS = {"prompt", "response0", "response1"}


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_answer(content: Any) -> int:
    """0 / 1 from the answer's first non-blank character (the prompt says only it counts), else -1."""
    if not isinstance(content, str):
        return -1
    text = content.strip()
    return int(text[0]) if text[:1] in ("0", "1") else -1


class OpenAICompatibleJudge:
    """An LLM as pairwise judge, asked over an OpenAI-compatible ``/v1/chat/completions`` endpoint.

    Works with any server speaking OpenAI's chat-completions API (``vllm serve``, TGI, llama.cpp's
    server, SGLang, OpenAI itself) using only the standard library. As TRL's
    ``OpenAIPairwiseJudge``: ``system_prompt`` is filled with the prompt and the two completions
    and sent as one user message with ``max_tokens=1``; the answer's first character, ``"0"`` or
    ``"1"``, names the better completion. Any other answer gives ``-1`` and is counted in
    :attr:`num_unparsable`. Requests for a batch run concurrently. Conversational prompts and
    completions are rendered as ``Role: content`` blocks.

    With ``shuffle_order=True`` (the default) each pair is shown in an order drawn from a
    ``random.Random(seed)`` and the answer is mapped back, which removes the judge's position bias
    from the preferences (the draws continue across calls, so a run is reproducible).

    Args:
        base_url: The API root, ending in ``/v1`` as for the ``openai`` client
            (``"http://localhost:8000/v1"``); requests go to ``{base_url}/chat/completions``.
        model: The model name the server expects.
        api_key: Sent as ``Authorization: Bearer <api_key>`` (None: no header, as local servers need).
        system_prompt: A template with the placeholders ``{prompt}``, ``{response0}`` and
            ``{response1}`` (literal braces doubled); default :data:`DEFAULT_PAIRWISE_PROMPT`.
        timeout: Seconds to wait for each answer.
        max_tokens: Tokens the judge may write (1 suits the default prompt).
        max_workers: Requests in flight at once.
        seed: Seed of the order shuffling.
        extra_body: Extra JSON fields for each request (e.g. ``{"temperature": 0.0}``).

    Attributes:
        num_requests: Requests answered so far.
        num_unparsable: Answers that were neither "0" nor "1" (judged ``-1``).

    Raises:
        posttrain.ConfigError: ``base_url`` is not an http(s) URL, ``system_prompt`` lacks or adds a
            placeholder, or ``timeout`` / ``max_tokens`` / ``max_workers`` is not positive.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        system_prompt: str = DEFAULT_PAIRWISE_PROMPT,
        timeout: float = 60.0,
        *,
        max_tokens: int = 1,
        max_workers: int = 8,
        seed: int = 0,
        extra_body: dict | None = None,
    ):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"OpenAICompatibleJudge: base_url={base_url!r} must be an http(s) URL such as 'http://localhost:8000/v1'.")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(system_prompt) if name is not None}
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"OpenAICompatibleJudge: system_prompt is not a valid format template ({exc}); double literal braces as {{{{ }}}}.") from exc
        if fields != _PLACEHOLDERS:
            raise ConfigError(
                f"OpenAICompatibleJudge: system_prompt must use exactly the placeholders {{prompt}}, {{response0}}, {{response1}}; "
                f"it has {sorted(fields)} (double literal braces as {{{{ }}}})."
            )
        for name, value in (("timeout", timeout), ("max_tokens", max_tokens), ("max_workers", max_workers)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"OpenAICompatibleJudge: {name}={value!r} must be a positive number.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.system_prompt = system_prompt
        self.timeout = float(timeout)
        self.max_tokens = int(max_tokens)
        self.max_workers = int(max_workers)
        self.extra_body = dict(extra_body or {})
        self.num_requests = 0
        self.num_unparsable = 0
        self._rng = random.Random(seed)

    def _ask(self, prompt: Any, first: Any, second: Any) -> int:
        content = self.system_prompt.format(prompt=_render(prompt), response0=_render(first), response1=_render(second))
        body = {**self.extra_body, "model": self.model, "messages": [{"role": "user", "content": content}], "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace") if exc.fp is not None else ""
            raise JudgeError(
                f"OpenAICompatibleJudge: {self.url} answered HTTP {exc.code} {exc.reason}: {_one_line(detail) or '(no body)'}; "
                f"check base_url, model={self.model!r} and api_key."
            ) from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise JudgeError(
                f"OpenAICompatibleJudge: no answer from {self.url} ({_one_line(reason)}; timeout={self.timeout}s); "
                "is the server running, and does base_url end in /v1?"
            ) from None
        try:
            answer = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(
                f"OpenAICompatibleJudge: {self.url} answered something that is not an OpenAI chat completion: "
                f"{_one_line(raw.decode('utf-8', 'replace')) or '(empty)'}; point base_url at an OpenAI-compatible /v1 API."
            ) from None
        preference = _parse_answer(answer)
        if preference == -1:
            logger.debug("OpenAICompatibleJudge: unparsable answer %r; judged -1.", answer)
        return preference

    def judge(self, prompts: list, completions: list, shuffle_order: bool = True) -> list[int]:
        """Ask the LLM which completion of each pair is better.

        Args:
            prompts: ``B`` prompts.
            completions: ``B`` pairs ``[first, second]``.
            shuffle_order: Show each pair in a seeded random order and map the answer back.

        Returns:
            One preference per pair (``-1`` for an answer that is neither "0" nor "1").

        Raises:
            ValueError: Mismatched lengths, or a pair that is not two completions.
            posttrain.judges.JudgeError: An HTTP error, no answer within ``timeout``, or a response
                that is not a chat completion (one line naming the URL and the fix).
        """
        pairs = _check_pairs("OpenAICompatibleJudge", prompts, completions)
        flips = _draw_flips(self._rng, len(pairs)) if shuffle_order else [False] * len(pairs)
        shown = [(b, a) if flip else (a, b) for (a, b), flip in zip(pairs, flips)]
        if not shown:
            return []
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.max_workers, len(shown))) as pool:
            answers = list(pool.map(lambda args: self._ask(*args), [(p, a, b) for p, (a, b) in zip(prompts, shown)]))
        self.num_requests += len(answers)
        self.num_unparsable += sum(1 for a in answers if a == -1)
        return _unflip(answers, flips)

    def __repr__(self) -> str:
        return f"OpenAICompatibleJudge(base_url={self.url.rsplit('/chat/completions', 1)[0]!r}, model={self.model!r})"


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

#: Built-in judges by name (registered through the ``register_judges`` hook): name -> factory.
BUILTIN_JUDGES: dict[str, Callable[..., Any]] = {
    "reward_functions": RewardFunctionJudge,
    "reward_model": RewardModelJudge,
    "openai": OpenAICompatibleJudge,
}


def get_judge(name_or_obj: Any, *, pm: Any = None, **kwargs: Any) -> Any:
    """Return a pairwise judge: build a registered one by name, or pass a judge object through.

    Names come from the ``register_judges`` hook: the built-ins (``"reward_functions"``,
    ``"reward_model"``, ``"openai"``) and any installed plugin's.

    Args:
        name_or_obj: A registered judge name, or an object with a ``judge`` method (returned as is).
        pm: A plugin manager for name lookup (default: the process's).
        **kwargs: Passed to the judge's factory when ``name_or_obj`` is a name
            (e.g. ``base_url=..., model=...`` for ``"openai"``).

    Returns:
        The judge.

    Raises:
        posttrain.ConfigError: An unknown name (the message lists the registered ones).
        TypeError: ``name_or_obj`` is neither a name nor a judge, or ``kwargs`` came with a judge object.
    """
    if isinstance(name_or_obj, str):
        from posttrain._plugins import collect_registrations, get_plugin_manager

        registry = collect_registrations(pm if pm is not None else get_plugin_manager(), "register_judges")
        if name_or_obj not in registry:
            raise ConfigError(
                f"Unknown judge {name_or_obj!r}. Registered judges: {', '.join(sorted(registry)) or '(none)'}; "
                "or pass an object with a judge(prompts, completions, shuffle_order) method."
            )
        return registry[name_or_obj](**kwargs)
    if callable(getattr(name_or_obj, "judge", None)):
        if kwargs:
            raise TypeError(f"get_judge: keyword arguments {sorted(kwargs)} only apply when building a judge by name; got a judge object.")
        return name_or_obj
    raise TypeError(
        f"get_judge: expected a registered judge name or an object with a judge(prompts, completions, shuffle_order) method, "
        f"got {type(name_or_obj).__name__}."
    )
