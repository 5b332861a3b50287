"""Parity with TRL 1.16's trl.experimental.cpo.CPOTrainer: same weights, same rows, same options -> same loss and gradients.

TRL's own ``get_batch_loss_metrics`` runs on TRL's own collated batch; we first check that our
tokenization and collation give the identical tokens and completion positions.
"""

from __future__ import annotations

import pytest
import torch

from cpo_helpers import make_ours, make_trl

REL = 1e-5

CASES = [
    {"loss_type": "sigmoid"},  # CPO: cpo_alpha=1.0 by default
    {"loss_type": "sigmoid", "cpo_alpha": 0.0},
    {"loss_type": "sigmoid", "label_smoothing": 0.1, "cpo_alpha": 0.5},
    {"loss_type": "sigmoid", "beta": 0.5, "alpha": 0.05},  # AlphaPO reward on summed log-probs
    {"loss_type": "hinge"},
    {"loss_type": "hinge", "alpha": -0.05, "cpo_alpha": 0.0},
    {"loss_type": "ipo"},
    {"loss_type": "ipo", "beta": 0.5, "alpha": 0.3},
    {"loss_type": "simpo", "cpo_alpha": 0.0},
    {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.5, "simpo_gamma": 1.375},  # the SimPO preset's loss
    {"loss_type": "simpo", "cpo_alpha": 1.0, "label_smoothing": 0.2, "simpo_gamma": 0.0},
    {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5, "simpo_gamma": 0.1},  # the AlphaPO preset's loss
    {"loss_type": "alphapo", "alpha": -0.5, "beta": 2.0, "simpo_gamma": 0.5},
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


def _both(tokenizer, policy, tmp_path, dataset, **cfg):
    theirs = make_trl(tokenizer, policy, tmp_path, dataset, **cfg)
    ours = make_ours(tokenizer, policy, tmp_path, dataset, **cfg)
    rows = [theirs.train_dataset[i] for i in range(len(theirs.train_dataset))]
    their_batch = theirs.data_collator(rows)
    concatenated = theirs.concatenated_inputs(their_batch, padding_value=theirs.pad_token_id)
    our_batch = ours.collate(ours.train_dataset)
    assert torch.equal(our_batch["input_ids"], concatenated["concatenated_input_ids"])
    assert torch.equal(our_batch["attention_mask"], concatenated["concatenated_attention_mask"])
    assert torch.equal(our_batch["labels"], concatenated["concatenated_labels"])
    return theirs, their_batch, ours, our_batch


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_loss_gradients_and_metrics_match_trl(case, tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, cpo_policy, tmp_path, uneven_data["conversational_preference"], **case)
    their_loss, their_metrics = theirs.get_batch_loss_metrics(theirs.model, their_batch)
    their_loss.backward()
    our_loss, metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    our_loss.backward()
    print(f"{case}: ours={our_loss.item():.8f} trl={their_loss.item():.8f} rel={abs(our_loss.item() / their_loss.item() - 1):.2e}")
    assert abs(their_loss.item()) > 1e-4  # the case is not degenerate
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)
    their_grads = dict(theirs.model.named_parameters())
    worst = 0.0
    for name, p in ours.model.named_parameters():
        g_ours, g_theirs = p.grad, their_grads[name].grad
        assert g_ours is not None and g_theirs is not None, name
        # float32 round-off: element-wise to 1e-4 relative, or 1e-5 of the tensor's largest gradient entry
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-5 * g_theirs.abs().max().item(), msg=lambda m: f"{name}: {m}")
        worst = max(worst, ((g_ours - g_theirs).norm() / g_theirs.norm().clamp(min=1e-12)).item())
    print(f"worst relative gradient difference: {worst:.2e}")
    assert worst < 1e-4
    # Every metric TRL logs, by TRL's name; logits/* are ours by definition (a mean over completion tokens, see the docs).
    assert set(metrics) == set(their_metrics)
    for key, value in their_metrics.items():
        if not key.startswith("logits/"):
            assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("fmt", ["preference", "implicit_standard", "implicit_conversational"])
def test_tokenization_of_every_format_matches_trl(fmt, tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    from datasets import Dataset

    base = uneven_data["preference" if fmt in ("preference", "implicit_standard") else "conversational_preference"]
    if fmt.startswith("implicit"):  # only chosen/rejected, each holding the prompt too
        dataset = Dataset.from_dict({"chosen": [r["prompt"] + r["chosen"] for r in base], "rejected": [r["prompt"] + r["rejected"] for r in base]})
    else:
        dataset = base
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, cpo_policy, tmp_path, dataset)
    with torch.no_grad():
        their_loss, _ = theirs.get_batch_loss_metrics(theirs.model, their_batch)
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)


def test_truncation_matches_trl(tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    # prompts have 13 tokens, completions 4-7: max_length=15 cuts every completion to 2 tokens (the EOS included in the cut)
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, cpo_policy, tmp_path, uneven_data["conversational_preference"], max_length=15)
    assert our_batch["input_ids"].shape[1] == 15 and int((our_batch["labels"] != -100).sum()) == 2 * 2 * 8
    with torch.no_grad():
        their_loss, _ = theirs.get_batch_loss_metrics(theirs.model, their_batch)
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)
