"""Helpers for the distill tests: a fixed-completion rollout backend, tiny float64 student/teacher pairs, relative errors."""

from __future__ import annotations

import random

import torch


class FixedBackend:
    """A rollout backend returning deterministic completions that depend only on the prompt (GA / routing tests)."""

    name = "fixed"

    def __init__(self, vocab: int = 400, max_len: int = 6):
        self.vocab, self.max_len, self.policy_version = vocab, max_len, 0

    def generate(self, prompt_ids, sampling):
        from posttrain import RolloutBatch

        prompts, completions, logprobs, truncated = [], [], [], []
        for p in prompt_ids:
            for k in range(sampling.n):
                rng = random.Random(hash((tuple(p), k)) % (2**31))
                length = rng.randint(1, min(self.max_len, sampling.max_tokens))
                prompts.append(list(p))
                completions.append([rng.randrange(3, self.vocab) for _ in range(length)])
                logprobs.append([-1.0] * length)
                truncated.append(length == sampling.max_tokens)
        return RolloutBatch(prompts, completions, logprobs, truncated, policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


def tiny_lm(tokenizer, *, hidden_size: int, seed: int, dtype=torch.float64):
    """A tiny random Qwen2 causal LM on ``tokenizer``'s vocabulary (float64 by default: comparisons hold on any machine)."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tokenizer, hidden_size=hidden_size, num_layers=2, seed=seed, dtype=dtype)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``|ours - ref| / |ref|`` in the max norm of the whole tensor (not elementwise near zero)."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-30))
