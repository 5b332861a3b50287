"""Helpers for the PRIME tests: a fixed-rollout backend that records its requests, a verifiable reward, a perturbed copy."""

from __future__ import annotations

import copy
import random

import torch


class FixedBackend:
    """Deterministic completions that depend only on (prompt, sample index, greedy or not); records every request."""

    name = "fixed"

    def __init__(self, vocab: int = 400, max_len: int = 6):
        self.vocab, self.max_len, self.policy_version, self.requests = vocab, max_len, 0, []

    def generate(self, prompt_ids, sampling):
        from posttrain import RolloutBatch

        self.requests.append(([list(p) for p in prompt_ids], sampling))
        prompts, completions, logprobs, truncated = [], [], [], []
        for p in prompt_ids:
            for k in range(sampling.n):
                rng = random.Random(hash((tuple(p), k, sampling.greedy)) % (2**31))
                length = rng.randint(1, min(self.max_len, sampling.max_tokens))
                prompts.append(list(p))
                completions.append([rng.randrange(3, self.vocab) for _ in range(length)])
                logprobs.append([-1.0] * length)
                truncated.append(length == sampling.max_tokens)
        return RolloutBatch(prompts, completions, logprobs, truncated, policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


def low_token_fraction(completion_ids, **kwargs):
    """Verifiable toy reward: fraction of completion tokens whose id is in [3, 67)."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


def perturbed_copy(model, scale: float = 0.02, seed: int = 1):
    """Return a deep copy of ``model`` with seeded Gaussian noise added to every weight (a reference that differs)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other
