"""Parity with TRL 1.16's DPOTrainer: same weights, same rows, same hyperparameters -> same loss and gradients.

The reference model is the policy plus seeded noise, so every log-ratio is non-zero and a wrong
log-prob computation cannot pass. TRL's own ``compute_loss`` runs on TRL's own collated batch; we
first check that our tokenization and collation give the identical batch. Both run on the CPU.

Tolerances. Both trainers run float32: TRL computes its log-probs in float32 whatever the model's
dtype (float64 weights would only move the difference onto TRL's side), through a different code path
(full logits, then log-softmax; ours: chunks of hidden states against the LM head). Each token
log-prob carries a rounding error of a few float32 ulps times log(V) ~ 6 (eps32 = 1.2e-7), ~1e-6
relative; a sequence log-prob sums <= 16 of them and the losses take beta-scaled differences of sums
that are not small here (the reference is perturbed), so the loss agrees to REL = 1e-5 (measured:
<= 2e-7 over every case), as do the metrics (means of the same quantities; absolute 1e-6 for a metric
that is itself ~0). Gradients are compared per tensor by the norm of the difference relative to their
own norm, to 1e-5 (measured: <= 5e-7), never entry by entry: entries near zero are all rounding.
"""

from __future__ import annotations

import pytest
import torch

from dpo_helpers import make_ours, make_trl, relative_norm_difference

REL = 1e-5

LOSS_CASES = [
    ({"loss_type": ["sigmoid"]}),
    ({"loss_type": ["hinge"]}),
    ({"loss_type": ["ipo"]}),
    ({"loss_type": ["exo_pair"], "label_smoothing": 1e-3}),
    ({"loss_type": ["nca_pair"]}),
    ({"loss_type": ["robust"], "label_smoothing": 0.1}),
    ({"loss_type": ["bco_pair"]}),
    ({"loss_type": ["sppo_hard"]}),
    ({"loss_type": ["aot"]}),
    ({"loss_type": ["aot"], "label_smoothing": 0.2}),
    ({"loss_type": ["aot_unpaired"]}),
    ({"loss_type": ["apo_zero"]}),
    ({"loss_type": ["apo_down"]}),
    ({"loss_type": ["discopop"]}),
    ({"loss_type": ["sft"]}),
    ({"loss_type": ["sigmoid_norm"]}),
    ({"loss_type": ["sigmoid"], "label_smoothing": 0.1}),  # TRL 1.16's sigmoid ignores label_smoothing; so do we
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),  # RPO
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),  # MPO
    ({"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"}),
    ({"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"}),
    ({"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
    ({"loss_type": ["ipo", "hinge"], "f_divergence_type": "js_divergence"}),
    ({"loss_type": ["sigmoid"], "use_weighting": True}),
    ({"loss_type": ["ipo", "nca_pair"], "use_weighting": True}),
    ({"loss_type": ["sigmoid"], "ld_alpha": 0.3}),
    ({"loss_type": ["sigmoid"], "ld_alpha": 0.0}),
    ({"loss_type": ["sigmoid"], "beta": 2.0}),
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


def _both(tiny_tokenizer, policy_and_ref, tmp_path, dataset, **cfg):
    policy, ref = policy_and_ref
    theirs = make_trl(tiny_tokenizer, policy, tmp_path, dataset, ref=ref, **cfg)
    ours = make_ours(tiny_tokenizer, policy, tmp_path, dataset, ref=ref, use_cpu=True, **cfg)  # on TRL's device
    their_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(theirs.train_dataset))])
    our_batch = ours.collate(ours.train_dataset)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(our_batch[key], their_batch[key]), key
    return theirs, their_batch, ours, our_batch


@pytest.mark.parametrize("case", LOSS_CASES, ids=_ids)
def test_loss_matches_trl(case, tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy_and_ref, tmp_path, pref_data["preference"], **case)
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    print(f"{case}: ours={our_loss.item():.8f} trl={their_loss.item():.8f} rel={abs(our_loss.item() / their_loss.item() - 1):.2e}")
    assert abs(their_loss.item()) > 1e-4  # the case is not degenerate
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)


def test_gradients_and_metrics_match_trl_for_sigmoid(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy_and_ref, tmp_path, pref_data["preference"], loss_type=["sigmoid"], beta=0.5)
    their_loss = theirs.compute_loss(theirs.model, their_batch)
    their_loss.backward()
    our_loss, metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    our_loss.backward()
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)
    their_grads = dict(theirs.model.named_parameters())
    worst = 0.0
    for name, p in ours.model.named_parameters():
        g_ours, g_theirs = p.grad, their_grads[name].grad
        assert g_ours is not None and g_theirs is not None and g_theirs.norm() > 0, name
        rel = relative_norm_difference(g_ours, g_theirs)
        assert rel < 1e-5, f"{name}: |ours - trl| / |trl| = {rel:.2e}"  # see the module docstring
        worst = max(worst, rel)
    print(f"worst relative gradient difference: {worst:.2e}")
    for key, values in theirs._metrics["train"].items():
        if key in metrics:
            assert metrics[key].item() == pytest.approx(values[-1], rel=1e-5, abs=1e-6), key
    compared = set(theirs._metrics["train"]) & set(metrics)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"} <= compared


@pytest.mark.parametrize("fmt", ["conversational_preference", "implicit_standard", "implicit_conversational"])
def test_tokenization_matches_trl(fmt, tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    from datasets import Dataset

    base = pref_data["preference" if fmt == "implicit_standard" else "conversational_preference"]
    if fmt.startswith("implicit"):  # only chosen/rejected, each holding the prompt too
        dataset = Dataset.from_dict({"chosen": [r["prompt"] + r["chosen"] for r in base], "rejected": [r["prompt"] + r["rejected"] for r in base]})
    else:
        dataset = base
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy_and_ref, tmp_path, dataset)
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)


def test_truncation_matches_trl(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    from datasets import Dataset

    rows = pref_data["preference"].to_dict()
    rows = {k: v[:6] + ([("please think step by step what is the sum " * 2) + "=" ] * 2 if k == "prompt" else v[6:]) for k, v in rows.items()}
    dataset = Dataset.from_dict(rows)  # 6 prompts of 6 tokens, 2 long prompts that max_length=8 drops
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy_and_ref, tmp_path, dataset, max_length=8)
    assert len(ours.train_dataset) == len(theirs.train_dataset) == 6
    assert our_batch["input_ids"].shape[1] == 8
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)
