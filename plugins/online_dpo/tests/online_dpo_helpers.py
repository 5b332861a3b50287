"""Helpers for the Online DPO tests: a cheap verifiable reward."""

from __future__ import annotations


def low_token_fraction(completion_ids, **kwargs):
    """Verifiable toy reward: fraction of completion tokens whose id is in [3, 67)."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


def low_token_count(completion_ids, **kwargs):
    """Number of completion tokens whose id is in [3, 67). Unlike a fraction it does not change when pad ids (0) are
    appended: TRL 1.16's Online DPO gives reward functions the PADDED completion ids, posttrain the real ones."""
    return [float(sum(3 <= t < 67 for t in c)) for c in completion_ids]


class FixedBackend:
    """A rollout backend returning deterministic completions that depend only on the prompt and the draw (GA / resume tests)."""

    name = "fixed"

    def __init__(self, vocab: int = 400, max_len: int = 6):
        self.vocab, self.max_len, self.policy_version = vocab, max_len, 0

    def generate(self, prompt_ids, sampling):
        import random

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
