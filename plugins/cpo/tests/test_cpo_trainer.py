"""Behaviour of our CPOTrainer: construction, training and metrics, gradient accumulation, bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpo_helpers import make_ours, read_metrics

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "nll_loss"}


def test_init_minimal(tiny_model_dir, pref_data, tmp_path):
    import posttrain

    posttrain.activate("cpo", allow_experimental=True)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    trainer = CPOTrainer(model=tiny_model_dir, args=CPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"])
    assert len(trainer.train_dataset) == 8
    # TRL 1.16's column names (trainer.train_dataset is what users inspect)
    assert trainer.train_dataset.column_names == ["prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask",
                                                   "chosen_labels", "rejected_input_ids", "rejected_attention_mask", "rejected_labels"]
    row = trainer.train_dataset[0]
    start = len(row["prompt_input_ids"])
    assert row["chosen_input_ids"][:start] == row["prompt_input_ids"] and row["chosen_labels"][:start] == [-100] * start
    assert row["chosen_labels"][start:] == row["chosen_input_ids"][start:] and row["chosen_attention_mask"] == [1] * len(row["chosen_input_ids"])
    assert not hasattr(trainer, "ref_model")  # reference-free


def test_train_changes_every_parameter_and_logs_trl_metric_names(tiny_tokenizer, cpo_policy, pref_data, tmp_path):
    data = pref_data["conversational_preference"]
    trainer = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, eval_dataset=data, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.loop.unwrapped_model().named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    rows = [r for r in read_metrics(str(tmp_path / "ours")) if "loss" in r]
    assert METRICS <= set(rows[-1]), set(rows[-1])
    evaluated = trainer.evaluate()
    assert {f"eval_{m}" for m in METRICS} | {"eval_loss"} <= set(evaluated)


@pytest.mark.parametrize("case", [{"loss_type": "simpo", "cpo_alpha": 0.0}, {"loss_type": "alphapo", "alpha": 0.25}, {"loss_type": "sigmoid", "cpo_alpha": 0.0}, {"loss_type": "ipo", "cpo_alpha": 0.0}], ids=lambda c: c["loss_type"])
def test_gradient_accumulation_batch8x1_equals_batch1x8_without_nll(case, tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    # Adam with eps >> |g| makes the first step ~ lr * g / eps: comparing parameters compares raw gradients.
    sgd_like = dict(max_steps=1, adam_epsilon=1.0, learning_rate=1.0, max_grad_norm=0.0, **case)
    data = uneven_data["conversational_preference"]  # uneven completion lengths
    a = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, name="a", per_device_train_batch_size=8, gradient_accumulation_steps=1, **sgd_like)
    b = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, name="b", per_device_train_batch_size=1, gradient_accumulation_steps=8, **sgd_like)
    out_a, out_b = a.train(), b.train()
    assert out_a.training_loss == pytest.approx(out_b.training_loss, rel=1e-5)
    moved = 0.0
    for (name, pa), pb, p0 in zip(a.loop.unwrapped_model().named_parameters(), b.loop.unwrapped_model().parameters(), cpo_policy.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (pa.detach() - p0).abs().max().item())
    assert moved > 1e-4  # the step did something


def test_nll_term_under_accumulation_is_the_mean_of_micro_batch_token_means(tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    """cpo_alpha > 0 is batch-coupled (a token mean over the micro-batch, as TRL): what holds, derived independently."""
    cpo_alpha = 0.7
    data = uneven_data["conversational_preference"]
    trainer = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, loss_type="simpo", cpo_alpha=cpo_alpha)
    no_nll = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, name="no_nll", loss_type="simpo", cpo_alpha=0.0)
    rows = list(trainer.train_dataset)
    with torch.no_grad():
        whole, _ = trainer.compute_loss(trainer.model, trainer.collate(rows), 8)
        split = sum(trainer.compute_loss(trainer.model, trainer.collate([r]), 8)[0] for r in rows)
        pairs_whole, _ = no_nll.compute_loss(no_nll.model, no_nll.collate(rows), 8)
        pairs_split = sum(no_nll.compute_loss(no_nll.model, no_nll.collate([r]), 8)[0] for r in rows)
        # Naive NLL of each chosen completion: F.cross_entropy on the full sequence, completion tokens only.
        sums, counts = [], []
        for r in rows:
            ids = torch.tensor([r["chosen_input_ids"]])
            logits = trainer.model(input_ids=ids).logits[0, :-1]
            targets = ids[0, 1:].clone()
            targets[: len(r["prompt_input_ids"]) - 1] = -100
            sums.append(F.cross_entropy(logits, targets, reduction="sum"))
            counts.append((targets != -100).sum())
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(rows)
    assert pairs_whole.item() == pytest.approx(pairs_split.item(), rel=1e-5)  # the pair losses split exactly
    assert whole.item() == pytest.approx(pairs_whole.item() + cpo_alpha * token_mean.item(), rel=1e-5)
    assert split.item() == pytest.approx(pairs_split.item() + cpo_alpha * mean_of_means.item(), rel=1e-5)
    assert abs(token_mean.item() - mean_of_means.item()) > 1e-4  # uneven lengths: 8x1 and 1x8 really differ here


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_init": object()}, "model_init= is not supported"),
        ({"optimizers": (object(), None)}, "optimizers=(optimizer, scheduler) cannot be honoured"),
    ],
    ids=["model_init", "optimizers"],
)
def test_unsupported_trl_arguments_are_refused_with_the_alternative(kwargs, message, tiny_model_dir, pref_data, tmp_path):
    import posttrain
    from posttrain import ConfigError

    posttrain.activate("cpo", allow_experimental=True)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    with pytest.raises(ConfigError) as info:
        CPOTrainer(model=tiny_model_dir, args=CPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"], **kwargs)
    assert message in str(info.value)


def test_cli_trains_with_the_allow_experimental_flag(tiny_model_dir, tmp_path):
    import json
    import pathlib

    from posttrain import Registry
    from posttrain.cli import main

    data = pathlib.Path(__file__).resolve().parents[3] / "examples" / "data" / "dpo_arithmetic.jsonl"
    out = tmp_path / "out"
    code = main(["train", "cpo", "--allow-experimental", "cpo", "--preset", "simpo", "--model_name_or_path", tiny_model_dir,
                 "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-3",
                 "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", "--gradient_checkpointing", "false"], registry=Registry())
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2] and "rewards/margins" in rows[0]
    assert json.load(open(out / "run_manifest.json"))["method"] == "cpo"
