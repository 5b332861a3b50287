"""Toy reward functions for tests and the conformance suite's tiny runs (no model needed).

They vary across the random completions of an untrained tiny model, so group-normalized
advantages are non-zero and an online method's few-step run really updates the weights.
"""

from __future__ import annotations

from typing import Any

from posttrain.rewards import completion_text

__all__ = ["digit_fraction_reward"]


def digit_fraction_reward(completions: list, **kwargs: Any) -> list[float]:
    """Return the fraction of each completion's non-space characters that are digits (0.0 for an empty one)."""
    out = []
    for completion in completions:
        text = "".join(completion_text(completion).split())
        out.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return out
