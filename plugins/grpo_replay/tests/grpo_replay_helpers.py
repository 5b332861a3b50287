"""Helpers for the GRPO-with-replay tests (# Copied from plugins/grpo/tests/grpo_helpers.py): a fixed-rollout backend, a cheap verifiable reward, a perturbed model copy."""

from __future__ import annotations

import random

import torch


class FixedBackend:
    """A rollout backend returning deterministic completions that depend only on the prompt (for GA tests)."""

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


def low_token_fraction(completion_ids, **kwargs):
    """Verifiable toy reward: fraction of completion tokens whose id is in [3, 67)."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


def perturbed_copy(model, scale: float = 0.02, seed: int = 1):
    """Return a deep copy of ``model`` with seeded Gaussian noise added to every weight (a reference that differs)."""
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return other


def first_token_is_low(completion_ids, **kwargs):
    """Binary verifiable reward: 1.0 when the completion's first token id is in [3, 67) (p ~ 0.16 for the random tiny model),
    so a group of 8 has all-equal rewards about a quarter of the time at the start, and more often as it learns."""
    return [1.0 if c and 3 <= c[0] < 67 else 0.0 for c in completion_ids]
