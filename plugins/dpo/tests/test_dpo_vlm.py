"""DPO on vision-language models: parity with TRL 1.16, learning, bad input.

Parity tolerances. Both trainers see the same float64 model; TRL 1.16 scores tokens with its chunked
log-prob kernel, whose log-sum-exp statistics are float32 whatever the weights' dtype, while ours stay
float64. So TRL's token log-probs carry float32 rounding: a few ulps of log V ~ 6.2 (ulp 4.8e-7), ~1e-6
per token. A completion here has 3 tokens, so the summed log-probs agree to LOGPS = 1e-5; the rewards are
beta (0.1) times a difference of two sums: REWARD = 2e-6; the loss (sigmoid, slope <= 1 in beta * the
margin of four sums) to LOSS = 2e-6. Measured: <= 8e-7 (logps), <= 7e-8 (rewards), <= 6e-8 (loss).
Comparisons between two of our own code paths run in float64 to 1e-10.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from posttrain import ConfigError, DataError

LOGPS, REWARD, LOSS = 1e-5, 2e-6, 2e-6
FAMILIES = ["idefics3", "gemma3"]


@pytest.fixture(scope="module")
def vlms():
    """``{family: (policy, reference, processor)}``: float64 tiny VLMs, the reference the policy plus seeded noise."""
    from posttrain.testing.tiny_vlm import build_vlm

    out = {}
    for family in FAMILIES:
        model, processor = build_vlm(family=family, dtype=torch.float64)
        ref = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        out[family] = (model, ref, processor)
    return out


def _ours(model, processor, tmp_path, rows, ref=None, name="ours", **cfg):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    cfg = {"per_device_train_batch_size": 4, "save_strategy": "no", "gradient_checkpointing": False, "use_cpu": True,
           "disable_tqdm": True, "report_to": "none", **cfg}
    return DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref) if ref is not None else None,
                      args=DPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=rows, processing_class=processor)


def _theirs(model, processor, tmp_path, rows, ref):
    import trl
    from datasets import Dataset

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, bf16=False, report_to="none",
                         gradient_checkpointing=False, use_cpu=True, disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(ref), args=args,
                              train_dataset=Dataset.from_list(rows), processing_class=processor)


def _string_rows(rows, placeholder, eos):
    """The colour rows as text: the prompt holds the model's image placeholder; completions end with EOS (TRL's vision
    collator appends none, ours appends it when missing, so both see the same tokens)."""
    return [{"prompt": f"{placeholder}What colour is this image?", "chosen": r["chosen"][0]["content"] + eos,
             "rejected": r["rejected"][0]["content"] + eos, "image": r["images"][0]} for r in rows]


@pytest.mark.parametrize("fmt", ["conversational", "string"])
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_trl(family, fmt, vlms, tmp_path):
    from posttrain.testing.tiny_vlm import colour_rows

    model, ref, processor = vlms[family]
    rows = colour_rows(4, seed=3, format="preference")
    if fmt == "string":
        rows = _string_rows(rows, {"idefics3": "<image>", "gemma3": "<start_of_image>"}[family], processor.tokenizer.eos_token)
    theirs = _theirs(model, processor, tmp_path, rows, ref)
    their_batch = theirs.data_collator([dict(theirs.train_dataset[i]) for i in range(4)])
    ours = _ours(model, processor, tmp_path, rows, ref)
    our_batch = ours.collate([ours.train_dataset[i] for i in range(4)])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(our_batch[key], their_batch[key]), key
    extra = our_batch["model_inputs"]
    assert set(extra) == set(their_batch) - {"input_ids", "attention_mask", "completion_mask"}
    for key, value in extra.items():  # pixel_values (chosen rows, then rejected), token_type_ids (Gemma 3) ...
        assert torch.equal(value, their_batch[key]), key
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        our_loss, metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    their_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    assert abs(their_loss.item()) > 1e-3
    assert our_loss.item() == pytest.approx(their_loss.item(), abs=LOSS)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key].item() == pytest.approx(their_metrics[key], abs=REWARD), key
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(their_metrics[key], abs=LOGPS), key
    assert metrics["rewards/accuracies"].item() == their_metrics["rewards/accuracies"]


def test_precomputed_reference_and_dataloader_workers_match_the_inline_path(vlms, tmp_path):
    """Reference log-probs precomputed with the images equal the inline reference (stored as float32, as in TRL: |logp| ~ 19
    is kept to 1e-6, times beta = 0.1 in the loss: 1e-6 covers it); batches collated in a DataLoader worker (images decoded
    there, from files) equal in-process collation (float64: 1e-10)."""
    from posttrain.testing.tiny_vlm import colour_rows

    model, ref, processor = vlms["gemma3"]
    rows = colour_rows(4, seed=5, format="preference")
    for i, row in enumerate(rows):  # images as files: decoded in collate
        path = tmp_path / f"img{i}.png"
        row["images"][0].save(path)
        row["images"] = [str(path)]
    inline = _ours(model, processor, tmp_path, rows, ref, name="inline")
    pre = _ours(model, processor, tmp_path, rows, ref, name="pre", precompute_ref_log_probs=True)
    batch = inline.collate([inline.train_dataset[i] for i in range(4)])
    pre_batch = pre.collate([pre.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss, _ = inline.compute_loss(inline.model, batch, 4)
        pre_loss, _ = pre.compute_loss(pre.model, pre_batch, 4)
    assert pre_loss.item() == pytest.approx(loss.item(), abs=1e-6)

    losses = {}
    for workers in (0, 1):
        trainer = _ours(model, processor, tmp_path, rows, ref, name=f"w{workers}", max_steps=2, logging_steps=1,
                        dataloader_num_workers=workers, learning_rate=1e-3, per_device_train_batch_size=2)
        trainer.train()
        losses[workers] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses[1]) == 2 and losses[1] == pytest.approx(losses[0], abs=1e-10)


def _held_out(trainer, rows):
    """Preference accuracy and mean log-prob margin (chosen - rejected) of the policy on ``rows``."""
    data = trainer.process_dataset(rows, "held_out")
    batch = trainer.loop.to_device(trainer.collate([data[i] for i in range(len(data))]))
    trainer.model.eval()
    with torch.no_grad():
        lp = trainer.policy_logps(trainer.model, batch)
    margin = lp["chosen"] - lp["rejected"]
    return (margin > 0).float().mean().item(), margin.mean().item()


def test_learns_the_colour_preference(tmp_path):
    """60 steps of DPO on the colour rows (rejected: another colour; only the image tells them apart).

    Measured on held-out rows, seeds 0 / 1 / 2 (accuracy, margin): before (0.57, 0.03) / (0.47, -0.02) / (0.50, 0.00),
    after (1.00, 14.1) / (1.00, 14.4) / (0.93, 13.0). Asserted: about half the gains.
    """
    from posttrain.testing.tiny_vlm import build_vlm, colour_rows

    model, processor = build_vlm(family="idefics3", seed=0)
    train, held_out = colour_rows(64, seed=0, format="preference"), colour_rows(30, seed=100, format="preference")
    trainer = _ours(model, processor, tmp_path, train, per_device_train_batch_size=8, max_steps=60, learning_rate=2e-3,
                    lr_scheduler_type="constant", warmup_steps=0, logging_steps=100, seed=0)
    before = _held_out(trainer, held_out)
    trainer.train()
    after = _held_out(trainer, held_out)
    print(f"held-out accuracy, margin: before {before}, after {after}")
    assert after[0] >= before[0] + 0.2 and after[0] >= 0.7
    assert after[1] >= before[1] + 6.0


# ---------------------------------------------------------------------------------------------- bad input
def _rows(n=2, seed=0):
    from posttrain.testing.tiny_vlm import colour_rows

    return colour_rows(n, seed=seed, format="preference")


def test_bad_configuration_is_refused(vlms, tmp_path):
    model, _, processor = vlms["idefics3"]
    with pytest.raises(ConfigError, match=r"image column 'images' but processing_class is a .*, not a processor: pass the model's processor"):
        _ours(model, processor.tokenizer, tmp_path, _rows())
    with pytest.raises(ConfigError, match=r"truncation_mode='keep_end' cannot be used with images"), pytest.warns(FutureWarning):
        _ours(model, processor, tmp_path, _rows(), truncation_mode="keep_end")
    with pytest.raises(ConfigError, match=r"max_prompt_length=8 cannot be used with images"):
        _ours(model, processor, tmp_path, _rows(), max_prompt_length=8)


def test_missing_and_nonexistent_images_name_the_row(vlms, tmp_path):
    model, _, processor = vlms["idefics3"]
    rows = _rows(3)
    rows[1]["images"] = [None]
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images', image 0: the image is missing \(None\)"):
        _ours(model, processor, tmp_path, rows)
    rows = _rows(3)
    rows[2]["images"] = [str(tmp_path / "nope.png")]
    with pytest.raises(DataError, match=r"^train_dataset row 2, column 'images', image 0: the image file .*nope.png' does not exist"):
        _ours(model, processor, tmp_path, rows)


def test_unreadable_image_names_the_row_when_collated(vlms, tmp_path):
    model, _, processor = vlms["idefics3"]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    rows = _rows(2)
    rows[1]["images"] = [str(bad)]
    trainer = _ours(model, processor, tmp_path, rows)  # decoded in collate (DataLoader workers), not at construction
    with pytest.raises(DataError, match=r"^train_dataset row 1, column 'images': the image cannot be read"):
        trainer.collate([trainer.train_dataset[i] for i in range(2)])


def test_placeholder_count_mismatch_names_the_row(vlms, tmp_path):
    model, _, processor = vlms["idefics3"]
    rows = _rows(2)
    rows[1]["prompt"] = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}]
    with pytest.raises(DataError, match=r"^train_dataset row 1: the messages have 2 image placeholder\(s\).*but the row has 1 image"):
        _ours(model, processor, tmp_path, rows)
    text = _string_rows(_rows(2), "<image>", "")
    text[0]["prompt"] = "What colour is this image?"  # no placeholder for its image: the processor refuses it
    trainer = _ours(model, processor, tmp_path, text)
    with pytest.raises(DataError, match=r"^train_dataset row 0: the processor refused the prompt and its 1 image"):
        trainer.collate([trainer.train_dataset[i] for i in range(2)])


def test_prompt_longer_than_max_length_names_the_row(vlms, tmp_path):
    model, _, processor = vlms["gemma3"]
    trainer = _ours(model, processor, tmp_path, _rows(2), max_length=12)
    with pytest.raises(DataError, match=r"^train_dataset row 0: the prompt has \d+ tokens with its image tokens, >= max_length=12"):
        trainer.collate([trainer.train_dataset[i] for i in range(2)])


def test_implicit_prompt_and_single_image_column_give_the_explicit_batch(vlms, tmp_path):
    """Rows with only chosen / rejected conversations (the shared prefix is the prompt; TRL 1.16's vision collator needs
    'prompt') and an ``image`` column collate to the batch of the explicit rows."""
    model, _, processor = vlms["idefics3"]
    rows = _rows(3, seed=4)
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "image": r["images"][0]} for r in rows]
    explicit_trainer = _ours(model, processor, tmp_path, rows, name="explicit")
    implicit_trainer = _ours(model, processor, tmp_path, implicit, name="implicit", use_logits_to_keep=True)
    a = explicit_trainer.collate([explicit_trainer.train_dataset[i] for i in range(3)])
    b = implicit_trainer.collate([implicit_trainer.train_dataset[i] for i in range(3)])
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(a[key], b[key]), key
    for key in a["model_inputs"]:
        assert torch.equal(a["model_inputs"][key], b["model_inputs"][key]), key
    with torch.no_grad():  # logits_to_keep (only the completion positions' logits) gives the same log-probs
        _, metrics_a = explicit_trainer.compute_loss(explicit_trainer.model, a, 3)
        _, metrics_b = implicit_trainer.compute_loss(implicit_trainer.model, b, 3)
    assert implicit_trainer._use_logits_to_keep
    for key in ("logps/chosen", "logps/rejected"):
        assert metrics_b[key].item() == pytest.approx(metrics_a[key].item(), abs=1e-10), key
