"""Parity with TRL 1.16's ``trl.experimental.sdft``: same student, teacher, teacher context and fixed completions give the
same loss and gradients, for every ``distillation_mode`` and its options.

The reference is TRL's own code path on the same batch: ``SDFTTrainer._compute_teacher_student_logits`` then
``_compute_self_distillation_loss`` (the loss before TRL divides it by the accumulation steps). Ours is
``SDFTTrainer.compute_loss`` with ``num_items_in_batch`` = the batch's sequences (one micro-batch = the step).
Both models are float64 on the CPU, so rounding is ~1e-16 and the comparison holds on any machine; ours scores
the LM head chunk by chunk (3 rows, so every batch spans several chunks) or from the full logits
(``logprob_chunk_size=0``). Tolerances: loss relative 1e-5, gradients per tensor relative 1e-4 (difference norm /
norm); measured differences are printed (-s).
"""

from __future__ import annotations

import copy

import pytest
import torch

import posttrain

trl = pytest.importorskip("trl")
from trl.experimental.sdft import SDFTConfig as TRLSDFTConfig  # noqa: E402
from trl.experimental.sdft import SDFTTrainer as TRLSDFTTrainer  # noqa: E402
from trl.experimental.sdft import loss_utils as trl_loss_utils  # noqa: E402

B, P, PT, C = 5, 5, 9, 6


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("sdft", allow_experimental=True)


