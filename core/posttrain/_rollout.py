"""Rollout engine: generate completions with token ids and sampling log-probs for online methods.

``RolloutEngine(backend="transformers", model=..., tokenizer=...)`` resolves a backend by name
through the ``register_rollout_backends`` hook (built-ins: ``"transformers"``, ``"vllm"``), or
wraps a backend instance. Every backend implements :class:`RolloutBackend`:

* ``generate(prompt_ids, sampling) -> RolloutBatch``: completions, their *processed* sampling
  log-probs (after temperature / top-k / top-p / min-p / repetition penalty: the distribution
  actually sampled from), truncation flags, and the policy version that produced them;
* ``update_weights(model)``: make the backend sample from ``model``'s current weights and bump
  ``policy_version``.

Sampling with ``SamplingParams(seed=...)`` is deterministic and runs under
``torch.random.fork_rng()``, so generating never disturbs the trainer's global RNG stream (which
keeps online-RL resume exact).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, runtime_checkable

import torch

from posttrain._ops import pad

__all__ = [
    "SamplingParams",
    "RolloutBatch",
    "RolloutBackend",
    "TransformersBackend",
    "RolloutEngine",
    "get_rollout_backend",
    "available_rollout_backends",
]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample completions (backend-independent; mirrors vLLM's names).

    Args:
        max_tokens: Maximum number of completion tokens per sample (>= 1).
        temperature: Softmax temperature; ``0`` means greedy decoding.
        top_p: Nucleus sampling mass in ``(0, 1]`` (1 = off).
        top_k: Keep the ``k`` most likely tokens (0 = off).
        min_p: Drop tokens with probability below ``min_p * p_max``, in ``[0, 1]`` (0 = off).
        repetition_penalty: CTRL-style repetition penalty (> 0; 1 = off).
        n: Completions per prompt (>= 1).
        seed: When set, sampling is deterministic and runs on a forked RNG (the global torch RNG is
            left untouched); when ``None`` it draws from (and advances) the global RNG.
        stop_token_ids: Tokens that end a completion (kept as its last token). Empty: the
            tokenizer's / model's EOS (and pad) tokens.

    Raises:
        ValueError: A field is out of range (the message names it and the allowed range).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name}={getattr(self, name)!r} is invalid: {rule}.")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", "it must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "it must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise bad("top_p", "it must be in (0, 1] (1 = off)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise bad("top_k", "it must be an integer >= 0 (0 = off)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "it must be in [0, 1] (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "it must be > 0 (1 = off)")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad("n", "it must be an integer >= 1 (completions per prompt)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise bad("seed", "it must be None or an integer >= 0")
        stop = self.stop_token_ids
        if isinstance(stop, int) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop):
            raise bad("stop_token_ids", "it must be a tuple of non-negative token ids, e.g. (tokenizer.eos_token_id,)")
        object.__setattr__(self, "stop_token_ids", tuple(stop))

    @property
    def greedy(self) -> bool:
        """True when ``temperature == 0`` (argmax decoding)."""
        return self.temperature == 0


@dataclass
class RolloutBatch:
    """Completions of one ``generate`` call, one entry per completion (prompts repeated ``n`` times).

    Entries are grouped by prompt: ``prompt0 x n, prompt1 x n, ...``.

    Attributes:
        prompt_ids: ``N`` prompt token-id lists (``N = len(prompts) * n``).
        completion_ids: ``N`` unpadded completion token-id lists, ending with the stop token when one
            was generated.
        logprobs: ``N`` lists of per-token sampling log-probs (same lengths as ``completion_ids``)
            under the processed distribution actually sampled from (after temperature, top-k,
            top-p, min-p, repetition penalty). Under greedy decoding: the unscaled distribution.
        truncated: ``N`` flags: the completion reached ``max_tokens`` without a stop token.
        policy_version: Version of the weights that produced the batch (see ``update_weights``); the
            oldest one when ``policy_versions`` differ.
        extras: Backend- or plugin-specific per-batch data (e.g. tool masks); forwarded untouched.
            ``to_episodes`` splits a list of ``N`` entries per sample.
        policy_versions: ``N`` per-sample policy versions (plugin API 1.5); default
            ``[policy_version] * N``.

    Raises:
        ValueError: A field does not have one entry per completion, a completion's log-probs do not
            match its tokens, or ``policy_versions`` holds a negative or non-integer version.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    truncated: list[bool]
    policy_version: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    policy_versions: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        lengths = {"completion_ids": len(self.completion_ids), "logprobs": len(self.logprobs), "truncated": len(self.truncated)}
        for name, got in lengths.items():
            if got != n:
                raise ValueError(f"RolloutBatch: {name} has {got} entries but prompt_ids has {n}; every field needs one entry per completion.")
        for i, (c, lp) in enumerate(zip(self.completion_ids, self.logprobs)):
            if len(c) != len(lp):
                raise ValueError(f"RolloutBatch: completion {i} has {len(c)} token ids but {len(lp)} logprobs; they must match.")
        if self.policy_versions is None:
            self.policy_versions = [int(self.policy_version)] * n
        else:
            self.policy_versions = list(self.policy_versions)
            if len(self.policy_versions) != n:
                raise ValueError(f"RolloutBatch: policy_versions has {len(self.policy_versions)} entries but prompt_ids has {n}; pass one version per completion (or none).")
            bad = next((i for i, v in enumerate(self.policy_versions) if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
            if bad is not None:
                raise ValueError(f"RolloutBatch: policy_versions[{bad}]={self.policy_versions[bad]!r} is invalid; versions are integers >= 0.")

    def __len__(self) -> int:
        return len(self.completion_ids)

    def to_episodes(self) -> Any:
        """Return the completions as a ``posttrain.EpisodeBatch`` of one-segment episodes.

        Returns:
            ``EpisodeBatch.from_rollout(self)``: one model segment per episode, ``stop_reason``
            ``"length"`` where truncated else ``"stop"``, per-sample policy versions, and ``extras``
            split per sample (a list of ``N`` entries gives each episode its entry; dicts key by key).
        """
        from posttrain._episode import EpisodeBatch

        return EpisodeBatch.from_rollout(self)

    def to_tensors(self, pad_token_id: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Return padded tensors for a training step.

        Args:
            pad_token_id: Id written in padded positions of ``prompt_ids`` / ``completion_ids``.
            device: Where to put the tensors (default CPU).

        Returns:
            ``{"prompt_ids": (N, P) long left-padded, "prompt_mask": (N, P) long,
            "completion_ids": (N, C) long right-padded, "completion_mask": (N, C) long,
            "sampling_logprobs": (N, C) float32 right-padded with 0}``. Masks come from lengths, never
            from comparing ids with ``pad_token_id`` (pad may equal EOS).

        Raises:
            ValueError: The batch is empty.
        """
        if len(self) == 0:
            raise ValueError("RolloutBatch.to_tensors: the batch is empty; generate at least one completion.")

        def ids(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
            # a zero-length sequence still needs one column: pad a (1,) dummy and mask it out
            width = max(1, max(len(s) for s in seqs))
            tensors = [torch.tensor(s, dtype=torch.long) for s in seqs]
            tensors.append(torch.zeros(width, dtype=torch.long))  # guarantees >= 1 column
            padded = pad(tensors, padding_value=pad_token_id, padding_side=side)[:-1]  # (N, width)
            masks = [torch.ones(len(s), dtype=torch.long) for s in seqs] + [torch.zeros(width, dtype=torch.long)]
            return padded, pad(masks, padding_value=0, padding_side=side)[:-1]

        prompt_ids, prompt_mask = ids(self.prompt_ids, "left")  # (N, P)
        completion_ids, completion_mask = ids(self.completion_ids, "right")  # (N, C)
        lp = [torch.tensor(x, dtype=torch.float32) for x in self.logprobs] + [torch.zeros(completion_ids.shape[1])]
        sampling_logprobs = pad(lp, padding_value=0.0, padding_side="right")[:-1]  # (N, C)
        out = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "sampling_logprobs": sampling_logprobs,
        }
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


@runtime_checkable
class RolloutBackend(Protocol):
    """What the rollout engine needs from a backend (transformers, vLLM, or a plugin's)."""

    policy_version: int
    #: True when the backend samples from the trained model object itself (its sampling log-probs
    #: are then the policy's, and no trainer/sampler mismatch needs correcting); a backend that
    #: does not say is treated as a separate sampler (False).
    samples_from_policy: bool

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        """Sample ``sampling.n`` completions per prompt."""
        ...

    def update_weights(self, model: Any) -> None:
        """Sample from ``model``'s current weights from now on and increment ``policy_version``."""
        ...


def _validate_prompts(prompt_ids: Any) -> list[list[int]]:
    """Return ``prompt_ids`` as a list of non-empty int lists, or raise naming the bad entry."""
    if isinstance(prompt_ids, torch.Tensor) or not isinstance(prompt_ids, (list, tuple)):
        raise TypeError(
            f"generate: prompt_ids must be a list of token-id lists (unpadded), got {type(prompt_ids).__name__}; "
            "tokenize prompts first, e.g. [tokenizer(p)['input_ids'] for p in prompts]."
        )
    out = []
    for i, p in enumerate(prompt_ids):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or len(p) == 0:
            raise ValueError(f"generate: prompt_ids[{i}] must be a non-empty list of token ids, got {p!r}.")
        out.append([int(t) for t in p])
    return out


@contextlib.contextmanager
def _forked_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed sampling on a forked RNG (global streams restored afterwards); no-op when ``seed`` is None."""
    if seed is None:
        yield
        return
    on_cuda = device.type == "cuda"
    # fork (and later restore) the CPU stream and only the model's own accelerator stream
    with torch.random.fork_rng(devices=[device] if on_cuda else [], device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _generation_mode(model: Any) -> Iterator[None]:
    """Temporarily put ``model`` in eval mode with gradient checkpointing off and the KV cache on."""
    was_training = model.training
    gc_modules = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "use_cache") and all(cfg is not c for c, _ in configs):
            configs.append((cfg, cfg.use_cache))
    try:
        model.eval()
        for m in gc_modules:
            m.gradient_checkpointing = False
        for cfg, _ in configs:
            cfg.use_cache = True
        yield
    finally:
        for m in gc_modules:
            m.gradient_checkpointing = True
        for cfg, value in configs:
            cfg.use_cache = value
        model.train(was_training)


def _base_generation_owner(model: Any) -> Any:
    """Return the module whose ``generation_config`` ``generate`` reads (the base model under PEFT)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class TransformersBackend:
    """Rollout backend on ``transformers``' ``model.generate`` (the default; works on CPU and GPU).

    Prompts are left-padded and generated in chunks of ``generation_batch_size`` sequences by a lean
    decode loop (KV cache, one ``logits_to_keep=1`` forward per token, transformers' logits
    processors, inverse-CDF sampling; see ``_decode_chunk``) where a probe showed it equals
    ``model.generate`` for the architecture (``_decode_choice``), otherwise by ``model.generate``. The sampling log-probs are ``log_softmax`` of
    the processed scores at the sampled tokens. The model's own Hub generation defaults (e.g. a ``top_k`` or
    ``repetition_penalty`` in ``generation_config.json``) are NOT applied: only ``SamplingParams``
    decide the sampling distribution.

    Args:
        model: A causal LM (``PreTrainedModel``, PEFT model, or DDP-wrapped when ``accelerator`` is given).
        tokenizer: Its tokenizer (gives the pad and EOS ids).
        generation_batch_size: Sequences generated at once (default: all). Bounds memory: the KV cache,
            and under ``model.generate`` the scores kept for the log-probs
            (``generation_batch_size * max_tokens * vocab`` floats).
        accelerator: An ``accelerate.Accelerator``; the model is unwrapped with it before generating.

    Raises:
        ValueError: ``generation_batch_size`` is not a positive integer, or no pad/EOS id can be found.
    """

    name = "transformers"
    samples_from_policy = True  # generate() runs the trained model object itself

    def __init__(self, model: Any, tokenizer: Any, *, generation_batch_size: int | None = None, accelerator: Any = None):
        if generation_batch_size is not None and (not isinstance(generation_batch_size, int) or generation_batch_size < 1):
            raise ValueError(f"TransformersBackend: generation_batch_size must be a positive integer or None, got {generation_batch_size!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.generation_batch_size = generation_batch_size
        self.accelerator = accelerator
        self.policy_version = 0
        self.pad_token_id = self._pad_token_id()
        self.decode_choice = None  # how the last chunk was decoded ("lean" or "generate", with the reason)

    # -- helpers ---------------------------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        gen_cfg = getattr(_base_generation_owner(self._unwrapped()), "generation_config", None)
        gen_eos = getattr(gen_cfg, "eos_token_id", None)
        for value in (tok_eos, gen_eos):
            if value is None:
                continue
            for t in value if isinstance(value, (list, tuple)) else [value]:
                if int(t) not in ids:
                    ids.append(int(t))
        return ids

    def _pad_token_id(self) -> int:
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is None:
            eos = self._eos_ids()
            if not eos:
                raise ValueError(
                    "TransformersBackend: the tokenizer has neither a pad_token_id nor an eos_token_id; "
                    "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token)."
                )
            pad_id = eos[0]
        return int(pad_id)

    def _stop_ids(self, sampling: SamplingParams) -> list[int]:
        if sampling.stop_token_ids:
            return list(sampling.stop_token_ids)
        ids = self._eos_ids()
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        if pad_id is not None and int(pad_id) not in ids:
            ids.append(int(pad_id))
        if not ids:
            raise ValueError(
                "TransformersBackend: no stop tokens: the tokenizer and model define no EOS; pass "
                "SamplingParams(stop_token_ids=(...,)) or set tokenizer.eos_token."
            )
        return ids

    def _unwrapped(self) -> Any:
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.model)
        return getattr(self.model, "module", self.model) if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    def _generation_config(self, sampling: SamplingParams, stop_ids: list[int]):
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_tokens,
            do_sample=not sampling.greedy,
            num_beams=1,
            num_return_sequences=1,
            repetition_penalty=float(sampling.repetition_penalty),
            eos_token_id=stop_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
        if not sampling.greedy:
            kwargs.update(temperature=float(sampling.temperature), top_k=int(sampling.top_k), top_p=float(sampling.top_p))
            if sampling.min_p > 0:
                kwargs["min_p"] = float(sampling.min_p)
        return GenerationConfig(**kwargs)

    # -- API -------------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, model_inputs: list[dict] | None = None) -> RolloutBatch:
        """Sample ``sampling.n`` completions for each prompt.

        Args:
            prompt_ids: Unpadded prompt token ids, one list per prompt.
            sampling: Sampling parameters.
            model_inputs: Optional, one dict per prompt of the model's extra inputs (``pixel_values``,
                ``image_grid_thw``, ...). A prompt with inputs is generated on its own (its ``n`` copies
                together, each tensor repeated ``n`` times along dim 0, the batch / patch axis of
                transformers' processors) by ``model.generate``, never by the lean loop.

        Returns:
            A :class:`RolloutBatch` with ``len(prompt_ids) * sampling.n`` entries, grouped by prompt.

        Raises:
            TypeError / ValueError: Malformed ``prompt_ids``, ``sampling`` or ``model_inputs``.
        """
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"generate: sampling must be a posttrain.SamplingParams, got {type(sampling).__name__}.")
        prompts = _validate_prompts(prompt_ids)
        expanded = [p for p in prompts for _ in range(sampling.n)]  # prompt0 x n, prompt1 x n, ...
        if not expanded:
            return RolloutBatch([], [], [], [], policy_version=self.policy_version)
        model = self._unwrapped()
        device = next(model.parameters()).device
        stop_ids = self._stop_ids(sampling)
        gen_config = self._generation_config(sampling, stop_ids)
        chunk = self.generation_batch_size or len(expanded)

        owner = _base_generation_owner(model)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        if model_inputs is not None and (not isinstance(model_inputs, (list, tuple)) or len(model_inputs) != len(prompts)):
            raise ValueError(f"generate: model_inputs must be a list of one dict (or None) per prompt ({len(prompts)}), got {type(model_inputs).__name__}.")
        if model_inputs is not None and any(model_inputs):
            # one distinct prompt (its n copies) per chunk: how a model batches extra inputs is its own business
            chunks = [(start, start + sampling.n, _repeat_inputs(model_inputs[start // sampling.n], sampling.n)) for start in range(0, len(expanded), sampling.n)]
        else:
            chunks = [(start, start + chunk, None) for start in range(0, len(expanded), chunk)]
        with _forked_rng(sampling.seed, device), _generation_mode(model), torch.no_grad():
            for start, end, inputs in chunks:
                extra = {"model_inputs": inputs} if inputs else {}
                c_ids, c_lps, c_trunc = self._generate_chunk(model, owner, expanded[start:end], gen_config, stop_ids, sampling, device, **extra)
                completions += c_ids
                logprobs += c_lps
                truncated += c_trunc
        return RolloutBatch(
            prompt_ids=[list(p) for p in expanded],
            completion_ids=completions,
            logprobs=logprobs,
            truncated=truncated,
            policy_version=self.policy_version,
        )

    def _generate_chunk(self, model, owner, prompts, gen_config, stop_ids, sampling, device, *, model_inputs=None):
        """Sample one chunk by the lean loop where a probe showed it equals ``generate``, else by ``model.generate``.

        The choice (:func:`_decode_choice`) is recorded as ``self.decode_choice`` (a ``_DecodeChoice``
        with ``path`` ``"lean"`` or ``"generate"`` and a ``reason``).

        Args:
            model, owner, prompts, gen_config, stop_ids, sampling, device: As in ``generate``.
            model_inputs: Extra inputs of the request for the model (``pixel_values``,
                ``image_grid_thw``, ...): a dict for the chunk (or one dict per prompt), passed on to
                ``_generate_chunk_with_generate``; any input at all never takes the lean loop.

        Returns:
            ``(completion ids, log-probs, truncated)`` lists, one entry per prompt.
        """
        choice = _decode_choice(self, model, owner, device, model_inputs=model_inputs)
        self.decode_choice = choice
        if choice.path == "lean":
            return self._decode_chunk(model, prompts, stop_ids, sampling, device, _lean_decode_cache_arg(owner))
        extra = {"model_inputs": model_inputs} if model_inputs else {}
        return self._generate_chunk_with_generate(model, owner, prompts, gen_config, stop_ids, sampling, device, **extra)

    def _decode_chunk(self, model, prompts, stop_ids, sampling, device, cache_arg: str = "cache"):
        """Sample ``prompts`` with a lean decode loop: a KV cache, one forward per token, no ``(b, L, V)`` scores.

        The distribution is ``generate``'s: the same logits processors in the same order
        (repetition penalty, temperature, top-k, top-p, min-p) and ``softmax`` (``argmax`` when
        greedy), positions counted from each row's first real token; the token is drawn by inverse
        CDF (:func:`_sample_inverse_cdf`), 25x cheaper on CPU than ``torch.multinomial`` at a
        151,936-token vocabulary, so the same seed draws other (equally distributed) tokens than
        ``generate`` does. The sampling
        log-prob of each token is ``log_softmax`` of the processed scores at that token, taken as it is
        sampled, so only ``(b,)`` floats a step are kept where ``output_scores`` kept ``(b, V)``.
        """
        b = len(prompts)
        input_ids = pad([torch.tensor(p, dtype=torch.long) for p in prompts], padding_value=self.pad_token_id, padding_side="left").to(device)  # (b, P)
        mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left").to(device)  # (b, P)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, P): 0 at each row's first real token
        processors = _logits_processors(sampling)
        stop = torch.tensor(stop_ids, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, logps = [], []
        sequences = input_ids  # prompt + sampled so far: what the repetition penalty reads
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        for step in range(sampling.max_tokens):
            logits = out.logits[:, -1].float()  # (b, V)
            scores = processors(sequences, logits) if processors else logits
            if sampling.greedy:
                token = scores.argmax(-1)  # (b,)
                logp = scores.gather(-1, token[:, None]).squeeze(1) - torch.logsumexp(scores, dim=-1)  # (b,)
            else:
                probs = torch.softmax(scores, dim=-1)  # (b, V)
                token = _sample_inverse_cdf(probs)  # (b,)
                logp = probs.gather(-1, token[:, None]).squeeze(1).log()  # (b,) = log_softmax(scores) at the token
            token = token.masked_fill(finished, self.pad_token_id)
            tokens.append(token)
            logps.append(logp)
            finished = finished | torch.isin(token, stop)
            if step == sampling.max_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
            position_ids = position_ids[:, -1:] + 1
            if processors:
                sequences = torch.cat([sequences, token[:, None]], dim=1)
            cache = {cache_arg: out[cache_arg]}  # the KV cache the last forward returned ("cache"; "past_key_values" before transformers 5.x)
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1, **cache)
        generated = torch.stack(tokens, dim=1)  # (b, L)
        token_logps = torch.stack(logps, dim=1)  # (b, L)
        return self._rows(generated, token_logps, stop_ids, sampling)

    def _generate_chunk_with_generate(self, model, owner, prompts, gen_config, stop_ids, sampling, device, model_inputs=None):
        """``model.generate`` with ``output_scores`` (models the lean loop cannot drive exactly; requests with extra inputs)."""
        if isinstance(model_inputs, (list, tuple)):  # one dict per prompt: concatenated along the batch / patch axis
            model_inputs = _concat_inputs(model_inputs)
        suppress = _image_token_ids(owner) if model_inputs else []
        if suppress:  # as TRL: a sampled image token would have no image features behind it in the log-prob forwards
            gen_config = copy.deepcopy(gen_config)
            gen_config.suppress_tokens = sorted(set(gen_config.suppress_tokens or []) | set(suppress))
        input_ids = pad([torch.tensor(p, dtype=torch.long) for p in prompts], padding_value=self.pad_token_id, padding_side="left")  # (b, P)
        attention_mask = pad([torch.ones(len(p), dtype=torch.long) for p in prompts], padding_value=0, padding_side="left")  # (b, P)
        saved_config = owner.generation_config
        owner.generation_config = gen_config  # keep Hub defaults (top_k=20, ...) out of the sampling distribution
        try:
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=gen_config,
                **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in (model_inputs or {}).items()},
            )
        finally:
            owner.generation_config = saved_config
        generated = out.sequences[:, input_ids.shape[1] :]  # (b, L), L <= max_tokens
        # processed scores: one (b, V) tensor per generated position, -inf where masked by top-k/top-p
        scores = torch.stack(out.scores, dim=1).float()  # (b, L, V)
        token_logps = torch.log_softmax(scores, dim=-1).gather(-1, generated.unsqueeze(-1)).squeeze(-1)  # (b, L)
        return self._rows(generated, token_logps, stop_ids, sampling)

    @staticmethod
    def _rows(generated, token_logps, stop_ids, sampling):
        """Split ``(b, L)`` sampled ids and log-probs into per-row lists cut after the first stop token."""
        # the sampled token always has finite processed score; clamp defensively so no -inf/NaN leaks
        token_logps = torch.nan_to_num(token_logps, nan=-1e4, neginf=-1e4).clamp(min=-1e4)
        stop = torch.isin(generated, torch.tensor(stop_ids, device=generated.device))  # (b, L)
        ids_rows, lps_rows, trunc = [], [], []
        for row, lp_row, stop_row in zip(generated.tolist(), token_logps.tolist(), stop.tolist()):
            end = stop_row.index(True) + 1 if True in stop_row else None
            if end is None:
                ids_rows.append(row)
                lps_rows.append(lp_row)
                trunc.append(len(row) >= sampling.max_tokens)
            else:
                ids_rows.append(row[:end])
                lps_rows.append(lp_row[:end])
                trunc.append(False)
        return ids_rows, lps_rows, trunc

    def update_weights(self, model: Any) -> None:
        """Sample from ``model`` from now on (swapping the reference if it differs) and bump ``policy_version``.

        Args:
            model: The (possibly wrapped) policy being trained.
        """
        if model is not None and model is not self.model:
            self.model = model
        self.policy_version += 1


def _repeat_inputs(inputs: dict | None, n: int) -> dict:
    """A prompt's extra model inputs for its ``n`` copies: tensors repeated ``n`` times along dim 0, other values as they are."""
    return {k: torch.cat([v] * n, dim=0) if isinstance(v, torch.Tensor) and n > 1 else v for k, v in (inputs or {}).items()}


def _concat_inputs(per_prompt: list) -> dict:
    """One dict of extra inputs from one dict per prompt: tensors concatenated along dim 0 (every dict must have the same keys)."""
    dicts = [d or {} for d in per_prompt]
    keys = set(dicts[0])
    if any(set(d) != keys for d in dicts):
        raise ValueError("generate: every prompt's model_inputs must have the same keys to be batched; generate prompts with different inputs separately.")
    return {k: torch.cat([d[k] for d in dicts], dim=0) if isinstance(dicts[0][k], torch.Tensor) else dicts[0][k] for k in keys}


def _lean_decode_cache_arg(model: Any) -> str | None:
    """The KV-cache argument name of a decoder-only model's forward that also takes ``logits_to_keep``
    (``"cache"``, or ``"past_key_values"`` in older transformers); None when the lean loop cannot drive it."""
    import inspect

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    if not all(name in params for name in ("logits_to_keep", "position_ids", "attention_mask", "use_cache")):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


@dataclass(frozen=True)
class _DecodeChoice:
    """How :class:`TransformersBackend` decodes a chunk (recorded as ``backend.decode_choice``).

    Attributes:
        path: ``"lean"`` (the hand-written KV-cache loop, ``_decode_chunk``) or ``"generate"``
            (``model.generate`` with ``output_scores``, ``_generate_chunk_with_generate``).
        reason: Why, in words: ``"probe passed ..."``, ``"probe failed: ..."``, ``"probe raised ..."``,
            ``"M-RoPE / vision config ..."``, ``"extra model inputs ..."`` or ``"forward takes no ..."``.
    """

    path: str
    reason: str


#: Verdicts per architecture: ``(type(model), type(owner), id(config), dtype, device type) ->
#: (weakref to the config, _DecodeChoice)``; the weakref guards against a recycled ``id``.
_DECODE_VERDICTS: dict[tuple, tuple[Any, _DecodeChoice]] = {}
#: ``"lock"``: serializes probing (at most one probe per key per process, even with threads generating);
#: ``"logged"``: the (key, path, reason) debug lines already written.
_DECODE_STATE: dict[str, Any] = {}
#: The probe's input: two prompts of these lengths (left padding 0 and 5), greedy for this many steps.
_PROBE_PROMPT_LENGTHS = (8, 3)
_PROBE_STEPS = 4


def _declares_mrope(config: Any) -> bool:
    """Whether ``config`` (or a sub-config such as ``text_config``) declares M-RoPE or a vision tower.

    M-RoPE models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) take 3-D position ids computed from the image
    inputs at prefill; the lean loop's 1-D positions are wrong for them whenever an image is present,
    so they are never driven by it (a text-only probe could pass and still be wrong for images).
    """
    from transformers import PretrainedConfig

    seen: list[Any] = []
    todo = [config]
    while todo:
        cfg = todo.pop()
        if any(cfg is s for s in seen):
            continue
        seen.append(cfg)
        if getattr(cfg, "vision_config", None) is not None:
            return True
        for name in ("rope_scaling", "rope_parameters"):
            rope = getattr(cfg, name, None)
            ropes = [rope] + [v for v in rope.values() if isinstance(v, dict)] if isinstance(rope, dict) else []  # per-layer-type dicts too
            if any("mrope_section" in r for r in ropes):
                return True
        todo += [v for v in vars(cfg).values() if isinstance(v, PretrainedConfig)]
    return False


def _lean_decode_tolerance(dtype: torch.dtype, device: torch.device, max_abs_logit: float, vocab_size: int) -> float:
    """Largest ``|Δ log p|`` between the lean loop and the truth that rounding explains, for a model in ``dtype``.

    The lean loop rounds the logits to float32 and takes a float32 log-softmax; the truth is a float64
    log-softmax of an unpadded, uncached forward. Two computations of the same logits in a dtype of
    machine epsilon ``eps`` (other kernels, other reduction orders, padded or not) differ by a few
    ``eps`` relative to the logits' magnitude, and a log-prob's rounding is a few ``eps`` relative to
    ``|log p| <= 2 max|z| + log V``. Hence ``8 * eps * (max|z| + log V)`` with ``eps`` the larger of the
    model dtype's and float32's (TF32's ``2**-10`` / bf16's ``2**-7`` for a float32 model on CUDA
    when torch allows reduced-precision float32 matmuls). Tiny float32 Qwen2 (vocab 512): 6.5e-6
    against a measured 4.8e-7; a bf16 model with a 151,936 vocabulary and logits up to 30: 2.6 nats.
    """
    eps = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps) if dtype.is_floating_point else torch.finfo(torch.float32).eps
    if dtype == torch.float32 and device.type == "cuda":
        eps = max(eps, {"high": 2.0**-10, "medium": 2.0**-7}.get(torch.get_float32_matmul_precision(), eps))
    return 8.0 * eps * (max_abs_logit + math.log(max(vocab_size, 2)))


def _probe_lean_decode(backend: Any, model: Any, owner: Any, cache_arg: str, device: torch.device) -> _DecodeChoice:
    """Show on a short deterministic input that the lean loop equals the truth for this architecture.

    Two prompts of different lengths (so different left padding), ids from a fixed
    ``torch.Generator`` (never the pad or EOS ids), greedy for ``_PROBE_STEPS`` tokens with no stop
    token, through ``backend._decode_chunk`` and through ``model.generate(output_scores=True)``; the
    truth is one unpadded forward pass of each prompt + the lean loop's tokens. The lean loop passes
    when, for every row and step, its log-prob equals the forward's within
    :func:`_lean_decode_tolerance`, its token is the forward's argmax within it (a near-tie may break
    either way), and ``generate``'s tokens and log-probs equal its own up to the first step where
    they part at such a near-tie. Runs with no grad, in eval mode, on a forked RNG (the global RNG
    streams are untouched).

    Returns:
        ``_DecodeChoice("lean", ...)`` when the lean loop passed, else ``_DecodeChoice("generate", ...)``
        naming the first disagreement.

    Raises:
        Whatever the model raises on the probe input (the caller falls back to ``generate``).
    """
    vocab = int(owner.get_input_embeddings().num_embeddings)
    avoid = {int(backend.pad_token_id), *backend._eos_ids()}
    if len(avoid) >= vocab:
        return _DecodeChoice("generate", "probe skipped: the vocabulary has no ordinary token")
    gen = torch.Generator().manual_seed(0)  # its own stream: the global RNG is not read
    prompts = []
    for length in _PROBE_PROMPT_LENGTHS:
        ids = torch.randint(vocab, (length,), generator=gen).tolist()
        for i, t in enumerate(ids):
            while t in avoid:
                t = (t + 1) % vocab
            ids[i] = t
        prompts.append(ids)
    sampling = SamplingParams(max_tokens=_PROBE_STEPS, temperature=0)
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else [], device_type="cuda"), _generation_mode(model), torch.no_grad():
        lean_ids, lean_lps, _ = backend._decode_chunk(model, prompts, [], sampling, device, cache_arg)
        gen_ids, gen_lps, _ = backend._generate_chunk_with_generate(model, owner, prompts, backend._generation_config(sampling, []), [], sampling, device)
        truth = []  # per row: (steps, V) float64 log-probs of one unpadded forward of prompt + lean tokens
        max_abs_logit = 0.0
        for p, c in zip(prompts, lean_ids):
            logits = model(input_ids=torch.tensor([p + c], device=device)).logits[0, len(p) - 1 : len(p) - 1 + len(c)].double()  # (steps, V)
            max_abs_logit = max(max_abs_logit, float(logits.abs().max()))
            truth.append(torch.log_softmax(logits, dim=-1).cpu())
    dtype = next(owner.parameters()).dtype
    tol = _lean_decode_tolerance(dtype, device, max_abs_logit, vocab)
    worst = 0.0  # largest |Δ log p| seen (against the forward pass and generate)
    for row, (ref, lean, lean_lp, g, g_lp) in enumerate(zip(truth, lean_ids, lean_lps, gen_ids, gen_lps)):
        if len(lean) != _PROBE_STEPS or len(g) != _PROBE_STEPS:
            return _DecodeChoice("generate", f"probe failed: row {row} decoded {len(lean)} tokens by the lean loop and {len(g)} by generate, not {_PROBE_STEPS}")
        steps = torch.arange(len(lean))
        ref_lp = ref[steps, torch.tensor(lean)]  # (steps,)
        lp_err = float((torch.tensor(lean_lp, dtype=torch.float64) - ref_lp).abs().max())
        if not lp_err <= tol:
            return _DecodeChoice("generate", f"probe failed: lean-loop log-probs differ from a full forward pass by {lp_err:.3g} > {tol:.3g} (row {row})")
        gap = float((ref.max(dim=-1).values - ref_lp).max())
        if not gap <= tol:
            return _DecodeChoice("generate", f"probe failed: a greedy lean-loop token is {gap:.3g} nats below the forward pass's argmax (> {tol:.3g}, row {row})")
        same = next((j for j, (a, b) in enumerate(zip(lean, g)) if a != b), len(lean))  # first step where the two part
        if same < len(lean) and not abs(float(ref[same, g[same]] - ref[same, lean[same]])) <= tol:
            return _DecodeChoice("generate", f"probe failed: generate chose token {g[same]} and the lean loop {lean[same]} at step {same} (row {row}), not a near-tie")
        gen_err = max((abs(a - b) for a, b in zip(lean_lp[:same], g_lp[:same])), default=0.0)
        if not gen_err <= tol:
            return _DecodeChoice("generate", f"probe failed: lean-loop log-probs differ from generate's by {gen_err:.3g} > {tol:.3g} (row {row})")
        worst = max(worst, lp_err, gen_err)
    return _DecodeChoice("lean", f"probe passed: lean loop equals generate and a full forward pass (max |Δ log p| {worst:.3g} <= {tol:.3g})")


def _image_token_ids(owner: Any) -> list[int]:
    """The ids of a vision-language model's image / video placeholder tokens (its config's), never sampled with images."""
    config = getattr(owner, "config", None)
    ids = set()
    for attr in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    return sorted(ids)


def _decode_choice(backend: Any, model: Any, owner: Any, device: torch.device, *, model_inputs: Any = None) -> _DecodeChoice:
    """Decide how ``backend`` decodes for ``model``: the lean loop only where a probe showed it equals the truth.

    ``generate`` without probing when the request carries extra model inputs (``pixel_values``, ...),
    when the forward takes no ``logits_to_keep`` / ``position_ids`` / KV cache, or when the config
    declares M-RoPE or a vision tower (:func:`_declares_mrope`); otherwise :func:`_probe_lean_decode`,
    at most once per (model class, config object, dtype, device type) per process, and ``generate``
    when it fails or raises. Logs one debug line per distinct choice.

    Args:
        backend: The :class:`TransformersBackend` (its pad/EOS ids and decode paths are used).
        model: The unwrapped model generation runs (a PEFT model, or the same object as ``owner``).
        owner: The ``PreTrainedModel`` under it (its forward signature and config decide).
        device: Where the model's parameters are.
        model_inputs: The request's extra model inputs: a dict for the chunk, or one dict per prompt;
            any input at all means ``generate``.

    Returns:
        A :class:`_DecodeChoice`.
    """
    import logging
    import threading
    import weakref

    config = getattr(owner, "config", None)
    dtype = next(owner.parameters()).dtype
    key = (type(model), type(owner), id(config), dtype, device.type)
    per_prompt = model_inputs if isinstance(model_inputs, (list, tuple)) else [model_inputs or {}]
    extra_names = sorted({str(name) for inputs in per_prompt for name in (inputs or {})})
    if extra_names:
        choice = _DecodeChoice("generate", f"extra model inputs {extra_names} need model.generate")
    else:
        lock = _DECODE_STATE.setdefault("lock", threading.Lock())  # setdefault is atomic: one lock for every thread
        with lock:
            entry = _DECODE_VERDICTS.get(key)
            if entry is not None and entry[0]() is config:
                return entry[1]
            cache_arg = _lean_decode_cache_arg(owner)
            if cache_arg is None:
                choice = _DecodeChoice("generate", "forward takes no logits_to_keep / position_ids / attention_mask / use_cache / KV cache")
            elif _declares_mrope(config):
                choice = _DecodeChoice("generate", "M-RoPE / vision config: positions need the image inputs at prefill")
            else:
                try:
                    choice = _probe_lean_decode(backend, model, owner, cache_arg, device)
                except Exception as exc:  # any failure of the lean loop on this architecture -> the safe path
                    choice = _DecodeChoice("generate", f"probe raised {type(exc).__name__}: {exc}"[:300])
            try:
                _DECODE_VERDICTS[key] = (weakref.ref(config), choice)
                weakref.finalize(config, _DECODE_VERDICTS.pop, key, None)
            except TypeError:  # a config that takes no weak reference: decide again next time (still correct)
                pass
    logged = _DECODE_STATE.setdefault("logged", set())
    if (key, choice) not in logged:
        logged.add((key, choice))
        logging.getLogger(__name__).debug("TransformersBackend: %s decodes with %s (%s)", type(owner).__name__, choice.path, choice.reason)
    return choice


def _sample_inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """Draw one token per row of ``probs`` (b, V) by inverse CDF: one uniform per row, a cumsum and a binary search.

    ``torch.multinomial`` draws a random number per vocabulary entry (exponential race): 120 ms
    for 16 rows of 151,936 on one CPU core against ~5 ms here. Token ``i`` is drawn when
    ``c[i-1] <= u < c[i]`` (``c`` the row's cumsum, ``u`` uniform in ``[0, c[-1])``), so its probability is
    ``c[i] - c[i-1]``: ``probs[i]`` up to one float32 rounding of the running sum (< 6e-8 absolute), and
    exactly 0 for a masked token.
    """
    cdf = probs.cumsum(dim=-1)  # (b, V)
    total = cdf[:, -1:]  # (b, 1)
    u = torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total  # (b, 1) in [0, total)
    token = torch.searchsorted(cdf, u, right=True).squeeze(1)  # (b,) first index with cdf > u
    over = token >= probs.shape[-1]  # u rounded up to total: take the last token with mass
    if bool(over.any()):
        token = torch.where(over, (cdf >= total).int().argmax(dim=-1), token)
    return token


def _logits_processors(sampling: SamplingParams):
    """``generate``'s logits processors for ``sampling``, in ``generate``'s order; None when there is nothing to do."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = []
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(sampling.repetition_penalty)))
    if not sampling.greedy:
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k:
            procs.append(TopKLogitsWarper(top_k=int(sampling.top_k), min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(sampling.top_p), min_tokens_to_keep=1))
        if sampling.min_p > 0:
            procs.append(MinPLogitsWarper(min_p=float(sampling.min_p), min_tokens_to_keep=1))
    return LogitsProcessorList(procs) if procs else None


def available_rollout_backends(pm: Any = None) -> dict[str, Any]:
    """Return ``{name: factory}`` for every rollout backend registered through the hook.

    Args:
        pm: A plugin manager (default: ``posttrain._plugins.get_plugin_manager()``).

    Returns:
        Registered factories by name.
    """
    from posttrain._plugins import collect_registrations, get_plugin_manager

    pm = pm if pm is not None else get_plugin_manager()
    return collect_registrations(pm, "register_rollout_backends")


def get_rollout_backend(name: str, *, pm: Any = None, **kwargs: Any) -> RolloutBackend:
    """Build the rollout backend registered as ``name`` with ``kwargs``.

    Args:
        name: A registered backend name (``"transformers"``, ``"vllm"``, or a plugin's).
        pm: A plugin manager (default: a fresh one with installed plugins).
        **kwargs: Passed to the backend factory (e.g. ``model=..., tokenizer=...``).

    Returns:
        The backend instance.

    Raises:
        ValueError: ``name`` is not registered (the message lists the available names).
    """
    backends = available_rollout_backends(pm)
    if name not in backends:
        raise ValueError(
            f"Unknown rollout backend {name!r}. Available: {', '.join(sorted(backends)) or '(none)'}. "
            "Install the plugin that provides it, or pass a backend instance."
        )
    return backends[name](**kwargs)


class RolloutEngine:
    """Front door for generation in online methods: a named or given backend plus bookkeeping.

    ``generate`` is synchronous. ``submit`` returns a ``concurrent.futures.Future`` so several requests
    can be in flight, and ``collect`` waits for them: a backend with its own ``submit`` runs them
    itself; any other backend's ``generate`` runs on one worker thread the engine owns (created on the
    first ``submit``, shut down by ``close()`` or leaving a ``with`` block), in submission order, so
    seeded requests give exactly what the synchronous calls give.

    Thread safety: the transformers backend samples the live training model (switched to eval mode
    for the duration of a request), so do not run a training step, step the optimizer or load
    weights while a request is in flight; and a request runs on the process-wide torch RNG (seeded
    ones on a fork of it), so do not draw random numbers on another thread meanwhile either.
    Versioned weight snapshots for generating beside training are the async GRPO work.

    Args:
        backend: A registered backend name (default ``"transformers"``) or a backend instance
            implementing :class:`RolloutBackend`.
        pm: A plugin manager used to resolve names (default: a fresh one).
        **backend_kwargs: Passed to the backend factory when ``backend`` is a name
            (``model=..., tokenizer=..., generation_batch_size=..., accelerator=...`` for transformers).

    Raises:
        ValueError: Unknown backend name (lists available names).
        TypeError: ``backend`` is neither a name nor a backend, or kwargs were given with an instance.
    """

    def __init__(self, backend: str | RolloutBackend = "transformers", *, pm: Any = None, **backend_kwargs: Any):
        if isinstance(backend, str):
            self.backend = get_rollout_backend(backend, pm=pm, **backend_kwargs)
            self.backend_name = backend
        else:
            if backend_kwargs:
                raise TypeError(f"RolloutEngine: got a backend instance and keyword arguments {sorted(backend_kwargs)}; pass arguments to the backend itself.")
            missing = [a for a in ("generate", "update_weights") if not callable(getattr(backend, a, None))]
            if missing or not hasattr(backend, "policy_version"):
                raise TypeError(
                    f"RolloutEngine: {type(backend).__name__} is not a rollout backend: it needs generate(prompt_ids, sampling), "
                    "update_weights(model) and a policy_version attribute."
                )
            self.backend = backend
            self.backend_name = getattr(backend, "name", type(backend).__name__)
        import threading

        self._executor: Any = None  # the worker thread of submit(), created on first use
        self._executor_lock = threading.Lock()

    @property
    def policy_version(self) -> int:
        """Version of the weights the backend samples from (incremented by ``update_weights``)."""
        return int(self.backend.policy_version)

    def set_policy_version(self, version: int) -> None:
        """Set the policy version (when a run resumes: the restored weights are that version)."""
        if not isinstance(version, int) or version < 0:
            raise ValueError(f"set_policy_version: version must be a non-negative int, got {version!r}.")
        setter = getattr(self.backend, "set_policy_version", None)
        if callable(setter):
            setter(version)
        else:
            self.backend.policy_version = version

    @property
    def samples_from_policy(self) -> bool:
        """Whether the backend samples from the trained model itself (transformers: True; vLLM, a server: False)."""
        return bool(getattr(self.backend, "samples_from_policy", False))

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, model_inputs: list[dict] | None = None) -> RolloutBatch:
        """Sample completions (see :meth:`RolloutBackend.generate`).

        Args:
            prompt_ids: Unpadded prompt token ids, one list per prompt.
            sampling: Sampling parameters.
            model_inputs: Optional, one dict per prompt of the model's extra inputs (e.g.
                ``pixel_values``), passed to a backend whose ``generate`` takes ``model_inputs=``.

        Returns:
            The backend's :class:`RolloutBatch`.

        Raises:
            TypeError: The backend returned something other than a ``RolloutBatch``.
            ValueError: ``model_inputs`` is not one dict per prompt, or is non-empty for a backend that
                takes none (sampling without them would condition on the wrong context).
        """
        batch = self.backend.generate(prompt_ids, sampling, **self._model_inputs_kwargs(prompt_ids, model_inputs))
        return self._checked(batch)

    def submit(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, model_inputs: list[dict] | None = None) -> Any:
        """Start a ``generate`` request and return at once; several requests may be in flight.

        Args:
            prompt_ids: Unpadded prompt token ids, one list per prompt.
            sampling: Sampling parameters.
            model_inputs: As in :meth:`generate`.

        Returns:
            A ``concurrent.futures.Future`` whose result is the :class:`RolloutBatch` (pass it to
            :meth:`collect`, or call ``.result()``); a request that raises holds its exception.

        Raises:
            ValueError: Malformed ``model_inputs`` (checked before the request starts).
            TypeError: The backend's own ``submit`` returned no future.
        """
        from concurrent.futures import Future, ThreadPoolExecutor

        kwargs = self._model_inputs_kwargs(prompt_ids, model_inputs)
        if isinstance(prompt_ids, (list, tuple)):  # a snapshot: the caller may reuse its lists while the request waits
            prompt_ids = [list(p) if isinstance(p, (list, tuple)) else p for p in prompt_ids]
        backend_submit = getattr(self.backend, "submit", None)
        if not callable(backend_submit):
            with self._executor_lock:
                if self._executor is None:
                    # one worker: requests run one at a time in submission order (seeded results equal generate's)
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-rollout")
                executor = self._executor
            return executor.submit(lambda: self._checked(self.backend.generate(prompt_ids, sampling, **kwargs)))
        inner = backend_submit(prompt_ids, sampling, **kwargs)
        if not callable(getattr(inner, "add_done_callback", None)):
            raise TypeError(f"rollout backend {self.backend_name!r}: submit() returned {type(inner).__name__}, expected a concurrent.futures.Future.")
        outer: Future = Future()

        def forward(done: Any) -> None:
            if done.cancelled():
                outer.cancel()
                return
            try:
                outer.set_result(self._checked(done.result()))
            except BaseException as err:  # noqa: BLE001 - the request's own error, surfaced by collect()
                outer.set_exception(err)

        inner.add_done_callback(forward)
        return outer

    def collect(self, futures: list[Any], timeout: float | None = None) -> list[RolloutBatch]:
        """Wait for requests started by :meth:`submit` and return their batches, in the order given.

        Args:
            futures: Futures returned by :meth:`submit`.
            timeout: Seconds to wait for all of them (None: no limit).

        Returns:
            One :class:`RolloutBatch` per future.

        Raises:
            Exception: The first failing request's own exception (in the order given).
            TimeoutError: ``timeout`` passed before every request finished (they keep running).
        """
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        return [f.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic())) for f in futures]

    def close(self) -> None:
        """Wait for the requests in flight on the engine's worker thread, then stop it (a later ``submit`` starts a new one)."""
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> RolloutEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _checked(self, batch: Any) -> RolloutBatch:
        if not isinstance(batch, RolloutBatch):
            raise TypeError(f"rollout backend {self.backend_name!r} returned {type(batch).__name__}, expected a posttrain.RolloutBatch.")
        return batch

    def _model_inputs_kwargs(self, prompt_ids: Any, model_inputs: list[dict] | None) -> dict[str, Any]:
        """``{"model_inputs": ...}`` for the backend, ``{}`` when there are none; refuses inputs a backend would ignore."""
        if model_inputs is None:
            return {}
        import inspect

        if not isinstance(model_inputs, (list, tuple)) or len(model_inputs) != len(prompt_ids) or not all(m is None or isinstance(m, dict) for m in model_inputs):
            raise ValueError(f"generate: model_inputs must be a list of one dict (or None) per prompt ({len(prompt_ids)}), got {type(model_inputs).__name__}.")
        if not any(model_inputs):
            return {}
        try:
            params = inspect.signature(self.backend.generate).parameters.values()
        except (TypeError, ValueError):
            params = []
        if not any(p.name == "model_inputs" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            raise ValueError(
                f"generate: the rollout backend {self.backend_name!r} takes no model_inputs (extra model inputs such as pixel_values); "
                "sampling without them would condition on the wrong context: use a backend whose generate() accepts model_inputs=, or pass none."
            )
        return {"model_inputs": [m or {} for m in model_inputs]}

    def update_weights(self, model: Any) -> None:
        """Push ``model``'s weights to the backend and bump the policy version."""
        self.backend.update_weights(model)

    def __repr__(self) -> str:
        return f"RolloutEngine(backend={self.backend_name!r}, policy_version={self.policy_version})"

