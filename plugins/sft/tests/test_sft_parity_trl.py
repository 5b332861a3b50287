"""Parity with TRL's SFTTrainer: same rows -> same tokens, same label masks, same loss (and gradients).

Tolerances. Both trainers run float32 (TRL computes its log-probs in float32 whatever the model's dtype,
so float64 would only move the difference onto TRL's side), through different code paths: TRL takes
the log-softmax of the full logits, we score chunks of hidden states against the LM head, with other
reduction orders. Each token log-prob then carries a rounding error of a few float32 ulps times
log(V) ~ 6 (eps32 = 1.2e-7), i.e. ~1e-6 relative; the mean over the label tokens does not amplify it.
So the loss must agree to 1e-5 relative (measured <= 2e-7), and each gradient tensor to 1e-5 in the
norm of the difference relative to its own norm (measured <= 2e-6). Gradients are not compared entry
by entry: entries near zero are all rounding, and their size depends on the machine's summation order.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")

from posttrain_sft import SFTTrainer  # noqa: E402

CASES = {
    "text": ("text", {}),
    "messages": ("messages", {}),
    "prompt_completion": ("prompt_completion", {}),
    "conversational_prompt_completion": ("conversational_prompt_completion", {}),
    "assistant_only_loss": ("messages", {"assistant_only_loss": True}),
    "dft": ("prompt_completion", {"loss_type": "dft"}),
}


def _pair(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path, fmt, overrides):
    data = tiny_datasets[fmt]
    ours = SFTTrainer(model=copy.deepcopy(tiny_model), args=make_config(**overrides), train_dataset=data, processing_class=tiny_tokenizer)
    trl_args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True, **overrides)
    theirs = trl.SFTTrainer(model=copy.deepcopy(tiny_model), args=trl_args, train_dataset=data, processing_class=tiny_tokenizer)
    our_batch = ours.collate([ours.train_dataset[i] for i in range(6)])
    their_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(6)])
    return ours, theirs, our_batch, their_batch


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_trl(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path, case):
    fmt, overrides = CASES[case]
    ours, theirs, our_batch, their_batch = _pair(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path, fmt, overrides)
    assert torch.equal(our_batch["input_ids"], their_batch["input_ids"])
    assert torch.equal(our_batch["labels"], their_batch["labels"])
    assert torch.equal(our_batch["attention_mask"], their_batch["attention_mask"])
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, dict(their_batch))
        our_loss, _ = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    rel = abs(our_loss.item() - their_loss.item()) / abs(their_loss.item())
    print(f"{case}: ours {our_loss.item():.8f} trl {their_loss.item():.8f} rel {rel:.2e}")
    assert rel <= 1e-5  # see the module docstring


def test_gradients_match_trl(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    ours, theirs, our_batch, their_batch = _pair(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path, "messages", {"assistant_only_loss": True})
    theirs.compute_loss(theirs.model, dict(their_batch)).backward()
    ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))[0].backward()
    their_grads = {n: p.grad for n, p in theirs.model.named_parameters() if p.grad is not None}
    our_grads = {n: p.grad for n, p in ours.model.named_parameters()}
    assert set(their_grads) == set(our_grads)
    worst = 0.0
    for name, grad in their_grads.items():
        assert grad.norm() > 0, name  # every tensor gets a gradient, so the comparison below means something
        rel = ((our_grads[name] - grad).norm() / grad.norm()).item()
        assert rel <= 1e-5, f"{name}: |ours - trl| / |trl| = {rel:.2e}"  # see the module docstring
        worst = max(worst, rel)
    print(f"worst relative gradient difference: {worst:.2e}")
