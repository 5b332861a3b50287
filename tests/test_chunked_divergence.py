"""The additive keywords of ``posttrain.chunked_distillation_divergence``: per-side logit scale / soft-cap and entropy outputs.

Checked in float64 against the dense computation (``log_softmax`` of the full logits, autograd), so the comparisons hold
on any machine; and the old call (no new keyword) is unchanged: asking for entropies or passing the neutral scale/soft-cap
leaves the divergence bit-identical.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain import chunked_distillation_divergence

V, HS, HT, N = 37, 6, 9, 11


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, HS, generator=g, dtype=torch.float64).requires_grad_()
    ws = (torch.randn(V, HS, generator=g, dtype=torch.float64)).requires_grad_()
    bs = (torch.randn(V, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    ht = torch.randn(N, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(V, HT, generator=g, dtype=torch.float64)
    return hs, ws, bs, ht, wt


def _post(z, scale, cap, temperature):
    z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return torch.log_softmax(z / temperature, -1)


def _dense(hs, ws, bs, ht, wt, beta, temperature, s_post=(1.0, None), t_post=(1.0, None)):
    s = _post(hs @ ws.T + bs, *s_post, temperature)
    t = _post(ht @ wt.T, *t_post, temperature)
    if beta == 0.0:
        div = (t.exp() * (t - s)).sum(-1)
    elif beta == 1.0:
        div = (s.exp() * (s - t)).sum(-1)
    else:
        m = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
        div = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    return div, -(s.exp() * s).sum(-1), -(t.exp() * t).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_scale_and_softcap_per_side_equal_the_dense_computation(beta):
    hs, ws, bs, ht, wt = _inputs()
    kwargs = dict(student_logit_scale=0.6, teacher_logit_scale=1.8, student_final_logit_softcapping=2.5, teacher_final_logit_softcapping=4.0)
    div, s_ent, t_ent = chunked_distillation_divergence(hs, ws, ht, wt, student_bias=bs, beta=beta, temperature=0.8, chunk_size=4,
                                                        return_entropy=True, return_teacher_entropy=True, **kwargs)
    ref, ref_s, ref_t = _dense(hs, ws, bs, ht, wt, beta, 0.8, (0.6, 2.5), (1.8, 4.0))
    torch.testing.assert_close(div, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_ent, ref_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_ent, ref_t, rtol=1e-10, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, N, dtype=torch.float64)
    for mine, theirs in zip(torch.autograd.grad((div * weights).sum(), (hs, ws, bs)), torch.autograd.grad((ref * weights).sum(), (hs, ws, bs))):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
    assert not s_ent.requires_grad and not t_ent.requires_grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_entropies_equal_the_dense_ones_and_leave_the_divergence_bit_identical(beta):
    hs, ws, bs, ht, wt = _inputs(1)
    plain = chunked_distillation_divergence(hs, ws, ht, wt, student_bias=bs, beta=beta, temperature=1.3, chunk_size=5)
    div, s_ent = chunked_distillation_divergence(hs, ws, ht, wt, student_bias=bs, beta=beta, temperature=1.3, chunk_size=5, return_entropy=True)
    div_t, t_ent = chunked_distillation_divergence(hs, ws, ht, wt, student_bias=bs, beta=beta, temperature=1.3, chunk_size=5, return_teacher_entropy=True)
    neutral = chunked_distillation_divergence(hs, ws, ht, wt, student_bias=bs, beta=beta, temperature=1.3, chunk_size=5,
                                              student_logit_scale=1.0, teacher_logit_scale=1.0)
    assert torch.equal(plain, div) and torch.equal(plain, div_t) and torch.equal(plain, neutral)
    _, ref_s, ref_t = _dense(hs, ws, bs, ht, wt, beta, 1.3)
    torch.testing.assert_close(s_ent, ref_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t_ent, ref_t, rtol=1e-10, atol=1e-12)
    g_plain = torch.autograd.grad(plain.sum(), (hs, ws, bs))
    g_div = torch.autograd.grad(div.sum(), (hs, ws, bs))
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_div))


def test_a_softcapped_head_is_chunk_size_invariant_in_float32():
    hs, ws, bs, ht, wt = (t.detach().float() for t in _inputs(2))
    a = chunked_distillation_divergence(hs, ws, ht, wt, beta=0.5, chunk_size=2, student_final_logit_softcapping=3.0)
    b = chunked_distillation_divergence(hs, ws, ht, wt, beta=0.5, chunk_size=64, student_final_logit_softcapping=3.0)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_non_positive_softcap_is_refused():
    hs, ws, _, ht, wt = _inputs()
    with pytest.raises(ValueError, match="teacher_final_logit_softcapping must be None or > 0"):
        chunked_distillation_divergence(hs, ws, ht, wt, teacher_final_logit_softcapping=0.0)
