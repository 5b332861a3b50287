"""Fixtures for the GRPO-with-replay tests."""

from __future__ import annotations

import pytest
from grpo_replay_helpers import FixedBackend


@pytest.fixture
def fixed_engine():
    from posttrain import RolloutEngine

    return RolloutEngine(FixedBackend())


@pytest.fixture
def prompt_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"what is {i} + {i % 7}" for i in range(16)], "solution": [str(i + i % 7) for i in range(16)]})
