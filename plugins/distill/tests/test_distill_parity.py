"""Parity of the distillation loss with TRL 1.16's ``DistillationTrainer`` math, in float64 on fixed inputs.

Two references:

* TRL's dense generalized JSD (``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``, Eq. 1 of
  arXiv:2306.13649) on the full logits, float64 throughout: the exact value of TRL 1.16's objective
  (``_chunked_divergence_loss``: sum over valid completion tokens / ``num_items_in_batch``).
* TRL 1.16's own ``_chunked_divergence_loss`` (its chunked kernel, which always computes in float32
  whatever the input dtype): the same numbers to float32 rounding (relative 1e-5 loss / 1e-4 gradients).

And the trainer end to end: ``DistillationTrainer.compute_loss`` against TRL's ``DistillationTrainer._compute_loss``
(TRL's trainer built on CPU, ``use_cpu=True, bf16=False``) on the same float64 student, teacher and micro-batch.
"""

from __future__ import annotations

import pytest
import torch

from distill_helpers import rel_err, tiny_lm

trl = pytest.importorskip("trl")

from posttrain import TokenStates  # noqa: E402

from posttrain_distill.trainer import distillation_divergence_sums  # noqa: E402

V, HS, HT, B, C = 48, 8, 12, 3, 5


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, C, HS, generator=g, dtype=torch.float64).requires_grad_()
    ws = (torch.randn(V, HS, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    bs = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    ht = torch.randn(B, C, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64) * 0.7
    bt = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])  # right-padded completions
    return hs, ws, bs, ht, wt, bt, mask


def _ours(hs, ws, bs, ht, wt, bt, mask, beta, temperature, num_items, chunk_size=4):
    total, _, _, _ = distillation_divergence_sums(TokenStates(hs, ws, bs), TokenStates(ht, wt, bt), mask, beta=beta,
                                                  temperature=temperature, chunk_size=chunk_size)
    return total / num_items


