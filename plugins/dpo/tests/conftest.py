"""Fixtures of the DPO plugin tests: a tiny policy and a reference that differs from it, tiny preference data.

Helper functions live in ``dpo_helpers`` (a unique module name: ``from conftest import`` breaks when pytest
collects several plugins' tests at once).
"""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="session")
def policy_and_ref(tiny_tokenizer):
    """Return ``(policy, ref)``: a tiny causal LM and a copy with seeded noise (so log-ratios are not zero)."""
    from posttrain.testing.tiny_model import build_model

    policy = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)
    ref = copy.deepcopy(policy)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return policy, ref


@pytest.fixture(scope="session")
def policy_and_ref64(policy_and_ref):
    """``policy_and_ref`` in float64: for tests that compare two of our code paths (accumulation, resume, precompute,
    adapters), so that their different summation orders leave ~1e-16 relative differences and a tight tolerance holds on
    any machine."""
    policy, ref = policy_and_ref
    return copy.deepcopy(policy).double(), copy.deepcopy(ref).double()


@pytest.fixture(scope="session")
def pref_data():
    from posttrain.testing import make_tiny_datasets

    return make_tiny_datasets(8)
