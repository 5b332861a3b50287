"""Fixtures for the PPO tests: the opt-in to the experimental method."""

from __future__ import annotations

import pytest


@pytest.fixture
def opt_in(clean_gate):
    import posttrain

    posttrain.activate("ppo", allow_experimental=True)
