"""Fixtures for the distill tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def prompt_rows():
    """16 standard prompt-only rows."""
    return [{"prompt": f"what is {i} + {i % 7}"} for i in range(16)]
