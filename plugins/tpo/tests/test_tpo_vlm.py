"""TPO on vision-language models: a run-through, the images reach the forward (gold rows included), bad input.

TRL 1.16's TPO has no vision-language path, so there is no parity test: the prompt processing is a checked copy
of DPO's (``# Copied from posttrain_dpo.trainer...``), whose batches test_dpo_vlm.py compares with TRL's. The
learning check on colour rows is CPO's (test_cpo_vlm.py).
"""

from __future__ import annotations

import pytest
import torch

from posttrain import ConfigError, DataError
from posttrain.testing.tiny_vlm import build_vlm, colour_rows

from posttrain_tpo import TPOConfig, TPOTrainer


@pytest.fixture(scope="module")
def vlm():
    return build_vlm(family="idefics3")


def _trainer(model, processor, tmp_path, rows, name="out", **cfg):
    cfg = {"per_device_train_batch_size": 4, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True, "report_to": "none", **cfg}
    return TPOTrainer(model=model, args=TPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=rows, processing_class=processor,
                      allow_experimental=True)


def _rows(n, seed=0):
    """Colour preference rows with a gold response (``reference``: the right colour)."""
    return [dict(row, reference=row["chosen"]) for row in colour_rows(n, seed=seed, format="preference")]


def _batch(trainer, n):
    return trainer.collate([trainer.train_dataset[i] for i in range(n)])


@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_short_run_has_a_finite_loss(family, tmp_path):
    model, processor = build_vlm(family=family)
    trainer = _trainer(model, processor, tmp_path, _rows(8), max_steps=2, logging_steps=1, learning_rate=1e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("tpo_alpha", [1.0, 0.0])
def test_images_reach_the_forward(tpo_alpha, vlm, tmp_path):
    """Chosen, rejected and gold rows share the prompt's image inputs; swapping the rows' images changes the log-probs and the loss."""
    model, processor = vlm
    trainer = _trainer(model, processor, tmp_path, _rows(4, seed=3), tpo_alpha=tpo_alpha)
    batch = _batch(trainer, 4)
    branches = 3 if tpo_alpha else 2
    pixels = batch["model_inputs"]["pixel_values"]
    assert pixels.shape[0] == 4 * branches and all(torch.equal(pixels[:4], part) for part in pixels.chunk(branches))
    swapped = dict(batch, model_inputs={k: v.roll(1, 0) for k, v in batch["model_inputs"].items()})
    with torch.no_grad():
        loss, metrics = trainer.compute_loss(trainer.model, batch, 4)
        other_loss, other = trainer.compute_loss(trainer.model, swapped, 4)
    assert abs(metrics["logps/chosen"].item() - other["logps/chosen"].item()) > 1e-5
    assert abs(loss.item() - other_loss.item()) > 1e-7


def test_compute_metrics_forward_gets_the_images(vlm, tmp_path):
    """The extra forward of evaluation with ``compute_metrics`` (the logits) runs with the batch's image inputs."""
    model, processor = vlm
    seen = []
    trainer = TPOTrainer(model=model, args=TPOConfig(output_dir=str(tmp_path / "eval"), per_device_eval_batch_size=2, report_to="none", use_cpu=True,
                                                     save_strategy="no", disable_tqdm=True),
                         train_dataset=_rows(2), eval_dataset=_rows(2, seed=7), processing_class=processor, allow_experimental=True,
                         compute_metrics=lambda pred: seen.append(pred.predictions.shape) or {"rows": float(pred.predictions.shape[0])})
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 6.0 and len(seen) == 1 and "eval_loss" in metrics


def test_implicit_prompt_and_single_image_column_give_the_explicit_batch(vlm, tmp_path):
    model, processor = vlm
    rows = _rows(3, seed=4)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "reference": r["prompt"] + r["reference"],
                 "image": r["images"][0]} for r in rows]
    a = _batch(_trainer(model, processor, tmp_path, rows, name="explicit"), 3)
    b = _batch(_trainer(model, processor, tmp_path, implicit, name="implicit"), 3)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(a[key], b[key]), key
    for key in a["model_inputs"]:
        assert torch.equal(a["model_inputs"][key], b["model_inputs"][key]), key


# ---------------------------------------------------------------------------------------------- bad input
def test_image_column_on_a_text_only_model_is_refused(tiny_tokenizer, tmp_path):
    from posttrain.testing.tiny_model import build_model

    with pytest.raises(DataError, match=r"train_dataset has an image column 'images' \(vision-related data\) but the model .* is text-only") as info:
        _trainer(build_model(tiny_tokenizer), tiny_tokenizer, tmp_path, _rows(2))
    assert "\n" not in str(info.value)


def test_bad_configuration_is_refused(vlm, tmp_path):
    model, processor = vlm
    with pytest.raises(ConfigError, match=r"image column 'images' but processing_class is a .*, not a processor: pass the model's processor"):
        _trainer(model, processor.tokenizer, tmp_path, _rows(2))
    with pytest.raises(ConfigError, match=r"truncation_mode='keep_end' cannot be used with images"):
        _trainer(model, processor, tmp_path, _rows(2), max_length=64, truncation_mode="keep_end")
    with pytest.raises(ConfigError, match=r"^train_dataset row 0: column 'reference' is missing .* set tpo_alpha=0.0"):
        _trainer(model, processor, tmp_path, colour_rows(2, format="preference"))


def test_missing_and_nonexistent_images_name_the_row(vlm, tmp_path):
    model, processor = vlm
    rows = _rows(3)
    rows[1]["images"] = [None]
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images', image 0: the image is missing \(None\)"):
        _trainer(model, processor, tmp_path, rows)
    rows = _rows(3)
    rows[2]["images"] = [str(tmp_path / "nope.png")]
    with pytest.raises(DataError, match=r"^train_dataset row 2, column 'images', image 0: the image file .*nope.png' does not exist"):
        _trainer(model, processor, tmp_path, rows)


def test_unreadable_image_and_placeholder_mismatch_name_the_row(vlm, tmp_path):
    model, processor = vlm
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    rows = _rows(2)
    rows[1]["images"] = [str(bad)]
    trainer = _trainer(model, processor, tmp_path, rows, name="unreadable")  # decoded in collate (DataLoader workers)
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images': the image cannot be read"):
        _batch(trainer, 2)
    rows = _rows(2)
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}]
    with pytest.raises(DataError, match=r"^train_dataset row 1: the messages have 2 image placeholder\(s\).*but the row has 1 image"):
        _trainer(model, processor, tmp_path, rows, name="mismatch")
    text = [{"prompt": "What colour is this image?", "chosen": "red", "rejected": "blue", "reference": "red", "image": r["images"][0]}
            for r in colour_rows(2)]
    trainer = _trainer(model, processor, tmp_path, text, name="string")  # a string prompt without the model's placeholder
    with pytest.raises(DataError, match=r"^train_dataset row 0: the processor refused the prompt and its 1 image"):
        _batch(trainer, 2)


def test_prompt_longer_than_max_length_names_the_row(vlm, tmp_path):
    model, processor = vlm
    trainer = _trainer(model, processor, tmp_path, _rows(2), max_length=8)
    with pytest.raises(DataError, match=r"^train_dataset row 0: the prompt has \d+ tokens with its image tokens, >= max_length=8"):
        _batch(trainer, 2)
