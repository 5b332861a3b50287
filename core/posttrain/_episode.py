"""Episodes: the unit of rollout (rollout contract v2, plugin API 1.5).

An :class:`Episode` is one sample: a prompt (token ids, plus the model's extra inputs such as
``pixel_values``, carried untouched), then :class:`Segment` s of completion tokens, each either
sampled by the policy (with its sampling log-probs) or inserted by an environment or a tool (no
log-probs). Single-turn text is the one-segment case (``RolloutBatch.to_episodes()``).

``rollout_episodes(engine, prompt_ids, sampling, environment=...)`` drives multi-turn episodes on
any rollout backend: each model turn is one ``engine.generate`` call on the prompt plus every token
so far, so the sampling log-probs of every model segment are those of the full context.
:class:`EpisodeBatch` holds episodes, slices without losing their ``extras`` / ``model_inputs``, and
pads them into training tensors with a ``model_mask`` of the model-written tokens (what losses, KL
and importance ratios multiply by).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:  # torch and the engine are imported when used (importing posttrain stays light)
    import torch

    from posttrain._rollout import RolloutBatch, RolloutEngine, SamplingParams

__all__ = ["Segment", "Episode", "EpisodeBatch", "Environment", "rollout_episodes"]

#: Segment sources: tokens the policy sampled, and tokens written by an environment or a tool.
SOURCES = ("model", "inserted")
#: Stop reasons the core writes; an environment may end an episode with any other non-empty string.
STOP_REASONS = ("stop", "length", "max_turns", "environment")


def _token_list(value: Any) -> list[int] | None:
    """``value`` as a list of non-negative ints (a 1-D tensor or tuple is accepted), or None when it is not one."""
    if hasattr(value, "tolist") and getattr(value, "ndim", 1) == 1:  # a 1-D torch tensor / numpy array
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return None
    return [int(t) for t in value]


@dataclass(frozen=True)
class Segment:
    """A run of completion tokens written by one source.

    Args:
        token_ids: The tokens (a non-empty list of non-negative ids).
        source: ``"model"`` (sampled by the policy; ``logprobs`` required) or ``"inserted"`` (written
            by an environment or a tool; ``logprobs`` must be None).
        logprobs: For a model segment, the sampling log-prob of each token (same length as
            ``token_ids``) under the distribution actually sampled from; None for an inserted one.
        role: Optional label, e.g. ``"assistant"`` or ``"tool"``.
        name: Optional label, e.g. the tool's name.

    Raises:
        ValueError: A field is malformed (one line naming it and the fix).
    """

    token_ids: list[int]
    source: str
    logprobs: list[float] | None = None
    role: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        ids = _token_list(self.token_ids)
        if ids is not None:
            object.__setattr__(self, "token_ids", ids)
        if self.logprobs is not None and hasattr(self.logprobs, "tolist"):
            object.__setattr__(self, "logprobs", self.logprobs.tolist())
        if isinstance(self.logprobs, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.logprobs):
            object.__setattr__(self, "logprobs", [float(x) for x in self.logprobs])
        problem = self._problem()
        if problem:
            raise ValueError(f"Segment: {problem}")

    def _problem(self) -> str | None:
        """What is wrong with this segment, in one clause with the fix; None when it is valid."""
        if self.source not in SOURCES:
            return f"source={self.source!r} is not one of {SOURCES}: 'model' for sampled tokens, 'inserted' for environment/tool tokens."
        ids = _token_list(self.token_ids)
        if ids is None or len(ids) == 0:
            return f"token_ids must be a non-empty list of non-negative token ids, got {_short(self.token_ids)}; drop empty segments."
        if self.source == "inserted":
            if self.logprobs is not None:
                return "an 'inserted' segment has no sampling log-probs; pass logprobs=None (or source='model' for sampled tokens)."
        else:
            lps = self.logprobs
            if not isinstance(lps, list) or not all(isinstance(x, float) for x in lps):
                return f"a 'model' segment needs logprobs, a list of floats (one per token), got {_short(lps)}."
            if len(lps) != len(ids):
                return f"a 'model' segment has {len(ids)} token_ids but {len(lps)} logprobs; pass one sampling log-prob per token."
            bad = next((j for j, x in enumerate(lps) if math.isnan(x)), None)
            if bad is not None:
                return f"logprobs[{bad}] is nan; the backend must return the sampling log-prob of every token."
        for label in ("role", "name"):
            value = getattr(self, label)
            if value is not None and not isinstance(value, str):
                return f"{label} must be a string or None, got {type(value).__name__}."
        return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(eq=False)
class Episode:
    """One sample: a prompt, then segments of model-written and inserted tokens.

    The views ``completion_ids``, ``model_mask``, ``sampling_logprobs``, ``truncated`` and
    ``num_model_tokens`` are derived from the segments on access.

    Args:
        prompt_ids: The prompt's token ids (non-empty).
        segments: The completion, in order (may be empty: nothing was generated).
        model_inputs: The model's extra inputs for this prompt (e.g. ``pixel_values``,
            ``image_grid_thw``), carried untouched and never inspected here.
        policy_version: The version of the weights that sampled this episode (the oldest one when
            its turns were sampled by different versions: staleness counts from it).
        stop_reason: Why it ended: ``"stop"`` (a stop token), ``"length"`` (a token budget),
            ``"max_turns"``, ``"environment"``, or a string an environment gives; None while the
            episode is still running (what an :class:`Environment` sees).
        extras: Per-episode data for reward functions or the method (e.g. the dataset row's
            columns); kept through every slice.

    Raises:
        ValueError: A field is malformed; a bad segment is named by its index (``segments[2]``).
    """

    prompt_ids: list[int]
    segments: list[Segment] = field(default_factory=list)
    model_inputs: dict[str, Any] = field(default_factory=dict)
    policy_version: int = 0
    stop_reason: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = _token_list(self.prompt_ids)
        if ids is None or len(ids) == 0:
            raise ValueError(f"Episode.prompt_ids must be a non-empty list of non-negative token ids, got {_short(self.prompt_ids)}.")
        self.prompt_ids = ids
        if not isinstance(self.segments, (list, tuple)):
            raise ValueError(f"Episode.segments must be a list of posttrain.Segment, got {type(self.segments).__name__}.")
        self.segments = list(self.segments)
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, Segment):
                raise ValueError(
                    f"Episode.segments[{i}] is a {type(seg).__name__}, not a posttrain.Segment; build it with Segment(token_ids=..., source='model'|'inserted')."
                )
            problem = seg._problem()  # a segment mutated after construction is caught here
            if problem:
                raise ValueError(f"Episode.segments[{i}]: {problem}")
        for name in ("model_inputs", "extras"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"Episode.{name} must be a dict, got {type(getattr(self, name)).__name__}; pass {{}} when there is nothing to carry.")
        v = self.policy_version
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"Episode.policy_version must be an integer >= 0, got {v!r}.")
        r = self.stop_reason
        if r is not None and (not isinstance(r, str) or not r):
            raise ValueError(f"Episode.stop_reason must be None (still running) or a non-empty string such as {STOP_REASONS}, got {r!r}.")

    @property
    def completion_ids(self) -> list[int]:
        """Every segment's tokens, concatenated."""
        return [t for seg in self.segments for t in seg.token_ids]

    @property
    def model_mask(self) -> list[int]:
        """1 at each completion token the model sampled, 0 at inserted ones (same length as ``completion_ids``)."""
        return [1 if seg.source == "model" else 0 for seg in self.segments for _ in seg.token_ids]

    @property
    def sampling_logprobs(self) -> list[float]:
        """The sampling log-prob of each completion token; 0.0 at inserted tokens."""
        return [lp for seg in self.segments for lp in (seg.logprobs if seg.source == "model" else [0.0] * len(seg.token_ids))]

    @property
    def truncated(self) -> bool:
        """True when the episode ended on a token budget (``stop_reason == "length"``)."""
        return self.stop_reason == "length"

    @property
    def num_model_tokens(self) -> int:
        """How many completion tokens the model sampled."""
        return sum(len(seg.token_ids) for seg in self.segments if seg.source == "model")


