"""ORPO on vision-language models: a run-through, the images reach the forward, image tokens stay out of the NLL, bad input.

TRL 1.16's ORPO has no vision-language path, so there is no parity test: the vision collation is a checked copy
of CPO's and DPO's (``# Copied from ...``); DPO's batches are compared with TRL's in test_dpo_vlm.py. The learning
check on colour rows is CPO's (test_cpo_vlm.py), which shares this collation.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import ConfigError, DataError
from posttrain.testing.tiny_vlm import build_vlm, colour_rows

from posttrain_orpo import ORPOConfig, ORPOTrainer


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(family="idefics3")


def _trainer(model, processor, tmp_path, rows, name="out", **cfg):
    cfg = {"per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "report_to": "none", **cfg}
    return ORPOTrainer(model=model, args=ORPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=rows, processing_class=processor,
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


def test_image_tokens_stay_out_of_the_nll(vlm, tmp_path):
    """The NLL covers prompt + chosen tokens (as TRL's text ORPO) except the image tokens, which stand for pixels (as SFT)."""
    import torch.nn.functional as F

    model, processor = vlm
    trainer = _trainer(model, processor, tmp_path, colour_rows(2, seed=1, format="preference"))
    batch = _batch(trainer, 2)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert image_id in trainer._image_token_ids.tolist() and (batch["input_ids"] == image_id).any()
    with torch.no_grad():
        nll = trainer.concatenated_forward(trainer.model, batch)["nll"]
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **batch["model_inputs"]).logits
    targets = batch["input_ids"][:2, 1:]
    keep = (batch["attention_mask"][:2, 1:] == 1) & ~torch.isin(targets, trainer._image_token_ids)
    logps = F.log_softmax(logits[:2, :-1].double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert nll.item() == pytest.approx(-(logps[keep]).mean().item(), abs=1e-5)  # unmasked: 1e-3 away


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