@pytest.fixture(scope="module")
def models():
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    student = build_model(tok, hidden_size=32, num_layers=2).double()
    teacher = build_model(tok, hidden_size=32, num_layers=2, seed=7).double()  # a teacher that differs from the student
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.zeros(B, w, dtype=torch.long) for k, w in (("prompt_ids", P), ("prompt_mask", P), ("teacher_prompt_ids", PT),
                                                                   ("teacher_prompt_mask", PT), ("completion_ids", C), ("completion_mask", C))}
    for i, (p, pt, c) in enumerate(zip([3, 5, 2, 4, 5], [7, 9, 6, 8, 9], [6, 3, 1, 5, 4])):
        batch["prompt_ids"][i, P - p:] = torch.randint(3, 500, (p,), generator=gen)
        batch["prompt_mask"][i, P - p:] = 1
        batch["teacher_prompt_ids"][i, PT - pt:] = torch.randint(3, 500, (pt,), generator=gen)
        batch["teacher_prompt_mask"][i, PT - pt:] = 1
        batch["completion_ids"][i, :c] = torch.randint(3, 500, (c,), generator=gen)
        batch["completion_mask"][i, :c] = 1
    with torch.no_grad():  # pi_old: the current log-probs moved by noise, so the clipped ratio is both below and above its cap
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        logits = student(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits[:, P - 1 : -1]
        current = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    batch["old_per_token_logps"] = (current + torch.randn(current.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)) * batch["completion_mask"]
    return tok, student, teacher, batch


CASES = [  # (distillation_mode, alpha, topk, add_tail, is_clip, skip, temperature)
    ("topk_logits", 0.5, 20, False, 2.0, 0, 1.0),
    ("topk_logits", 0.5, 20, True, None, 0, 1.0),
    ("topk_logits", 0.0, 7, False, None, 2, 0.7),
    ("topk_logits", 1.0, 50, True, 2.0, 1, 1.0),
    ("full_logits", 0.5, 100, False, 2.0, 0, 1.0),
    ("full_logits", 0.0, 100, False, None, 0, 1.3),
    ("full_logits", 1.0, 100, False, 1.5, 0, 1.0),
    ("sampled_token", 1.0, 100, False, 2.0, 0, 1.0),
    ("sampled_token", 1.0, 100, False, None, 2, 0.8),
]


def _rel_grad_errors(a: dict, b: dict) -> float:
    worst = 0.0
    for name, g in a.items():
        assert g is not None and b[name] is not None, name
        worst = max(worst, float((g - b[name]).norm() / g.norm().clamp(min=1e-30)))
    return worst


@pytest.mark.parametrize("chunk_size", [3, 0])
@pytest.mark.parametrize(("mode", "alpha", "topk", "add_tail", "is_clip", "skip", "temperature"), CASES)
def test_loss_and_gradients_equal_trl(models, tmp_path, chunk_size, mode, alpha, topk, add_tail, is_clip, skip, temperature):
    from posttrain_sdft.config import SDFTConfig
    from posttrain_sdft.trainer import SDFTTrainer

    tok, student, teacher, batch = models
    options = dict(distillation_mode=mode, distillation_alpha=alpha, distillation_topk=topk, distillation_add_tail=add_tail,
                   distillation_is_clip=is_clip, num_loss_tokens_to_skip=skip, temperature=temperature, per_device_train_batch_size=B,
                   num_generations=1, gradient_checkpointing=False, report_to="none")
    rows = [{"prompt": "what is 1 + 2", "privileged_context": "3"}] * 4
    trl_model = copy.deepcopy(student)
    trl_trainer = TRLSDFTTrainer(model=trl_model, args=TRLSDFTConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True,
                                                                     teacher_model_kind="live", **options),
                                 train_dataset=__import__("datasets").Dataset.from_list(rows), processing_class=tok)
    trl_trainer.teacher_model = teacher  # the same separate teacher on both sides
    trl_inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps")}
    trl_inputs["teacher_input_ids"] = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], 1)
    trl_inputs["teacher_attention_mask"] = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], 1)
    logits = trl_trainer._compute_teacher_student_logits(trl_model, teacher, trl_inputs)
    trl_loss = trl_trainer._compute_self_distillation_loss(trl_model, trl_inputs, logits)
    trl_loss.backward()

    our_model = copy.deepcopy(student)
    ours = SDFTTrainer(model=our_model, args=SDFTConfig(output_dir=str(tmp_path / "ours"), save_strategy="no", logprob_chunk_size=chunk_size, **options),
                       train_dataset=rows, processing_class=tok)
    ours.teacher_model = teacher
    loss, metrics = ours.compute_loss(our_model, dict(batch), B)
    loss.backward()

    assert loss.dtype == torch.float64
    rel_loss = abs(float(loss) - float(trl_loss)) / abs(float(trl_loss))
    rel_grad = _rel_grad_errors({n: p.grad for n, p in trl_model.named_parameters()}, {n: p.grad for n, p in our_model.named_parameters()})
    print(f"{mode} alpha={alpha} k={topk} tail={add_tail} clip={is_clip} skip={skip} T={temperature} chunk={chunk_size}: "
          f"loss {float(loss):.6g} rel err {rel_loss:.1e}, worst grad rel err {rel_grad:.1e}")
    assert rel_loss <= 1e-5
    assert rel_grad <= 1e-4
    trl_metric = trl_trainer._metrics["train"]["sdft/distillation_loss"][-1]
    assert float(metrics["sdft/distillation_loss"]) == pytest.approx(trl_metric, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_pure_loss_functions_equal_trl(alpha):
    """The per-token functions on random logits (float64) against TRL's loss_utils, with their gradients."""
    from posttrain_sdft.trainer import add_tail_bucket, compute_divergence, self_distillation_per_token

    gen = torch.Generator().manual_seed(1)
    s = (torch.randn(11, 64, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(11, 64, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(0, 64, (11,), generator=gen)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    torch.testing.assert_close(compute_divergence(ls, lt, alpha), trl_loss_utils.compute_divergence(ls, lt, alpha), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(add_tail_bucket(ls[:, :5]), trl_loss_utils.add_tail_bucket(ls[:, :5]), rtol=1e-12, atol=1e-14)
    for tail in (False, True):
        ours, _ = self_distillation_per_token(s, t, labels, mode="topk_logits", alpha=alpha, topk=9, add_tail=tail)
        ref = trl_loss_utils.compute_topk_self_distillation_loss(s, t, distillation_topk=9, distillation_alpha=alpha, distillation_add_tail=tail)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-13)
        g_ours, = torch.autograd.grad(ours.sum(), s)
        g_ref, = torch.autograd.grad(ref.sum(), s)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-9, atol=1e-12)
    ours, _ = self_distillation_per_token(s, t, labels, mode="full_logits", alpha=alpha)
    torch.testing.assert_close(ours, trl_loss_utils.compute_full_logit_self_distillation_loss(s, t, distillation_alpha=alpha), rtol=1e-10, atol=1e-13)
    if alpha == 1.0:
        ours, _ = self_distillation_per_token(s, t, labels, mode="sampled_token", alpha=alpha)
        torch.testing.assert_close(ours, trl_loss_utils.compute_sampled_token_self_distillation_loss(s, t, labels, distillation_alpha=alpha))
