"""CPO on vision-language models: a run-through, the images reach the forward, learning, bad input (one line naming the row).

TRL 1.16's CPO has no vision-language path, so there is no parity test: the vision collation is a checked copy
of DPO's (``# Copied from posttrain_dpo.trainer...``), whose batches test_dpo_vlm.py compares with TRL's.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import ConfigError, DataError
from posttrain.testing.tiny_vlm import build_vlm, colour_rows

from posttrain_cpo import CPOConfig, CPOTrainer


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(family="idefics3")


def _trainer(model, processor, tmp_path, rows, name="out", **cfg):
    cfg = {"per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "report_to": "none", **cfg}
    return CPOTrainer(model=model, args=CPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=rows, processing_class=processor,
                      allow_experimental=True)


def _batch(trainer, n):
    return trainer.collate([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_short_run_has_a_finite_loss(family, tmp_path):
    model, processor = build_vlm(family=family)
    trainer = _trainer(model, processor, tmp_path, colour_rows(8, format="preference"), max_steps=2, logging_steps=1, learning_rate=1e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_images_reach_the_forward(vlm, tmp_path):
    """Chosen and rejected share the prompt's image inputs; swapping the rows' images changes the log-probs and the loss."""
    model, processor = vlm
    trainer = _trainer(model, processor, tmp_path, colour_rows(4, seed=3, format="preference"))
    batch = _batch(trainer, 4)
    pixels = batch["model_inputs"]["pixel_values"]
    assert pixels.shape[0] == 8 and torch.equal(pixels[:4], pixels[4:])  # chosen rows, then rejected
    swapped = dict(batch, model_inputs={k: v.roll(1, 0) for k, v in batch["model_inputs"].items()})
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(trainer.model, batch, 4)
        other_loss, other = trainer.compute_loss(trainer.model, swapped, 4)
    assert abs(metrics["logps/chosen"].item() - other["logps/chosen"].item()) > 1e-5
    assert abs(loss.item() - other_loss.item()) > 1e-7


def _held_out(trainer, rows):
    """Preference accuracy and mean log-prob margin (chosen - rejected) of the policy on ``rows``."""
    data = trainer.process_dataset(rows, "held_out")
    batch = trainer.loop.to_device(trainer.collate([data[i] for i in range(len(data))]))
    trainer.model.eval()
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_logps(trainer.model, batch)["logps"].chunk(2)
    return (chosen > rejected).float().mean().item(), (chosen - rejected).mean().item()


def test_learns_the_colour_preference(tmp_path):
    """40 steps of CPO's preference term (cpo_alpha=0; rejected: another colour, so only the image tells them apart).

    Measured on held-out rows, seeds 0 / 1 / 2 (accuracy, margin): before (0.57, 0.03) / (0.47, -0.02) / (0.50, 0.00),
    after (1.00, 6.97) / (1.00, 6.44) / (0.93, 6.75). Asserted: about half the smallest gains.
    """
    model, processor = build_vlm(family="idefics3", seed=0)
    train, held_out = colour_rows(64, seed=0, format="preference"), colour_rows(30, seed=100, format="preference")
    trainer = _trainer(model, processor, tmp_path, train, per_device_train_batch_size=8, max_steps=40, learning_rate=2e-3, cpo_alpha=0.0,
                       lr_scheduler_type="constant", warmup_steps=0, logging_steps=100, seed=0)
    before = _held_out(trainer, held_out)
    trainer.train()
    after = _held_out(trainer, held_out)
    print(f"held-out accuracy, margin: before {before}, after {after}")
    assert after[0] >= before[0] + 0.2 and after[0] >= 0.7
    assert after[1] >= before[1] + 3.0


# ---------------------------------------------------------------------------------------------- bad input
def test_image_column_on_a_text_only_model_is_refused(tiny_tokenizer, tmp_path):
    from posttrain.testing.tiny_model import build_model

    with pytest.raises(DataError, match=r"train_dataset has an image column 'images' \(vision-related data\) but the model .* is text-only") as info:
        _trainer(build_model(tiny_tokenizer), tiny_tokenizer, tmp_path, colour_rows(2, format="preference"))
    assert "\n" not in str(info.value)


def test_bad_configuration_is_refused(vlm, tmp_path):
    model, processor = vlm
    with pytest.raises(ConfigError, match=r"image column 'images' but processing_class is a .*, not a processor: pass the model's processor"):
        _trainer(model, processor.tokenizer, tmp_path, colour_rows(2, format="preference"))


def test_missing_and_nonexistent_images_name_the_row(vlm, tmp_path):
    model, processor = vlm
    rows = colour_rows(3, format="preference")
    rows[1]["images"] = [None]
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images', image 0: the image is missing \(None\)"):
        _trainer(model, processor, tmp_path, rows)
    rows = colour_rows(3, format="preference")
    rows[2]["images"] = [str(tmp_path / "nope.png")]
    with pytest.raises(DataError, match=r"^train_dataset row 2, column 'images', image 0: the image file .*nope.png' does not exist"):
        _trainer(model, processor, tmp_path, rows)


def test_unreadable_image_and_placeholder_mismatch_name_the_row(vlm, tmp_path):
    model, processor = vlm
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    rows = colour_rows(2, format="preference")
    rows[1]["images"] = [str(bad)]
    trainer = _trainer(model, processor, tmp_path, rows, name="unreadable")  # decoded in collate (DataLoader workers)
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images': the image cannot be read"):
        _batch(trainer, 2)
    rows = colour_rows(2, format="preference")
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}]
    with pytest.raises(DataError, match=r"^train_dataset row 1: the messages have 2 image placeholder\(s\).*but the row has 1 image"):
        _trainer(model, processor, tmp_path, rows, name="mismatch")
    text = [{"prompt": "What colour is this image?", "chosen": "red", "rejected": "blue", "image": r["images"][0]} for r in colour_rows(2)]
    trainer = _trainer(model, processor, tmp_path, text, name="string")  # a string prompt without the model's placeholder
    with pytest.raises(DataError, match=r"^train_dataset row 0: the processor refused the prompt and its 1 image"):
        _batch(trainer, 2)


def test_prompt_longer_than_max_length_names_the_row(vlm, tmp_path):
    model, processor = vlm
    trainer = _trainer(model, processor, tmp_path, colour_rows(2, format="preference"), max_length=8)
    with pytest.raises(DataError, match=r"^train_dataset row 0: the prompt has \d+ tokens with its image tokens, >= max_length=8"):
        _batch(trainer, 2)