def _grads(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_loss_and_gradients_equal_trls_dense_generalized_jsd_in_float64(beta, temperature):
    from trl.experimental.gkd import GKDTrainer

    hs, ws, bs, ht, wt, bt, mask = _inputs()
    num_items = 13.0  # a global count (other micro-batches of the step hold the rest): TRL's num_items_in_batch
    ours = _ours(hs, ws, bs, ht, wt, bt, mask, beta, temperature, num_items)
    s_logits = hs @ ws.T + bs
    t_logits = ht @ wt.T + bt
    labels = torch.where(mask.bool(), torch.zeros_like(mask), torch.full_like(mask, -100))
    ref = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=num_items)
    assert rel_err(ours, ref) < 1e-5, (float(ours), float(ref))
    for mine, theirs in zip(_grads(ours, (hs, ws, bs)), _grads(ref, (hs, ws, bs))):
        assert rel_err(mine, theirs) < 1e-4
    assert rel_err(ours, ref) < 1e-10  # float64 on both sides: equal to rounding


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_loss_and_gradients_equal_trls_chunked_divergence_loss(beta):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hs, ws, bs, ht, wt, bt, mask = _inputs(1)
    num_items = torch.tensor(11.0)
    ours = _ours(hs, ws, bs, ht, wt, bt, mask, beta, 0.9, num_items)
    ref, entropy_sum, n_valid = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta, num_items_in_batch=num_items, student_lm_head_bias=bs,
                                                         teacher_lm_head_bias=bt, temperature=0.9)
    assert rel_err(ours, ref) < 1e-5, (float(ours), float(ref))
    for mine, theirs in zip(_grads(ours, (hs, ws, bs)), _grads(ref, (hs, ws, bs))):
        assert rel_err(mine, theirs) < 1e-4
    _, our_entropy, _, our_valid = distillation_divergence_sums(TokenStates(hs, ws, bs), TokenStates(ht, wt, bt), mask, beta=beta, temperature=0.9)
    assert int(our_valid) == int(n_valid) == int(mask.sum())
    assert rel_err(our_entropy, entropy_sum) < 1e-5


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_core_logit_scale_and_softcap_equal_trls(beta):
    """The core's additive per-side logit_scale / final_logit_softcapping equal TRL's kernel arguments (Cohere / Gemma heads)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from posttrain import chunked_distillation_divergence

    hs, ws, bs, ht, wt, bt, mask = _inputs(2)
    valid = mask.reshape(-1) != 0
    per_token = chunked_distillation_divergence(hs.reshape(-1, HS)[valid], ws, ht.reshape(-1, HT)[valid], wt, student_bias=bs, teacher_bias=bt,
                                                beta=beta, temperature=1.3, chunk_size=3, student_logit_scale=0.5, teacher_logit_scale=1.7,
                                                student_final_logit_softcapping=2.0, teacher_final_logit_softcapping=3.0)
    ours = per_token.sum() / 9.0
    ref, _, _ = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta, num_items_in_batch=9.0, student_lm_head_bias=bs, teacher_lm_head_bias=bt,
                                         student_logit_scale=0.5, teacher_logit_scale=1.7, student_final_logit_softcapping=2.0,
                                         teacher_final_logit_softcapping=3.0, temperature=1.3)
    assert rel_err(ours, ref) < 1e-5, (float(ours), float(ref))
    for mine, theirs in zip(_grads(ours, (hs, ws, bs)), _grads(ref, (hs, ws, bs))):
        assert rel_err(mine, theirs) < 1e-4


def _trl_trainer(student, teacher, tokenizer, tmp_path, beta, temperature):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, beta=beta, temperature=temperature, report_to="none",
                              gradient_checkpointing=False, per_device_train_batch_size=3, max_completion_length=6)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                               train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))


@pytest.mark.parametrize("beta,temperature", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.2)])
def test_trainer_compute_loss_equals_trls_compute_loss(tiny_tokenizer, tmp_path, beta, temperature):
    import copy

    from posttrain.methods.distill import DistillationConfig, DistillationTrainer

    student = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0)
    teacher = tiny_lm(tiny_tokenizer, hidden_size=24, seed=1)
    with torch.no_grad():  # sharp, different distributions: a divergence of order 1, far above TRL's float32 kernel rounding
        student.lm_head.weight.mul_(8.0)
        teacher.lm_head.weight.mul_(20.0)
    trl_student = copy.deepcopy(student)
    pad = tiny_tokenizer.pad_token_id
    # a fixed micro-batch: left-padded prompts, right-padded completions
    batch = {
        "prompt_ids": torch.tensor([[pad, 5, 6, 7], [8, 9, 10, 11], [pad, pad, 12, 13]]),
        "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1]]),
        "completion_ids": torch.tensor([[20, 21, 22, 23, 24], [30, 31, pad, pad, pad], [40, 41, 42, 43, pad]]),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]),
    }
    num_items = torch.tensor(17.0)  # the step's count (this micro-batch holds 11 of them)

    args = DistillationConfig(output_dir=str(tmp_path / "ours"), beta=beta, temperature=temperature, report_to="none", disable_tqdm=True,
                              gradient_checkpointing=False, per_device_train_batch_size=3, max_completion_length=6, logprob_chunk_size=4)
    ours_trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tiny_tokenizer,
                                       train_dataset=[{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
    ours_model = ours_trainer.model
    loss, metrics = ours_trainer.compute_loss(ours_model, {**batch, "num_completion_tokens": 11}, num_items)
    loss.backward()

    trl_trainer = _trl_trainer(trl_student, teacher, tiny_tokenizer, tmp_path, beta, temperature)
    unwrapped = trl_trainer.accelerator.unwrap_model(trl_trainer.model)
    ref, entropy_sum, n_valid = trl_trainer._compute_loss(unwrapped, batch, num_items)
    ref.backward()

    assert float(ref) > 0.1  # not a near-zero divergence (a relative error would measure rounding only)
    assert rel_err(loss, ref) < 1e-5, (float(loss), float(ref))
    assert rel_err(metrics["entropy"], entropy_sum / n_valid) < 1e-5
    ours_grads = dict(ours_model.named_parameters())
    compared = 0
    for name, p in unwrapped.named_parameters():
        if p.grad is None:
            continue
        assert rel_err(ours_grads[name].grad, p.grad) < 1e-4, name
        compared += 1
    assert compared == len(ours_grads)
    worst_grad = max(rel_err(ours_grads[name].grad, p.grad) for name, p in unwrapped.named_parameters())
    print(f"distill vs TRL _compute_loss (beta={beta}, T={temperature}): loss rel {rel_err(loss, ref):.1e}, worst grad rel {worst_grad:.1e}")

    # and, exactly in float64: TRL's dense generalized JSD on the two models' full logits at the completion positions
    from trl.experimental.gkd import GKDTrainer

    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        width = batch["completion_ids"].shape[1]
        s_logits = ours_model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
        t_logits = teacher(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
    labels = torch.where(batch["completion_mask"].bool(), batch["completion_ids"], torch.full_like(batch["completion_ids"], -100))
    exact = GKDTrainer.generalized_jsd_loss(s_logits, t_logits, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=num_items)
    assert rel_err(loss, exact) < 1e-10, (float(loss), float(exact))