def _split_extras(value: Any, n: int, i: int) -> Any:
    """Sample ``i``'s part of a batch-level extras value: a list of ``n`` entries gives its ``i``-th, a dict recurses, anything else is shared."""
    if isinstance(value, dict):
        return {k: _split_extras(v, n, i) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == n:
        return value[i]
    return value


def _gather_extras(values: list[Any]) -> Any:
    """The inverse of :func:`_split_extras`: dicts with the same keys recurse, anything else becomes a list."""
    if values and all(isinstance(v, dict) for v in values) and all(v.keys() == values[0].keys() for v in values):
        return {k: _gather_extras([v[k] for v in values]) for k in values[0]}
    return list(values)


class EpisodeBatch:
    """A list of episodes, grouped by prompt as ``generate`` groups them (``prompt0 x n, prompt1 x n, ...``).

    ``len(batch)``, iteration, ``batch[i]`` (an :class:`Episode`) and ``batch[a:b]`` or
    ``batch[[i, j, ...]]`` (an ``EpisodeBatch`` of the same episode objects, so ``extras`` and
    ``model_inputs`` survive any slice). Concatenate with ``EpisodeBatch([*a, *b])``.

    Args:
        episodes: The episodes.

    Raises:
        ValueError: An entry is not an :class:`Episode` (named by its index).
    """

    def __init__(self, episodes: Iterable[Episode] = ()):
        self.episodes: list[Episode] = list(episodes)
        for i, ep in enumerate(self.episodes):
            if not isinstance(ep, Episode):
                raise ValueError(f"EpisodeBatch: entry {i} is a {type(ep).__name__}, not a posttrain.Episode.")

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self) -> Iterator[Episode]:
        return iter(self.episodes)

    def __getitem__(self, index: int | slice | Sequence[int]) -> Episode | EpisodeBatch:
        if isinstance(index, slice):
            return EpisodeBatch(self.episodes[index])
        if isinstance(index, int) and not isinstance(index, bool):
            return self.episodes[index]
        if hasattr(index, "tolist"):
            index = index.tolist()
        if isinstance(index, (list, tuple, range)) and all(isinstance(i, int) and not isinstance(i, bool) for i in index):
            return EpisodeBatch([self.episodes[i] for i in index])
        raise TypeError(f"EpisodeBatch indices must be an int, a slice or a list of ints, got {type(index).__name__}.")

    def __repr__(self) -> str:
        return f"EpisodeBatch({len(self)} episodes, policy_versions={sorted(set(self.policy_versions))})"

    @property
    def policy_versions(self) -> list[int]:
        """The policy version of each episode."""
        return [ep.policy_version for ep in self.episodes]

    def to_tensors(self, pad_token_id: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Return padded tensors for a training step: ``RolloutBatch.to_tensors``'s keys plus ``model_mask``.

        Args:
            pad_token_id: Id written in padded positions of ``prompt_ids`` / ``completion_ids``.
            device: Where to put the tensors (default CPU).

        Returns:
            ``{"prompt_ids": (N, P) long left-padded, "prompt_mask": (N, P) long,
            "completion_ids": (N, C) long right-padded, "completion_mask": (N, C) long (1 at every real
            completion token, model-written or inserted), "sampling_logprobs": (N, C) float32 (0 at
            inserted and padded tokens), "model_mask": (N, C) long (1 at model-written tokens)}``. Masks
            come from lengths and sources, never from comparing ids with ``pad_token_id``. Losses, KL and
            importance ratios multiply by ``model_mask``.

        Raises:
            ValueError: The batch is empty.
        """
        import torch

        from posttrain._ops import pad
        from posttrain._rollout import RolloutBatch

        if len(self) == 0:
            raise ValueError("EpisodeBatch.to_tensors: the batch is empty; roll out at least one episode.")
        flat = RolloutBatch(
            prompt_ids=[ep.prompt_ids for ep in self.episodes],
            completion_ids=[ep.completion_ids for ep in self.episodes],
            logprobs=[ep.sampling_logprobs for ep in self.episodes],
            truncated=[ep.truncated for ep in self.episodes],
        )
        out = flat.to_tensors(pad_token_id)  # the same padding code, so the same keys and layout
        width = out["completion_ids"].shape[1]
        masks = [torch.tensor(ep.model_mask, dtype=torch.long) for ep in self.episodes] + [torch.zeros(width, dtype=torch.long)]
        out["model_mask"] = pad(masks, padding_value=0, padding_side="right")[:-1]  # (N, C)
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    @classmethod
    def from_rollout(cls, batch: RolloutBatch) -> EpisodeBatch:
        """Return ``batch``'s completions as one-segment episodes (see :meth:`RolloutBatch.to_episodes`).

        Args:
            batch: A ``posttrain.RolloutBatch``.

        Returns:
            An ``EpisodeBatch`` of ``len(batch)`` episodes: one model segment each (none for an empty
            completion), ``stop_reason`` ``"length"`` where truncated else ``"stop"``, the per-sample
            policy version, and ``extras`` split per sample: a value of ``batch.extras`` that is a list
            of ``len(batch)`` entries gives each episode its entry (dicts are split key by key), any
            other value is shared by every episode.

        Raises:
            TypeError: ``batch`` is not a ``RolloutBatch``.
        """
        from posttrain._rollout import RolloutBatch

        if not isinstance(batch, RolloutBatch):
            raise TypeError(f"EpisodeBatch.from_rollout: expected a posttrain.RolloutBatch, got {type(batch).__name__}.")
        n = len(batch)
        episodes = []
        for i in range(n):
            ids, lps = batch.completion_ids[i], batch.logprobs[i]
            episodes.append(
                Episode(
                    prompt_ids=list(batch.prompt_ids[i]),
                    segments=[Segment(list(ids), "model", list(lps))] if ids else [],
                    policy_version=int(batch.policy_versions[i]),
                    stop_reason="length" if batch.truncated[i] else "stop",
                    extras={k: _split_extras(v, n, i) for k, v in batch.extras.items()},
                )
            )
        return cls(episodes)

    def to_rollout(self) -> RolloutBatch:
        """Return single-turn episodes as a ``RolloutBatch`` (the 1.x contract), the inverse of :meth:`from_rollout`.

        Returns:
            A ``RolloutBatch`` with per-sample ``policy_versions`` (``policy_version`` is the oldest) and
            ``extras`` gathered per key into lists of one entry per episode (dicts key by key); a value
            the episodes shared comes back as a list repeating it.

        Raises:
            ValueError: An episode has inserted tokens or more than one segment, carries
                ``model_inputs``, or the episodes' ``extras`` keys differ (the episode is named).
        """
        from posttrain._rollout import RolloutBatch

        keys = self.episodes[0].extras.keys() if self.episodes else set()
        for i, ep in enumerate(self.episodes):
            if len(ep.segments) > 1 or any(seg.source != "model" for seg in ep.segments):
                raise ValueError(
                    f"EpisodeBatch.to_rollout: episode {i} has {len(ep.segments)} segments ({', '.join(s.source for s in ep.segments)}); "
                    "a RolloutBatch holds one model-sampled completion per sample: keep the EpisodeBatch (to_tensors gives model_mask)."
                )
            if ep.model_inputs:
                raise ValueError(f"EpisodeBatch.to_rollout: episode {i} carries model_inputs {sorted(ep.model_inputs)}, which a RolloutBatch cannot hold; keep the EpisodeBatch.")
            if ep.extras.keys() != keys:
                raise ValueError(
                    f"EpisodeBatch.to_rollout: episode {i} has extras keys {sorted(ep.extras)} but episode 0 has {sorted(keys)}; "
                    "RolloutBatch.extras holds one list per key, so every episode needs the same keys."
                )
        versions = self.policy_versions
        return RolloutBatch(
            prompt_ids=[list(ep.prompt_ids) for ep in self.episodes],
            completion_ids=[ep.completion_ids for ep in self.episodes],
            logprobs=[ep.sampling_logprobs for ep in self.episodes],
            truncated=[ep.truncated for ep in self.episodes],
            policy_version=min(versions) if versions else 0,
            extras={k: _gather_extras([ep.extras[k] for ep in self.episodes]) for k in keys},
            policy_versions=versions,
        )


@runtime_checkable
class Environment(Protocol):
    """What :func:`rollout_episodes` needs from an environment (a tool runner, a game, a user simulator).

    After each model turn that ended on a stop token, ``step`` receives the episode so far and says
    what happens next. A plain callable ``fn(episode)`` with the same return value works too.
    """

    def step(self, episode: Episode) -> tuple[list[int] | Segment | None, str | None]:
        """Return ``(inserted, stop_reason)`` for an episode whose last model turn just ended.

        Args:
            episode: The episode so far (``stop_reason`` None; its segments and prompt are a snapshot).
                ``episode.extras`` is the episode's own dict, kept across turns and in the result: an
                environment may keep per-episode state or write what a reward function reads there.

        Returns:
            ``inserted``: token ids to append as an ``"inserted"`` segment (or a ``Segment`` with
            ``source="inserted"`` to label it, e.g. ``role="tool"``), or None / ``[]`` for none.
            ``stop_reason``: None to let the model take another turn after ``inserted``; a non-empty
            string (e.g. ``"environment"``, ``"solved"``) ends the episode after ``inserted``.
        """
        ...


def _turn_seed(seed: int | None, turn: int) -> int | None:
    """Seed of model turn ``turn`` (0-based): the caller's seed for the first, a fixed derivation after, so turns are not correlated."""
    if seed is None or turn == 0:
        return seed
    return (seed + turn * 1_000_003) % 2**31


def _environment_step(environment: Any) -> Callable[[Episode], Any]:
    step = getattr(environment, "step", None)
    if callable(step):
        return step
    if callable(environment):
        return environment
    raise TypeError(
        f"rollout_episodes: environment must have a step(episode) method or be a callable, got {type(environment).__name__}; see posttrain.Environment."
    )


def _checked_step_result(result: Any, row: int, turn: int) -> tuple[Segment | None, str | None]:
    """Validate what ``environment.step`` returned for episode ``row`` after model turn ``turn`` (1-based)."""
    where = f"rollout_episodes: environment.step returned {_short(result)} for episode {row} after model turn {turn}"
    if not isinstance(result, tuple) or len(result) != 2:
        raise ValueError(f"{where}; return a pair (inserted token ids or None, stop_reason or None).")
    inserted, reason = result
    if reason is not None and (not isinstance(reason, str) or not reason):
        raise ValueError(f"{where}; its stop_reason must be None (continue) or a non-empty string such as 'environment'.")
    if inserted is None:
        return None, reason
    if isinstance(inserted, Segment):
        if inserted.source != "inserted":
            raise ValueError(f"{where}; a Segment it returns must have source='inserted' (the model writes its own turns).")
        return inserted, reason
    ids = _token_list(inserted)
    if ids is None:
        raise ValueError(f"{where}; inserted tokens must be a list of non-negative token ids, a Segment(source='inserted') or None.")
    return (Segment(ids, "inserted") if ids else None), reason


def _per_prompt(values: Any, n_prompts: int, name: str) -> list[dict]:
    """``values`` as one dict per prompt (None: empty dicts)."""
    if values is None:
        return [{} for _ in range(n_prompts)]
    if not isinstance(values, (list, tuple)) or len(values) != n_prompts:
        got = f"{len(values)} entries" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"rollout_episodes: {name} must be a list of one dict per prompt ({n_prompts}), got {got}.")
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, dict):
            raise ValueError(f"rollout_episodes: {name}[{i}] must be a dict (or None), got {type(v).__name__}.")
    return [dict(v) if v else {} for v in values]


