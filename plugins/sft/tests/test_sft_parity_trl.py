"""Parity with TRL's SFTTrainer: same rows -> same tokens, same label masks, same loss (and gradients)."""

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
    assert rel <= 1e-5


def test_gradients_match_trl(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    ours, theirs, our_batch, their_batch = _pair(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path, "messages", {"assistant_only_loss": True})
    theirs.compute_loss(theirs.model, dict(their_batch)).backward()
    ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))[0].backward()
    their_grads = {n: p.grad for n, p in theirs.model.named_parameters() if p.grad is not None}
    our_grads = {n: p.grad for n, p in ours.model.named_parameters()}
    assert set(their_grads) == set(our_grads)
    for name, grad in their_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
