"""A rollout backend that samples the geometric mixture of the policy and the reference (Nash-MD's opponent).

At each token the mixture's scores are ``mixture_coef * z_ref + (1 - mixture_coef) * z_policy`` (the
two models' logits of the same prefix), i.e. ``pi_mix ∝ pi_ref^c * pi^(1-c)``; the sampling settings
(repetition penalty, temperature, top-k, top-p, min-p: transformers' logits processors, in
``generate``'s order) then apply to these scores, as they did to TRL's ``GeometricMixtureWrapper``.
It implements posttrain's public ``RolloutBackend`` protocol (``generate``, ``update_weights``,
``policy_version``), so a ``posttrain.RolloutEngine`` runs it and the producer calls it like any other
engine; the core's transformers backend samples one model only.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from posttrain import RolloutBatch, SamplingParams, adapter_disabled

__all__ = ["GeometricMixtureBackend", "mixture_scores"]


def mixture_scores(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mixture_coef: float) -> torch.Tensor:
    """The geometric mixture's log-probabilities: ``log_softmax(c * z_ref + (1 - c) * z_policy)`` over the last axis."""
    return torch.log_softmax(mixture_coef * ref_logits.double() + (1 - mixture_coef) * policy_logits.double(), dim=-1)


def _processors(sampling: SamplingParams):
    """transformers' logits processors for ``sampling`` in ``generate``'s order (None when there is nothing to do)."""
    from transformers import LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    procs = []
    if sampling.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=float(sampling.repetition_penalty)))
    if sampling.temperature > 0:
        if sampling.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_k:
            procs.append(TopKLogitsWarper(top_k=int(sampling.top_k), min_tokens_to_keep=1))
        if sampling.top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=float(sampling.top_p), min_tokens_to_keep=1))
        if sampling.min_p > 0:
            procs.append(MinPLogitsWarper(min_p=float(sampling.min_p), min_tokens_to_keep=1))
    return LogitsProcessorList(procs) if procs else None


def _cache_arg(model: Any) -> str | None:
    """The KV-cache keyword of the model's forward (``cache`` in transformers 5, ``past_key_values`` before), or None."""
    try:
        params = inspect.signature(model.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class GeometricMixtureBackend:
    """Sample completions from ``pi_mix ∝ pi_ref^c * pi^(1-c)`` (``c = mixture_coef``), token by token, with both models' KV caches.

    Args:
        model: The policy (trained; ``update_weights`` may swap in a new object).
        ref_model: The frozen reference, or None: the policy (a PEFT model) with its adapters disabled.
        tokenizer: Gives the pad and EOS ids.
        mixture_coef: ``c`` in [0, 1]; the trainer sets ``backend.mixture_coef`` per epoch.
        accelerator: An ``accelerate.Accelerator`` (the policy is unwrapped with it), or None.
    """

    name = "geometric_mixture"
    samples_from_policy = False  # the samples are the mixture's, never pi_old's

    def __init__(self, model: Any, ref_model: Any, tokenizer: Any, *, mixture_coef: float = 0.5, accelerator: Any = None):
        self.model, self.ref_model, self.tokenizer, self.accelerator = model, ref_model, tokenizer, accelerator
        self.mixture_coef = float(mixture_coef)
        self.policy_version = 0
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def update_weights(self, model: Any) -> None:
        if model is not None:
            self.model = model
        self.policy_version += 1

    @staticmethod
    def _next_logits(model, cache_arg, cache, sequences, mask, token, positions):
        """One decoding step's ``(b, V)`` logits and the new KV cache (no cache: a full forward of ``sequences``)."""
        if cache_arg is None:
            out = model(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
            return out.logits[:, -1], None
        if cache is None:  # prefill
            out = model(input_ids=sequences, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        else:
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache})
        return out.logits[:, -1], out[cache_arg]

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        policy = self.accelerator.unwrap_model(self.model) if self.accelerator is not None else self.model
        ref = self.ref_model if self.ref_model is not None else policy  # None: the adapter-disabled policy (PEFT)
        expanded = [list(p) for p in prompt_ids for _ in range(sampling.n)]
        if not expanded:
            return RolloutBatch([], [], [], [], policy_version=self.policy_version)
        device = next(policy.parameters()).device
        stop_ids = list(sampling.stop_token_ids) or [i for i in (self.tokenizer.eos_token_id, self.pad_token_id) if i is not None]
        stop = torch.tensor(stop_ids, device=device)
        processors = _processors(sampling)
        ids = pad_sequence([torch.tensor(p) for p in expanded], batch_first=True, padding_value=self.pad_token_id, padding_side="left").to(device)
        mask = pad_sequence([torch.ones(len(p), dtype=torch.long) for p in expanded], batch_first=True, padding_value=0, padding_side="left").to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        args_p, args_r = _cache_arg(policy), _cache_arg(ref)
        was_training = policy.training
        tokens, logps = [], []
        finished = torch.zeros(len(expanded), dtype=torch.bool, device=device)
        fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        try:
            policy.eval()
            with fork, torch.no_grad():
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                sequences, token, cache_p, cache_r = ids, None, None, None
                for _ in range(sampling.max_tokens):
                    z_p, cache_p = self._next_logits(policy, args_p, cache_p, sequences, mask, token, positions)
                    if self.ref_model is None:
                        with adapter_disabled(policy):
                            z_r, cache_r = self._next_logits(ref, args_r, cache_r, sequences, mask, token, positions)
                    else:
                        z_r, cache_r = self._next_logits(ref, args_r, cache_r, sequences, mask, token, positions)
                    scores = mixture_scores(z_p, z_r, self.mixture_coef).float()  # (b, V)
                    if processors:
                        scores = processors(sequences, scores)
                    if sampling.temperature == 0:
                        token = scores.argmax(-1)
                    else:
                        token = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
                    logp = torch.log_softmax(scores, dim=-1).gather(-1, token[:, None]).squeeze(1)
                    token = token.masked_fill(finished, self.pad_token_id)
                    tokens.append(token)
                    logps.append(logp)
                    finished = finished | torch.isin(token, stop)
                    if bool(finished.all()):
                        break
                    sequences = torch.cat([sequences, token[:, None]], dim=1)
                    mask = torch.cat([mask, mask.new_ones(len(expanded), 1)], dim=1)
                    positions = positions[:, -1:] + 1
        finally:
            policy.train(was_training)
        completions, lps, truncated = [], [], []
        for row, lp_row in zip(torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
            completions.append(row[:end] if end else row)
            lps.append(lp_row[:end] if end else lp_row)
            truncated.append(end is None and len(row) >= sampling.max_tokens)
        return RolloutBatch(prompt_ids=expanded, completion_ids=completions, logprobs=lps, truncated=truncated, policy_version=self.policy_version)