def rollout_episodes(
    engine: RolloutEngine | Any,
    prompt_ids: list[list[int]],
    sampling: SamplingParams,
    *,
    environment: Environment | Callable[[Episode], Any] | None = None,
    max_turns: int = 1,
    max_episode_tokens: int | None = None,
    model_inputs: list[dict] | None = None,
    extras: list[dict] | None = None,
) -> EpisodeBatch:
    """Roll out ``sampling.n`` episodes per prompt, alternating model turns and environment steps.

    Each model turn is one ``engine.generate`` call over the episodes still running, on the prompt
    plus every completion token so far (model-written and inserted), so the sampling log-probs of
    every model segment are conditioned on the full context whatever the backend. An episode ends
    when a model turn ends without a stop token (``"length"``: ``sampling.max_tokens`` per turn, or
    ``max_episode_tokens`` in all), when there is no environment (``"stop"``), when the environment
    ends it (its stop reason), or when it asks for a model turn after the last of ``max_turns``
    (``"max_turns"``; the tokens it returned then are dropped, as no model turn would follow them).
    Ended episodes are not regenerated. With a ``seed``, the first turn uses ``sampling`` as given
    (so ``max_turns=1`` gives exactly ``engine.generate(...).to_episodes()``) and later turns a seed
    derived from it and the turn number.

    Args:
        engine: A ``posttrain.RolloutEngine`` (or a rollout backend, wrapped in one).
        prompt_ids: Unpadded prompt token ids, one list per prompt.
        sampling: Sampling parameters of every model turn; ``n`` episodes per prompt, grouped
            ``prompt0 x n, prompt1 x n, ...``.
        environment: An :class:`Environment` (or a callable ``step(episode)``); None for single-turn.
        max_turns: Most model turns per episode (>= 1; > 1 needs an environment).
        max_episode_tokens: Most completion tokens per episode, model-written and inserted (None: no
            limit beyond ``max_turns * sampling.max_tokens`` plus insertions). Inserted tokens past it
            are dropped and the episode ends with ``"length"``.
        model_inputs: One dict per prompt of extra model inputs (e.g. ``pixel_values``), passed to
            the backend with every turn's context and stored in each episode untouched.
        extras: One dict per prompt (e.g. the dataset row's columns); each episode gets its own
            shallow copy.

    Returns:
        An :class:`EpisodeBatch` of ``len(prompt_ids) * sampling.n`` finished episodes.

    Raises:
        TypeError: ``sampling`` is not a ``SamplingParams``, or ``environment`` has no ``step``.
        ValueError: Malformed ``prompt_ids``, ``max_turns``, ``max_episode_tokens``,
            ``model_inputs`` or ``extras``, ``max_turns > 1`` without an environment, an environment
            step that returns something malformed, or ``model_inputs`` for a backend that takes none.
    """
    from posttrain._rollout import RolloutEngine, SamplingParams, _validate_prompts

    if not isinstance(engine, RolloutEngine):
        engine = RolloutEngine(engine)
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"rollout_episodes: sampling must be a posttrain.SamplingParams, got {type(sampling).__name__}.")
    try:
        prompts = _validate_prompts(prompt_ids)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("generate:", "rollout_episodes:", 1)) from None
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
        raise ValueError(f"rollout_episodes: max_turns={max_turns!r} is invalid: it must be an integer >= 1.")
    if max_episode_tokens is not None and (not isinstance(max_episode_tokens, int) or isinstance(max_episode_tokens, bool) or max_episode_tokens < 1):
        raise ValueError(f"rollout_episodes: max_episode_tokens={max_episode_tokens!r} is invalid: it must be None or an integer >= 1.")
    if environment is None and max_turns > 1:
        raise ValueError(f"rollout_episodes: max_turns={max_turns} needs an environment to write between model turns; pass environment=... or max_turns=1.")
    step = _environment_step(environment) if environment is not None else None
    inputs = _per_prompt(model_inputs, len(prompts), "model_inputs")
    row_extras = _per_prompt(extras, len(prompts), "extras")

    n = sampling.n
    rows = len(prompts) * n
    prompt_of = [j // n for j in range(rows)]
    segments: list[list[Segment]] = [[] for _ in range(rows)]
    completion: list[list[int]] = [[] for _ in range(rows)]
    version: list[int | None] = [None] * rows
    stop: list[str | None] = [None] * rows
    ep_extras = [dict(row_extras[prompt_of[j]]) for j in range(rows)]  # each episode its own dict
    ep_inputs = [inputs[prompt_of[j]] for j in range(rows)]  # values shared untouched (e.g. pixel tensors)
    has_inputs = any(inputs)

    def budget(j: int) -> int:
        if max_episode_tokens is None:
            return sampling.max_tokens
        return min(sampling.max_tokens, max_episode_tokens - len(completion[j]))

    active = list(range(rows))
    for turn in range(max_turns):
        for j in [j for j in active if budget(j) <= 0]:
            stop[j] = "length"
        active = [j for j in active if stop[j] is None]
        if not active:
            break
        turn_tokens = max(budget(j) for j in active)
        if turn == 0:  # every row is active: let the backend group n samples per prompt, as generate does
            contexts, turn_inputs = prompts, inputs
            turn_sampling = dataclasses.replace(sampling, max_tokens=turn_tokens)
        else:
            contexts = [prompts[prompt_of[j]] + completion[j] for j in active]
            turn_inputs = [ep_inputs[j] for j in active]
            turn_sampling = dataclasses.replace(sampling, n=1, max_tokens=turn_tokens, seed=_turn_seed(sampling.seed, turn))
        batch = engine.generate(contexts, turn_sampling, model_inputs=turn_inputs if has_inputs else None)
        if len(batch) != len(active):
            raise RuntimeError(f"rollout_episodes: the backend returned {len(batch)} completions for {len(active)} requested at turn {turn + 1}.")
        still = []
        for pos, j in enumerate(active):
            ids, lps = batch.completion_ids[pos], batch.logprobs[pos]
            limit = budget(j)
            over = len(ids) > limit  # sampled past this episode's budget: cut (the kept prefix is distributed as a shorter sample)
            ids, lps = ids[:limit], lps[:limit]
            if ids:
                segments[j].append(Segment(list(ids), "model", list(lps)))
                completion[j] += ids
            v = int(batch.policy_versions[pos])
            version[j] = v if version[j] is None else min(version[j], v)
            if over or batch.truncated[pos]:
                stop[j] = "length"
                continue
            if step is None:
                stop[j] = "stop"
                continue
            so_far = Episode(prompts[prompt_of[j]], list(segments[j]), ep_inputs[j], version[j], None, ep_extras[j])
            inserted, reason = _checked_step_result(step(so_far), j, turn + 1)
            if reason is None and turn == max_turns - 1:
                stop[j] = "max_turns"
                continue
            if inserted is not None:
                room = len(inserted.token_ids) if max_episode_tokens is None else max_episode_tokens - len(completion[j])
                if room < len(inserted.token_ids):
                    inserted = dataclasses.replace(inserted, token_ids=inserted.token_ids[:room]) if room > 0 else None
                    reason = reason or "length"
                if inserted is not None:
                    segments[j].append(inserted)
                    completion[j] += inserted.token_ids
            if reason is not None:
                stop[j] = reason
                continue
            still.append(j)
        active = still

    return EpisodeBatch(
        Episode(
            prompt_ids=prompts[prompt_of[j]],
            segments=segments[j],
            model_inputs=ep_inputs[j],
            policy_version=int(version[j] or 0),
            stop_reason=stop[j] or "max_turns",
            extras=ep_extras[j],
        )
        for j in range(rows)
    )
