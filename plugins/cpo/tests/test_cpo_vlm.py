"""CPO refuses vision-language preference data with one clear line (its pairs are tokenized text-only; use 'dpo' for images)."""

from __future__ import annotations

import pytest

from posttrain import ConfigError
from posttrain.testing.tiny_vlm import build_vlm, colour_rows

from posttrain_cpo import CPOConfig, CPOTrainer


def test_image_rows_are_refused_not_dropped(tmp_path):
    model, processor = build_vlm(family="idefics3")
    args = CPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none", save_strategy="no")
    with pytest.raises(ConfigError, match=r"train_dataset has an image column 'images': posttrain's CPO trains on text only .* use the 'dpo' method") as info:
        CPOTrainer(model=model, args=args, train_dataset=colour_rows(4, format="preference"), processing_class=processor, allow_experimental=True)
    assert "\n" not in str(info.value)
