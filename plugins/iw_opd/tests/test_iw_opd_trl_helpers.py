"""Parity of ``IWOPDTrainer.generalized_jsd_loss`` (TRL's static helper on full logits) with TRL 1.16's, in float64.

Every branch: forward / reverse KL and JSD, the full vocabulary and top-k supports (teacher's, student's, their union
with duplicates) with and without the tail bucket, temperature, label masking and every reduction, num_items_in_batch.
Loss and the gradient w.r.t. the student logits are compared at the project's bounds (float64 measures ~1e-15).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import posttrain

pytest.importorskip("trl")

LOSS_REL, GRAD_REL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("iw_opd", allow_experimental=True)
    yield


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 2
    teacher = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64) * 2
    teacher[0, 0] = student[0, 0]  # a position where the two top-k sets coincide (the union keeps each token once)
    labels = torch.randint(0, 7, (3, 4), generator=gen)
    labels[0, :2] = -100
    labels[2, 1:] = -100
    return student, teacher, labels


@pytest.mark.parametrize("beta, top_k, add_tail", list(itertools.product([0.0, 0.3, 0.5, 1.0], [0, 1, 3, 7], [True, False])))
def test_generalized_jsd_loss_matches_trl(beta, top_k, add_tail):
    from trl.experimental.iw_opd import IWOPDTrainer as TRLTrainer

    from posttrain_iw_opd import IWOPDTrainer

    student, teacher, labels = _inputs(seed=int(beta * 10) + top_k)
    cases = [dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(11)), dict(reduction="sum"), dict(labels=None)]
    for kwargs in cases:
        outs = []
        for impl in (IWOPDTrainer, TRLTrainer):
            s = student.clone().requires_grad_(True)
            loss = impl.generalized_jsd_loss(s, teacher, beta=beta, temperature=0.7, top_k=top_k, add_tail=add_tail, **kwargs)
            loss.backward()
            outs.append((loss.detach(), s.grad))
        (ours, our_grad), (ref, ref_grad) = outs
        assert ours.shape == ref.shape == torch.Size([])
        assert torch.isfinite(ours) and _rel(ours, ref) < LOSS_REL, (kwargs, ours.item(), ref.item())
        assert _rel(our_grad, ref_grad) < GRAD_REL, kwargs
    for reduction in ("mean", "none"):  # per-entry terms
        ours = IWOPDTrainer.generalized_jsd_loss(student, teacher, beta=beta, top_k=top_k, add_tail=add_tail, reduction=reduction)
        ref = TRLTrainer.generalized_jsd_loss(student, teacher, beta=beta, top_k=top_k, add_tail=add_tail, reduction=reduction)
        assert ours.shape == ref.shape
        assert _rel(ours, ref) < LOSS_REL


def test_generalized_jsd_loss_known_values():
    """Hand-computed: identical inputs give 0; beta=0 is KL(teacher || student), beta=1 KL(student || teacher), per kept position."""
    from posttrain_iw_opd import IWOPDTrainer

    p, q = torch.tensor([0.1, 0.9], dtype=torch.float64), torch.tensor([0.9, 0.1], dtype=torch.float64)
    s, t = p.log().view(1, 1, 2), q.log().view(1, 1, 2)
    kl_tq = (q * (q / p).log()).sum()  # KL(teacher || student) = 0.8 * log 9
    assert IWOPDTrainer.generalized_jsd_loss(s, t, beta=0.0).item() == pytest.approx(kl_tq.item(), rel=1e-12)
    assert IWOPDTrainer.generalized_jsd_loss(s, t, beta=1.0).item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-12)
    assert IWOPDTrainer.generalized_jsd_loss(s, s, beta=0.5).abs().item() < 1e-15
    labels = torch.tensor([[-100]])
    assert IWOPDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.0).item() == 0.0  # no kept position: 0, not nan
