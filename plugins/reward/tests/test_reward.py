"""Tests of the reward plugin: parity with TRL, GA equivalence, learning, resume, validation, saving."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posttrain import ConfigError
from posttrain.testing import warning_events

CONFIG = dict(report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no")


def _config(tmp_path, **kw):
    from posttrain.methods.reward import RewardConfig

    return RewardConfig(output_dir=str(tmp_path / "out"), **{**CONFIG, **kw})


def _trainer(tmp_path, model, tok, data, eval_data=None, **kw):
    from posttrain.methods.reward import RewardTrainer

    return RewardTrainer(model=model, args=_config(tmp_path, **kw), train_dataset=data, eval_dataset=eval_data, processing_class=tok)


def _metrics(tmp_path):
    with open(tmp_path / "out" / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture
def reward_model(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_reward_model

    return build_reward_model(tiny_tokenizer, seed=1)


@pytest.fixture
def margin_data(tiny_datasets):
    ds = tiny_datasets["preference"]
    return ds.add_column("margin", [0.25 * (i % 4) for i in range(len(ds))])


# ---------------------------------------------------------------------------- basics
def test_init_minimal(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"])
    assert len(trainer.train_dataset) == len(tiny_datasets["preference"])
    assert trainer.model.config.pad_token_id == tiny_tokenizer.pad_token_id


def test_train_changes_every_parameter_and_logs_metrics(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    before = {n: p.detach().clone() for n, p in reward_model.named_parameters()}
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["conversational_preference"], max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer.train()
    for name, param in trainer.loop.unwrapped_model().named_parameters():
        assert not torch.equal(before[name], param.detach()), f"{name} did not change"
    logged = _metrics(tmp_path)[0]
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert key in logged


def test_causal_lm_path_loads_as_sequence_classifier(tmp_path, tiny_model_dir, tiny_datasets):
    from transformers import AutoModelForSequenceClassification

    from posttrain.methods.reward import RewardTrainer

    trainer = RewardTrainer(model=tiny_model_dir, args=_config(tmp_path), train_dataset=tiny_datasets["preference"])
    model = trainer.model
    assert isinstance(model, AutoModelForSequenceClassification._model_mapping[type(model.config)])
    assert model.config.num_labels == 1 and model.config.pad_token_id == trainer.processing_class.pad_token_id
    assert trainer.args.model_init_kwargs is None  # the num_labels override does not leak into the user's config


# ---------------------------------------------------------------------------- parity with TRL
def _trl_trainer(tmp_path, model, tok, data, **kw):
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    args = TRLRewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, gradient_checkpointing=False, use_cpu=True, **kw)  # ours: CPU until train()
    return TRLRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)


@pytest.mark.parametrize(
    "variant",
    ["bradley_terry", "margin", "centered", "conversational", "implicit_prompt"],
)
def test_loss_matches_trl(tmp_path, variant, reward_model, tiny_tokenizer, tiny_datasets, margin_data):
    """Same pairs, same weights: the same loss, metrics and gradients as TRL's RewardTrainer.

    Both sides run float64 (TRL's reward loss is a logsigmoid of the model's scores, computed in the
    model's dtype): the two code paths then differ by float64 rounding only (~1e-16 relative), so the
    loss and the margin are compared to 1e-10 and the gradients to 1e-9 relative (entries near zero:
    1e-12 absolute), a tolerance that holds on any machine.
    """
    reward_model.double()
    data = {"margin": margin_data, "conversational": tiny_datasets["conversational_preference"]}.get(variant, tiny_datasets["preference"])
    if variant == "implicit_prompt":
        data = data.map(lambda ex: {"chosen": ex["prompt"] + ex["chosen"], "rejected": ex["prompt"] + ex["rejected"]}, remove_columns=["prompt"])
    extra = {"center_rewards_coefficient": 0.01} if variant == "centered" else {}
    tok_ours, tok_trl = copy.deepcopy(tiny_tokenizer), copy.deepcopy(tiny_tokenizer)
    trl_model = copy.deepcopy(reward_model)
    ours = _trainer(tmp_path, reward_model, tok_ours, data, **extra)
    theirs = _trl_trainer(tmp_path, trl_model, tok_trl, data, **extra)

    rows = list(range(8))
    batch = ours.collate([ours.train_dataset[i] for i in rows])
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in rows])
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])  # identical tokenization (EOS, prompt, template)

    loss, metrics = ours.compute_loss(ours.model, batch, ours.count_items(batch))
    trl_loss = theirs.compute_loss(theirs.model, dict(trl_batch))
    assert loss.dtype == trl_loss.dtype == torch.float64
    torch.testing.assert_close(loss, trl_loss, rtol=1e-10, atol=0)
    assert float(metrics["accuracy"]) == pytest.approx(theirs._metrics["train"]["accuracy"][-1])
    assert float(metrics["margin"]) == pytest.approx(theirs._metrics["train"]["margin"][-1], rel=1e-10, abs=1e-12)

    if variant in ("margin", "centered"):  # one gradient check per loss term
        loss.backward()
        trl_loss.backward()
        for (name, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------- invariants
def test_gradient_accumulation_8x1_equals_1x8(tmp_path, tiny_tokenizer, tiny_datasets):
    from posttrain.testing.tiny_model import build_reward_model

    data = tiny_datasets["preference"].select(range(8))
    opt = dict(max_steps=1, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, center_rewards_coefficient=0.01)
    params = []
    for bs, ga in ((8, 1), (1, 8)):
        model = build_reward_model(tiny_tokenizer, seed=1).double()  # float64: only the summation order differs, ~1e-16 relative
        trainer = _trainer(tmp_path / f"{bs}x{ga}", model, tiny_tokenizer, data, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **opt)
        trainer.train()
        params.append([p.detach().clone() for p in trainer.loop.unwrapped_model().parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_tokenizer, tiny_datasets):
    from posttrain.testing.tiny_model import build_reward_model

    data = tiny_datasets["preference"]
    kw = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="steps", save_steps=2)
    # float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible (accelerators), while a
    # wrongly restored state (weights, Adam moments, schedule, data order) moves the loss by far more than 1e-12
    full = _trainer(tmp_path / "a", build_reward_model(tiny_tokenizer, seed=1).double(), tiny_tokenizer, data, **kw)
    full.train()
    resumed = _trainer(tmp_path / "a", build_reward_model(tiny_tokenizer, seed=7).double(), tiny_tokenizer, data, resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"), **kw)
    reference = [m["loss"] for m in _metrics(tmp_path / "a") if "loss" in m]  # read before the resumed run rewrites it
    resumed.train()
    again = [m["loss"] for m in _metrics(tmp_path / "a") if "loss" in m]
    assert len(reference) == len(again) == 4 and again == pytest.approx(reference, rel=1e-12)


# ---------------------------------------------------------------------------- learning
def _marker_pairs(n: int, seed: int):
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = "the a cat dog sat on mat red blue green what is answer please think step".split()
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        body = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))  # noqa: E731
        rows["prompt"].append(f"question {rng.randint(0, 99)}:")
        good = body().split()
        good.insert(rng.randint(0, len(good)), "yes")
        rows["chosen"].append(" " + " ".join(good))
        rows["rejected"].append(" " + body())
    return Dataset.from_dict(rows)


def test_learns_to_prefer_the_marker_word_on_held_out_pairs(tmp_path, reward_model, tiny_tokenizer):
    train, held_out = _marker_pairs(64, seed=0), _marker_pairs(32, seed=1)
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, train, held_out, num_train_epochs=4, per_device_train_batch_size=8, learning_rate=3e-3)
    before = trainer.loop.evaluate(trainer)
    after = trainer.train().metrics
    print(f"held-out accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}; margin {before['eval_margin']:.3f} -> {after['eval_margin']:.3f}")
    assert after["eval_accuracy"] > 0.9 and after["eval_accuracy"] > before["eval_accuracy"] + 0.2
    assert after["eval_margin"] > before["eval_margin"] + 1.0
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm


def test_saved_model_scores_text_with_plain_transformers(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], max_steps=2, per_device_train_batch_size=4)
    trainer.train()
    out = str(tmp_path / "out")
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    batch = trainer.collate(list(trainer.train_dataset.select(range(4))))
    with torch.no_grad():  # both on the CPU: the same weights and ops, so the default float32 tolerance of one op chain holds
        expected = trainer.loop.unwrapped_model().cpu().eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        text = loaded(**tok(["what is 1 + 2 = 3" + tok.eos_token], return_tensors="pt")).logits
    assert loaded.config.num_labels == 1 and got.shape == (8, 1) and text.shape == (1, 1)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("center_rewards_coefficient", -0.1, "center_rewards_coefficient=-0.1"), ("max_length", 0, "max_length=0"), ("pad_to_multiple_of", 0, "pad_to_multiple_of=0")],
)
def test_config_rejects_invalid_value(tmp_path, field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **{field: value})


def test_model_with_several_labels_is_rejected(tmp_path, tiny_tokenizer, tiny_datasets):
    from transformers import AutoModelForSequenceClassification

    from posttrain.testing.tiny_model import build_reward_model

    config = build_reward_model(tiny_tokenizer).config
    config.num_labels = 2
    with pytest.raises(ConfigError, match="num_labels=2"):
        _trainer(tmp_path, AutoModelForSequenceClassification.from_config(config), tiny_tokenizer, tiny_datasets["preference"])


def test_dataset_without_chosen_rejected_is_rejected(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="needs 'chosen' and 'rejected'"):
        _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["unpaired_preference"])


def test_all_pairs_over_max_length_is_an_error(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="longer than max_length=2"):
        _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], max_length=2)


def test_unknown_eos_token_is_rejected(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="eos_token='<nope>'"):
        _trainer(tmp_path, reward_model, copy.deepcopy(tiny_tokenizer), tiny_datasets["preference"], eos_token="<nope>")


def test_pairs_over_max_length_are_dropped(tmp_path, reward_model, tiny_tokenizer):
    data = _marker_pairs(32, seed=0)
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, data, max_length=9)
    lengths = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in trainer.train_dataset]
    assert 0 < len(lengths) < len(data) and max(lengths) <= 9
