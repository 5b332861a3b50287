"""Behaviour of our DPOTrainer: training, accumulation, resume, references, precompute, learning."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dpo_helpers import assert_reference_kept_off_the_accelerator, loss_on_device, make_ours, read_metrics
from posttrain.testing import warning_events

METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}


def test_init_minimal(tiny_model_dir, pref_data, tmp_path):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=tiny_model_dir, args=DPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"])
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert len(trainer.train_dataset) == 8 and set(trainer.train_dataset[0]) == {"prompt_ids", "chosen_ids", "rejected_ids"}


def test_train_changes_every_parameter_and_logs_metrics(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    policy, _ = policy_and_ref
    trainer = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["conversational_preference"], eval_dataset=pref_data["conversational_preference"], max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    for name, p in trainer.loop.unwrapped_model().named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"
    rows = read_metrics(str(tmp_path / "ours"))
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert METRICS <= set(train_rows[0])
    assert train_rows[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # the reference is the initial policy: log 2
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert eval_rows and {f"eval_{m}" for m in METRICS} <= set(eval_rows[-1])


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo", "bco_pair"]])
def test_gradient_accumulation_batch8x1_equals_batch1x8(loss_type, tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    policy, ref = policy_and_ref64  # float64: only the summation order differs, ~1e-16 relative, so 1e-10 holds anywhere
    # Adam with eps >> |g| makes the first step ~ lr * g / eps: comparing parameters compares raw gradients.
    sgd_like = dict(max_steps=1, adam_epsilon=1.0, learning_rate=1.0, max_grad_norm=0.0, loss_type=loss_type)
    data = pref_data["conversational_preference"]  # uneven completion lengths
    a = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="a", per_device_train_batch_size=8, gradient_accumulation_steps=1, **sgd_like)
    b = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="b", per_device_train_batch_size=1, gradient_accumulation_steps=8, **sgd_like)
    out_a, out_b = a.train(), b.train()
    assert out_a.training_loss == pytest.approx(out_b.training_loss, rel=1e-10)
    for (name, pa), pb in zip(a.loop.unwrapped_model().named_parameters(), b.loop.unwrapped_model().parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_resume_reproduces_uninterrupted_losses_with_tr_dpo_reference(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    # float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible (accelerators), while a
    # wrongly restored state (policy, reference, Adam moments, schedule, data order) moves the loss by far more than 1e-12
    policy, _ = policy_and_ref64
    # TR-DPO updates the reference every step, so its weights must be checkpointed too.
    cfg = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    full = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["preference"], name="full", save_strategy="steps", save_steps=2, **cfg)
    full.train()
    resumed = make_ours(
        tiny_tokenizer, policy, tmp_path, pref_data["preference"], name="resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"), **cfg
    )
    resumed.train()
    losses_full = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "full")) if "loss" in r}
    losses_resumed = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "resumed")) if "loss" in r}
    assert sorted(losses_resumed) == [3, 4]
    for step in (3, 4):
        assert losses_resumed[step] == pytest.approx(losses_full[step], rel=1e-12), step


def test_tr_dpo_sync_mixes_policy_into_reference(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    policy, ref = policy_and_ref
    trainer = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["preference"], ref=ref, max_steps=1, learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.6)
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    for name, p in trainer.loop.unwrapped_model().named_parameters():
        torch.testing.assert_close(trainer.ref_model.get_parameter(name), 0.6 * p.detach() + 0.4 * ref_before[name])


def test_peft_reference_is_adapter_disabled_policy_and_equals_frozen_base(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    from peft import LoraConfig

    policy, _ = policy_and_ref64  # float64: two code paths (adapter disabled vs a separate base model), a tight tolerance holds anywhere
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with_adapter = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["preference"], name="peft", peft_config=lora)
    assert with_adapter.ref_model is None  # no second copy in memory
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move the policy away from its base so the log-ratios are not zero
        for name, p in with_adapter.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    explicit = make_ours(tiny_tokenizer, with_adapter.model, tmp_path, pref_data["preference"], ref=policy, name="explicit")
    batch = with_adapter.collate(with_adapter.train_dataset)
    with torch.no_grad():
        loss_adapter, m_adapter = loss_on_device(with_adapter, batch, 8)
        loss_explicit, m_explicit = loss_on_device(explicit, batch, 8)
    assert abs(m_adapter["rewards/margins"].item()) > 1e-4
    assert loss_adapter.item() == pytest.approx(loss_explicit.item(), rel=1e-12)
    assert m_adapter["rewards/chosen"].item() == pytest.approx(m_explicit["rewards/chosen"].item(), rel=1e-12)


def test_precompute_ref_log_probs_gives_the_explicit_reference_loss(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    policy, ref = policy_and_ref64  # float64: precomputed in batches of 3 vs live in one batch of 8 (other padding), ~1e-16 apart
    data = pref_data["preference"]
    pre = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="pre", eval_dataset=data, precompute_ref_log_probs=True, precompute_ref_batch_size=3)
    assert all(r["ref_chosen_logps"] is not None for r in list(pre.train_dataset) + list(pre.eval_dataset))
    assert_reference_kept_off_the_accelerator(pre)
    explicit = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="explicit")
    batch_pre, batch_explicit = pre.collate(pre.train_dataset), explicit.collate(explicit.train_dataset)
    with torch.no_grad():
        loss_pre, _ = loss_on_device(pre, batch_pre, 8)
        loss_explicit, _ = loss_on_device(explicit, batch_explicit, 8)
    assert abs(loss_explicit.item() - 0.693147) > 1e-3
    # the stored reference log-probs are float32 (as TRL stores them): each is off by <= eps32 * |logp| ~ 1e-7 * 20, which
    # beta = 0.1 and the sigmoid's slope (<= 1/4) shrink further; 1e-6 relative on a loss of ~0.7 bounds that (measured 1e-8)
    assert loss_pre.item() == pytest.approx(loss_explicit.item(), rel=1e-6)


def test_precompute_without_ref_model_keeps_the_initial_policy_as_reference_for_eval(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    # trl#6443: eval reference log-probs must come from the initial policy, never the trained one.
    policy, _ = policy_and_ref64  # float64: the reference log-probs come in other batch shapes; that costs ~1e-16 only
    data = pref_data["preference"]
    cfg = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, eval_dataset=data)
    pre = make_ours(tiny_tokenizer, policy, tmp_path, data, name="pre", precompute_ref_log_probs=True, **cfg)
    explicit = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=policy, name="explicit", **cfg)
    assert pre.ref_model is None
    pre.train()
    explicit.train()
    eval_pre = [r for r in read_metrics(str(tmp_path / "pre")) if "eval_loss" in r][-1]
    eval_explicit = [r for r in read_metrics(str(tmp_path / "explicit")) if "eval_loss" in r][-1]
    assert abs(eval_pre["eval_rewards/margins"]) > 1e-4
    # what remains is the float32 storage of the precomputed log-probs (as TRL's): ~1e-7 relative on every loss and gradient
    # of the 3 steps (measured 1e-7 on the eval metrics), so 1e-5 has margin; scoring with the trained policy (trl#6443) cannot hide in it
    for key in ("eval_loss", "eval_rewards/margins", "eval_rewards/chosen"):
        assert eval_pre[key] == pytest.approx(eval_explicit[key], rel=1e-5), key


def _arithmetic(offsets):
    """Return rows "what is a + b =" -> chosen: the sum, rejected: the sum + offset (a, b in 0..4)."""
    return [
        {"prompt": f"what is {a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + off}"}
        for a in range(5)
        for b in range(5)
        for off in offsets
    ]


def test_learning_raises_held_out_preference_accuracy_and_margin(tiny_tokenizer, tmp_path):
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_model

    # Held-out pairs pit the correct sum against wrong answers never seen in training.
    train, held_out = Dataset.from_list(_arithmetic([-1, 1, 3])), Dataset.from_list(_arithmetic([-2, 2]))
    policy = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)
    trainer = make_ours(
        tiny_tokenizer, policy, tmp_path, train, eval_dataset=held_out, max_steps=30, per_device_train_batch_size=15,
        learning_rate=1e-2, beta=0.1, logging_steps=10, lr_scheduler_type="constant", per_device_eval_batch_size=50,
    )
    before = trainer.loop.evaluate(trainer)
    trainer.train()
    after = trainer.loop.evaluate(trainer)
    print(f"held-out before: acc={before['eval_rewards/accuracies']:.3f} margin={before['eval_rewards/margins']:.4f} loss={before['eval_loss']:.4f}")
    print(f"held-out after:  acc={after['eval_rewards/accuracies']:.3f} margin={after['eval_rewards/margins']:.4f} loss={after['eval_loss']:.4f}")
    assert after["eval_rewards/accuracies"] >= before["eval_rewards/accuracies"] + 0.5
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.2
    assert after["eval_loss"] < before["eval_loss"] - 0.02
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm
