"""ORPO: parity with TRL 1.16's ``trl.experimental.orpo`` (loss, gradients, metrics, tokenization), data formats,
bad input, gradient accumulation and learning (examples/orpo.yaml runs through the CLI in tests/test_examples.py)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import posttrain
from posttrain.testing import make_tiny_datasets, warning_events


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("orpo", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)


def _ours(tokenizer, model, tmp_path, dataset, **cfg):
    from posttrain_orpo import ORPOConfig, ORPOTrainer

    cfg = {"per_device_train_batch_size": 8, "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", **cfg}
    return ORPOTrainer(model=copy.deepcopy(model), args=ORPOConfig(output_dir=str(tmp_path / "ours"), **cfg), train_dataset=dataset, processing_class=tokenizer)


def _trl(tokenizer, model, tmp_path, dataset, **cfg):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    cfg = {"per_device_train_batch_size": 8, **cfg}
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", gradient_checkpointing=False, use_cpu=True, disable_tqdm=True, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ORPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer)


def _both(tokenizer, model, tmp_path, dataset, **cfg):
    theirs, ours = _trl(tokenizer, model, tmp_path, dataset, **cfg), _ours(tokenizer, model, tmp_path, dataset, **cfg)
    their_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(theirs.train_dataset))])
    concatenated = theirs.concatenated_inputs(their_batch, padding_value=theirs.padding_value)
    our_batch = ours.collate(ours.train_dataset)
    # the same token ids, mask and labels as TRL's concatenated batch (so the losses compare the same numbers)
    assert torch.equal(our_batch["input_ids"], concatenated["concatenated_input_ids"])
    assert torch.equal(our_batch["attention_mask"], concatenated["concatenated_attention_mask"])
    assert torch.equal(our_batch["labels"], concatenated["concatenated_labels"])
    return theirs, their_batch, ours, our_batch


@pytest.mark.parametrize("fmt", ["preference", "conversational_preference"])
@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_loss_and_metrics_match_trl(fmt, beta, tiny_tokenizer, policy, tmp_path):
    data = make_tiny_datasets(8)[fmt]
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy, tmp_path, data, beta=beta)
    with torch.no_grad():
        their_loss, their_metrics = theirs.get_batch_loss_metrics(theirs.model, their_batch)
        our_loss, our_metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    print(f"{fmt} beta={beta}: ours={our_loss.item():.8f} trl={their_loss.item():.8f}")
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=1e-5)
    assert set(our_metrics) == set(their_metrics), set(our_metrics) ^ set(their_metrics)
    for key, value in their_metrics.items():
        assert our_metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_gradients_match_trl(tiny_tokenizer, policy, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy, tmp_path, make_tiny_datasets(8)["preference"], beta=0.5)
    theirs.get_batch_loss_metrics(theirs.model, their_batch)[0].backward()
    ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))[0].backward()
    worst = 0.0
    for (name, a), (_, b) in zip(theirs.model.named_parameters(), ours.model.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        scale = a.grad.abs().max().item()
        worst = max(worst, (a.grad - b.grad).abs().max().item() / max(scale, 1e-12))
    print(f"worst relative gradient difference: {worst:.2e}")
    assert worst < 1e-4


def test_implicit_prompt_and_truncation_match_trl(tiny_tokenizer, policy, tmp_path):
    data = make_tiny_datasets(8)["preference"]
    implicit = data.map(lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}).remove_columns("prompt")
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy, tmp_path, implicit, max_length=9)
    with torch.no_grad():
        assert ours.compute_loss(ours.model, our_batch, 8)[0].item() == pytest.approx(theirs.get_batch_loss_metrics(theirs.model, their_batch)[0].item(), rel=1e-5)


def test_odds_ratio_equals_the_papers_formula():
    """Eq. 4/7 of arXiv:2403.07691 computed directly with probabilities (no log-space identities)."""
    from posttrain_orpo.trainer import odds_ratio_losses

    lw, ll = torch.tensor([-0.3, -2.0, -5.0, -0.01]), torch.tensor([-0.9, -1.5, -7.0, -0.02])
    losses, ratio, log_odds = odds_ratio_losses(lw, ll, beta=0.25)
    pw, pl = lw.double().exp(), ll.double().exp()
    odds = (pw / (1 - pw)) / (pl / (1 - pl))
    assert torch.allclose(log_odds.double(), odds.log(), rtol=1e-5)
    assert torch.allclose(losses.double(), -0.25 * torch.log(torch.sigmoid(odds.log())), rtol=1e-5)


def test_bad_rows_name_the_row_and_column(tiny_tokenizer, policy, tmp_path):
    rows = [{"prompt": "what is 1 + 1 =", "chosen": " 2", "rejected": " 3"}, {"prompt": "what is 2 + 2 =", "chosen": 4, "rejected": " 5"}]
    with pytest.raises(posttrain.ConfigError, match=r"train_dataset row 1, column 'chosen': expected a string"):
        _ours(tiny_tokenizer, policy, tmp_path, rows)
    with pytest.raises(posttrain.ConfigError, match=r"row 0: column 'rejected' is missing .* belong to the 'kto' method"):
        _ours(tiny_tokenizer, policy, tmp_path, [{"prompt": "a", "chosen": "b", "label": True}])
    with pytest.raises(posttrain.ConfigError, match="beta=-1.0 is invalid"):
        _ours(tiny_tokenizer, policy, tmp_path, rows[:1], beta=-1.0)


def test_gradient_accumulation_equals_one_big_batch_for_equal_micro_batches(tiny_tokenizer, policy, tmp_path):
    """8 x 1 == 2 x 4 when the micro-batches have the same token counts (the NLL term is a micro-batch token mean, as TRL's)."""
    rows = [{"prompt": f"what is {i} + {i} =", "chosen": f" {i}", "rejected": f" {i + 1}"} for i in range(1, 9)]  # equal lengths
    params = {}
    for name, (bs, ga) in {"big": (8, 1), "accumulated": (2, 4)}.items():
        trainer = _ours(tiny_tokenizer, policy, tmp_path / name, rows, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                        max_steps=1, learning_rate=1.0, optim="sgd", seed=0)
        trainer.train()
        params[name] = [p.detach().clone() for p in trainer.model.parameters()]
    worst = max((a - b).abs().max().item() for a, b in zip(params["big"], params["accumulated"]))
    assert worst < 1e-5, worst  # SGD at lr 1: the parameter change is the gradient itself


def test_learns_a_generalizable_preference_on_heldout_prompts(tiny_tokenizer, tmp_path):
    """Held-out odds-ratio loss and accuracy on unseen prompts: numbers over words (before/after printed)."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    words = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]
    pairs = make_tiny_datasets(n=48, seed=1)["preference"]
    data = Dataset.from_dict({"prompt": pairs["prompt"], "chosen": pairs["chosen"], "rejected": [" " + words[i % 8] for i in range(48)]})
    trainer = _ours(tiny_tokenizer, build_model(tiny_tokenizer, seed=3), tmp_path, data.select(range(40)), max_steps=40, learning_rate=1e-2,
                    logging_steps=10, beta=0.5)
    heldout = trainer.process_dataset(data.select(range(40, 48)), "heldout")

    def score():
        with torch.no_grad():
            _, m = trainer.compute_loss(trainer.model, trainer.collate(heldout), len(heldout))
        return -m["log_odds_ratio"].item(), m["rewards/accuracies"].item()

    (or_before, acc_before) = score()
    trainer.train()
    (or_after, acc_after) = score()
    print(f"held-out odds-ratio loss {or_before:.3f} -> {or_after:.3f}, accuracy {acc_before:.2f} -> {acc_after:.2f}")
    assert or_after < 0.5 * or_before and acc_after == 1.0
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm
