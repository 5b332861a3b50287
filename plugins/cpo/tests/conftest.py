"""Fixtures of the CPO plugin tests: a tiny policy and tiny preference data (every TRL format).

Helper functions live in ``cpo_helpers`` (a unique module name: ``from conftest import`` breaks when pytest
collects several plugins' tests at once).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def cpo_policy(tiny_tokenizer):
    """A tiny causal LM (2 layers, hidden 32) with seeded weights."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def pref_data():
    from posttrain.testing import make_tiny_datasets

    return make_tiny_datasets(8)



@pytest.fixture(scope="session")
def uneven_data(pref_data):
    """``pref_data`` with completions of different lengths (0-3 extra words), so padding and per-length averages matter."""
    from datasets import Dataset

    def grow(text, i, word, k):
        return text + (" " + word) * ((i * k) % 4)

    out = {}
    for fmt in ("preference", "conversational_preference"):
        rows = pref_data[fmt].to_list()
        for i, row in enumerate(rows):
            if fmt == "preference":
                row["chosen"], row["rejected"] = grow(row["chosen"], i, "yes", 1), grow(row["rejected"], i, "no", 3)
            else:
                row["chosen"] = [{**m, "content": grow(m["content"], i, "yes", 1)} for m in row["chosen"]]
                row["rejected"] = [{**m, "content": grow(m["content"], i, "no", 3)} for m in row["rejected"]]
        out[fmt] = Dataset.from_list(rows)
    return out
