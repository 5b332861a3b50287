"""Shared helpers for the sft plugin's tests (fixtures come from posttrain.testing)."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_config(tmp_path):
    """Return ``make_config(**overrides)``: a small, quiet SFTConfig writing under tmp_path."""
    from posttrain_sft import SFTConfig

    def make(**overrides):
        values = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, save_strategy="no", per_device_train_batch_size=4, max_steps=2)
        values.update(overrides)
        return SFTConfig(**values)

    return make
