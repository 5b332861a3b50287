"""Fixtures for the ReMax tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def prompt_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"what is {i} + {i % 7}" for i in range(16)], "solution": [str(i + i % 7) for i in range(16)]})
