"""Tests of the KTO plugin: parity with TRL, unpairing, GA behaviour, learning, resume, validation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posttrain import ConfigError
from posttrain.testing import warning_events

CONFIG = dict(report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no")


def _config(tmp_path, **kw):
    from posttrain.methods.kto import KTOConfig

    return KTOConfig(output_dir=str(tmp_path / "out"), **{**CONFIG, **kw})


def _trainer(tmp_path, model, tok, data, eval_data=None, ref_model=None, peft_config=None, **kw):
    from posttrain.methods.kto import KTOTrainer

    return KTOTrainer(model=model, ref_model=ref_model, args=_config(tmp_path, **kw), train_dataset=data, eval_dataset=eval_data, processing_class=tok, peft_config=peft_config)


def _metrics(tmp_path):
    with open(tmp_path / "out" / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def _rows(dataset, start: int, stop: int) -> list[dict]:
    """Rows ``start:stop`` of a processed (``datasets.Dataset``) train/eval set, as a list of dicts."""
    return list(dataset.select(range(start, stop)))


def _perturbed(model, scale: float = 0.05, seed: int = 0):
    """Return a copy of ``model`` with seeded noise on every weight (a reference that differs from the policy)."""
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref


@pytest.fixture
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, seed=0)


# ---------------------------------------------------------------------------- basics
def test_init_minimal(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"])
    assert len(trainer.train_dataset) == len(tiny_datasets["unpaired_preference"])
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_train_changes_every_parameter_and_logs_metrics(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer.train()
    for name, param in trainer.loop.unwrapped_model().named_parameters():
        assert not torch.equal(before[name], param.detach()), f"{name} did not change"
    logged = _metrics(tmp_path)[0]
    for key in ("loss", "kl", "entropy", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        assert key in logged  # TRL's metric names


# ---------------------------------------------------------------------------- parity with TRL
def _trl_trainer(tmp_path, model, ref_model, tok, data, **kw):
    from trl import KTOConfig as TRLKTOConfig
    from trl import KTOTrainer as TRLKTOTrainer

    args = TRLKTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, gradient_checkpointing=False, use_cpu=True, **kw)
    return TRLKTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("data_name", ["preference", "unpaired_preference", "conversational_preference", "implicit_prompt"])
def test_dataset_processing_matches_trl(tmp_path, data_name, policy, tiny_tokenizer, tiny_datasets):
    """Paired data is unpaired (one desirable + one undesirable row per pair) and tokenized exactly as TRL does."""
    data = tiny_datasets["preference" if data_name == "implicit_prompt" else data_name]
    if data_name == "implicit_prompt":
        data = data.map(lambda ex: {"chosen": ex["prompt"] + ex["chosen"], "rejected": ex["prompt"] + ex["rejected"]}, remove_columns=["prompt"])
    ours = _trainer(tmp_path, policy, copy.deepcopy(tiny_tokenizer), data, per_device_train_batch_size=4)
    theirs = _trl_trainer(tmp_path, copy.deepcopy(policy), copy.deepcopy(policy), copy.deepcopy(tiny_tokenizer), data, per_device_train_batch_size=4)
    expected = [{k: row[k] for k in ("prompt_ids", "completion_ids", "label")} for row in theirs.train_dataset]
    assert [dict(row) for row in ours.train_dataset] == expected
    if "chosen" in data.column_names:
        assert len(ours.train_dataset) == 2 * len(data) and sum(r["label"] for r in ours.train_dataset) == len(data)
    # the KL partner of each row in a micro-batch is the previous row's completion, as in TRL's first batch
    batch = ours.collate(_rows(ours.train_dataset, 0, 4))
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(4)])
    assert torch.equal(batch["KL_input_ids"], trl_batch["KL_input_ids"]) and torch.equal(batch["KL_completion_mask"], trl_batch["KL_completion_mask"])


@pytest.mark.parametrize(
    ("loss_type", "data_name", "check_grad"),
    [("kto", "preference", True), ("kto", "conversational_preference", False), ("apo_zero_unpaired", "unpaired_preference", True)],
)
def test_loss_matches_trl(tmp_path, loss_type, data_name, check_grad, policy, tiny_tokenizer, tiny_datasets):
    """Same rows, same weights, a perturbed reference: TRL's loss, metrics and gradients. Both on the CPU.

    Tolerances. Both sides run float32: TRL computes its log-probs in float32 whatever the model's
    dtype (float64 weights would only move the difference onto TRL's side), from the full logits; we
    score chunks of hidden states against the LM head. Each token log-prob carries a rounding error of a
    few float32 ulps times log(V) ~ 6 (eps32 = 1.2e-7), ~1e-6 relative; the loss (sigmoids of
    beta-scaled log-ratios of sequence sums) keeps that order: 1e-5 relative (measured <= 1e-7). The KL
    estimate z is a mean of differences of log-probs of ~-20 that nearly cancel (z ~ 0.1), which
    amplifies the relative error ~100x: 1e-4 relative, 1e-6 absolute. Gradients are compared per tensor
    by the norm of the difference relative to their own norm, to 1e-5 (measured <= 1e-6), never entry by
    entry: entries near zero are all rounding.
    """
    data = tiny_datasets[data_name]
    ref = _perturbed(policy)
    kw = dict(loss_type=loss_type, beta=0.5, desirable_weight=1.3, undesirable_weight=0.8, per_device_train_batch_size=8)
    theirs = _trl_trainer(tmp_path, copy.deepcopy(policy), copy.deepcopy(ref), copy.deepcopy(tiny_tokenizer), data, **kw)
    ours = _trainer(tmp_path, policy, copy.deepcopy(tiny_tokenizer), data, ref_model=ref, use_cpu=True, **kw)

    rows = list(range(12, 20))  # mixed labels (unpairing puts the 16 desirable rows first)
    batch = ours.collate([ours.train_dataset[i] for i in rows])
    trl_rows = [dict(theirs.train_dataset[i]) for i in rows]
    for i, row in enumerate(trl_rows):  # TRL's rotation by one, within this batch
        row["KL_completion_ids"] = trl_rows[i - 1]["completion_ids"]
    trl_batch = theirs.data_collator(trl_rows)
    assert batch["label"].any() and not batch["label"].all()
    assert torch.equal(batch["KL_input_ids"], trl_batch["KL_input_ids"]) if "KL_input_ids" in batch else True
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])

    loss, metrics = ours.compute_loss(ours.model, batch, ours.count_items(batch))
    trl_loss = theirs.compute_loss(theirs.model, dict(trl_batch))
    torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=0)
    trl_metrics = theirs._metrics["train"]
    assert float(metrics["kl"]) == pytest.approx(trl_metrics["kl"][-1], rel=1e-4, abs=1e-6)
    if loss_type == "kto":
        assert float(metrics["kl"]) > 0  # the KL term is active in this comparison
    if "rewards/chosen" in trl_metrics:
        ours_chosen = float(metrics["rewards/chosen"])
        assert ours_chosen == pytest.approx(trl_metrics["rewards/chosen"][-1], rel=1e-4, abs=1e-6)
    if check_grad:
        loss.backward()
        trl_loss.backward()
        worst = 0.0
        for (name, p), (_, q) in zip(ours.model.named_parameters(), theirs.model.named_parameters()):
            assert q.grad.norm() > 0, name
            rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
            assert rel <= 1e-5, f"{name}: |ours - trl| / |trl| = {rel:.2e}"
            worst = max(worst, rel)
        print(f"{loss_type}: loss rel {abs(loss.item() / trl_loss.item() - 1):.2e}, worst relative gradient difference {worst:.2e}")


def _loss_on_device(trainer, rows, num_items_in_batch):
    """``compute_loss`` of ``rows`` on the training device, where the reference already is (an accelerator when present)."""
    trainer.model.to(trainer.loop.device)
    return trainer.compute_loss(trainer.model, trainer.loop.to_device(trainer.collate(rows)), num_items_in_batch)


def test_precomputed_reference_gives_the_same_loss(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    policy = policy.double()  # float64: precomputed in other batch shapes than the live scoring, which then costs ~1e-16
    ref = _perturbed(policy)
    data = tiny_datasets["preference"]
    live = _trainer(tmp_path / "a", copy.deepcopy(policy), tiny_tokenizer, data, ref_model=copy.deepcopy(ref), per_device_train_batch_size=4)
    pre = _trainer(tmp_path / "b", copy.deepcopy(policy), tiny_tokenizer, data, ref_model=ref, per_device_train_batch_size=4, precompute_ref_log_probs=True)
    assert "ref_logps" in pre.train_dataset[0] and "ref_KL_logps" in pre.train_dataset[0]
    rows = _rows(pre.train_dataset, 4, 8)  # one chunk of the fixed KL pairing == the in-batch rotation
    loss_live, _ = _loss_on_device(live, rows, 4)
    loss_pre, _ = _loss_on_device(pre, rows, 4)
    # what remains is the float32 storage of the precomputed log-probs (as TRL's): each is off by <= eps32 * |logp| ~ 1e-7 * 20,
    # which beta and the sigmoid's slope shrink; 1e-6 relative to the loss bounds that
    torch.testing.assert_close(loss_pre, loss_live, rtol=1e-6, atol=0)


def test_peft_reference_is_the_adapter_disabled_policy(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from peft import LoraConfig

    policy = policy.double()  # float64: adapter disabled vs the separate base model, two code paths that then agree to far below float32
    base = copy.deepcopy(policy)
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), per_device_train_batch_size=4)
    assert trainer.ref_model is None
    batch = trainer.collate(_rows(trainer.train_dataset, 0, 4))
    ref_logps, _ = trainer._reference_logps(batch)
    base_logps, _ = trainer._sequence_logps(base, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy_logps, _ = trainer._sequence_logps(trainer.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    # the sequence log-probs come back as float32 sums (by design), so the two float64 paths, which agree far more closely,
    # can still round to neighbouring float32 values: 1 ulp (1.2e-7 relative); 2.5e-7 allows that and nothing more
    torch.testing.assert_close(ref_logps, base_logps, rtol=2.5e-7, atol=0)
    assert not torch.allclose(policy_logps, base_logps)  # the adapter is active outside the reference context


# ---------------------------------------------------------------------------- gradient accumulation
GA_OPT = dict(max_steps=1, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0)


def _one_step_params(tmp_path, tok, data, policy, ref, bs, ga, **kw):
    """Parameters after one step, in float64: the accumulation layouts only change summation orders, ~1e-16 relative.

    (KTO rounds its sequence log-prob sums to float32; sums that agree to ~1e-16 round alike unless one sits within
    1e-16 of a float32 rounding boundary, a chance of ~1e-9 per sum.)
    """
    policy, ref = copy.deepcopy(policy).double(), copy.deepcopy(ref).double()
    trainer = _trainer(tmp_path / f"{bs}x{ga}", policy, tok, data, ref_model=ref, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **GA_OPT, **kw)
    trainer.train()
    return [p.detach().clone() for p in trainer.loop.unwrapped_model().parameters()]


def test_gradient_accumulation_8x1_equals_1x8_for_apo_zero_unpaired(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    data, ref = tiny_datasets["unpaired_preference"].select(range(8)), _perturbed(policy)
    a = _one_step_params(tmp_path, tiny_tokenizer, data, policy, ref, 8, 1, loss_type="apo_zero_unpaired")
    b = _one_step_params(tmp_path, tiny_tokenizer, data, policy, ref, 1, 8, loss_type="apo_zero_unpaired")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_gradient_accumulation_kto_is_batch_coupled_through_the_kl_estimate(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    """KTO's z is per micro-batch: 8x1 == 4x2 only when z is the same (0 here, reference == policy at step 0)."""
    data = tiny_datasets["unpaired_preference"].select(range(8))
    same = [_one_step_params(tmp_path / "same", tiny_tokenizer, data, policy, policy, bs, ga) for bs, ga in ((8, 1), (4, 2))]
    for x, y in zip(*same):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    ref = _perturbed(policy, scale=0.2, seed=3)
    differ = [_one_step_params(tmp_path / "differ", tiny_tokenizer, data, policy, ref, bs, ga, beta=1.0) for bs, ga in ((8, 1), (4, 2))]
    gap = max(float((x - y).abs().max()) for x, y in zip(*differ))
    print(f"KTO 8x1 vs 4x2 max parameter gap after one step: {gap:.2e}")
    assert gap > 1e-4, "with a KL estimate > 0 the micro-batch split changes z and so the update"


# ---------------------------------------------------------------------------- resume
def test_resume_reproduces_uninterrupted_losses(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["preference"]
    kw = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3, save_strategy="steps", save_steps=2)
    # float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible (accelerators), while a
    # wrongly restored state (weights, reference, Adam moments, schedule, data order) moves the loss by far more than 1e-12
    full = _trainer(tmp_path, copy.deepcopy(policy).double(), tiny_tokenizer, data, **kw)
    full.train()
    reference = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
    resumed = _trainer(tmp_path, copy.deepcopy(policy).double(), tiny_tokenizer, data, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"), **kw)
    resumed.train()
    again = [m["loss"] for m in _metrics(tmp_path) if "loss" in m]
    assert len(reference) == len(again) == 4 and again == pytest.approx(reference, rel=1e-12)


# ---------------------------------------------------------------------------- learning
def _marker_data(n_prompts: int, seed: int):
    """Unpaired data: a desirable completion contains the word 'yes', an undesirable one does not."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    words = "the a cat dog sat on mat red blue green what is answer please think step".split()
    rows = {"prompt": [], "completion": [], "label": []}
    for _ in range(n_prompts):
        prompt = f"question {rng.randint(0, 99)}:"
        body = [rng.choice(words) for _ in range(rng.randint(2, 4))]
        good = list(body)
        good.insert(rng.randint(0, len(good)), "yes")
        for completion, label in ((" " + " ".join(good), True), (" " + " ".join(body), False)):
            rows["prompt"].append(prompt)
            rows["completion"].append(completion)
            rows["label"].append(label)
    return Dataset.from_dict(rows)


def _held_out_accuracy(trainer, data) -> float:
    """Fraction of held-out prompts whose desirable completion gets a higher implicit reward than its undesirable one."""
    rows = list(trainer.process_dataset(data, "eval_dataset"))
    batch = trainer.loop.to_device(trainer.collate(rows))
    model = trainer.loop.unwrapped_model()
    with torch.no_grad():
        logps, _ = trainer._sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        ref_logps, _ = trainer._reference_logps(batch)
    rewards = (logps - ref_logps).view(-1, 2)  # (prompts, [desirable, undesirable])
    return float((rewards[:, 0] > rewards[:, 1]).float().mean())


def test_learns_to_reward_desirable_completions_on_held_out_prompts(tmp_path, policy, tiny_tokenizer):
    train, held_out = _marker_data(32, seed=0), _marker_data(24, seed=1)
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, train, held_out, num_train_epochs=3, per_device_train_batch_size=8, learning_rate=2e-3, beta=0.1)
    before = trainer.loop.evaluate(trainer)
    acc_before = _held_out_accuracy(trainer, held_out)
    after = trainer.train().metrics
    acc_after = _held_out_accuracy(trainer, held_out)
    print(
        f"held-out reward margin {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}; "
        f"accuracy {acc_before:.3f} -> {acc_after:.3f}; eval loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}"
    )
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.05  # reward units: beta * log-ratio
    assert acc_after >= 0.9 and after["eval_loss"] < before["eval_loss"] - 0.005
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm


# ---------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"loss_type": "sigmoid"}, "loss_type='sigmoid'"),
        ({"beta": 0.0}, "beta=0.0"),
        ({"desirable_weight": 0.0}, "desirable_weight=0.0"),
        ({"undesirable_weight": -1.0}, "undesirable_weight=-1.0"),
        ({"per_device_train_batch_size": 1}, "per_device_train_batch_size=1 is invalid with loss_type='kto'"),
        ({"max_length": 1}, "max_length=1"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0"),
        ({"precompute_ref_batch_size": 0}, "precompute_ref_batch_size=0"),
        ({"use_liger_kernel": True, "liger_kernel_config": {"fused_linear_cross_entropy": True}}, 'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with KTO'),
    ],
)
def test_config_rejects_invalid_value(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        _config(tmp_path, **overrides)


def test_batch_size_one_is_allowed_without_kl_term(tmp_path):
    assert _config(tmp_path, per_device_train_batch_size=1, loss_type="apo_zero_unpaired").per_device_train_batch_size == 1


def test_dataset_without_label_is_rejected(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="KTO needs unpaired 'prompt'/'completion'/'label'"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["prompt_completion"])


def test_prompts_filling_max_length_are_an_error(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="max_length=3"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], max_length=3)
