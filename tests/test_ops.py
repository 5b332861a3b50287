"""Tests for posttrain._ops against naive torch references."""

import math

import pytest
import torch

from posttrain._ops import entropy_from_logits, pad, selective_log_softmax


def _naive_logps(logits, index):
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _tol(logits):
    """Absolute bound on how far two implementations of log-softmax (or entropy) of ``logits`` may round apart.

    Both reduce V terms (the gamma_V bound: V * eps of the terms, which are <= 1 after the max is subtracted) and add or
    subtract values of magnitude <= max|logit| + log V a few times (4 * eps of that): float32 ~1e-5, float64 ~2e-14
    here, whatever the CPU's kernels, summation order or thread count.
    """
    finite = logits[torch.isfinite(logits)]
    vocab = logits.shape[-1]
    eps = torch.finfo(logits.dtype).eps
    return (vocab + 4 * (float(finite.abs().max()) + math.log(vocab))) * eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_selective_log_softmax_matches_naive(dtype, monkeypatch):
    import posttrain._ops as ops

    monkeypatch.setattr(ops, "_ROW_CHUNK", 5)  # force several chunks
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=dtype) * 4  # (B, T, V)
    index = torch.randint(0, 50, (3, 7), generator=g)  # (B, T)
    out = selective_log_softmax(logits, index)
    assert out.shape == (3, 7) and out.dtype == dtype
    torch.testing.assert_close(out, _naive_logps(logits, index), atol=_tol(logits), rtol=0)


def test_selective_log_softmax_topk_index_and_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 30, generator=g)
    index = torch.randint(0, 30, (2, 4, 3), generator=g)  # (B, T, K)
    out = selective_log_softmax(logits, index, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, index)
    torch.testing.assert_close(out, ref, atol=_tol(logits / 0.7), rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        selective_log_softmax(logits, index, temperature=0)
    with pytest.raises(ValueError, match="leading"):
        selective_log_softmax(logits, index[:1, :, 0])


def test_selective_log_softmax_bf16_and_grad():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 40, generator=g)
    index = torch.randint(0, 40, (2, 5), generator=g)
    out = selective_log_softmax(logits.bfloat16(), index)
    assert out.dtype == torch.bfloat16
    # the result is rounded to bf16 (half an ulp, 2**-8 of its magnitude) from a float32-accumulated log-softmax; one bf16
    # eps (2**-7) relative covers that with room for a bf16 intermediate, plus the float32 bound of the reference
    ref = _naive_logps(logits.bfloat16().float(), index)
    torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(torch.bfloat16).eps, atol=_tol(logits))
    # gradients agree with the naive implementation (float64: the two backward formulas differ only by rounding)
    a = logits.double().requires_grad_(True)
    b = logits.double().requires_grad_(True)
    selective_log_softmax(a, index).sum().backward()
    _naive_logps(b, index).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=_tol(a.detach()), rtol=0)


def test_entropy_from_logits_matches_naive():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 25, generator=g)
    logits[0, 0, :10] = float("-inf")  # masked vocabulary entries (top-k style)
    ref_p = torch.softmax(logits, -1)
    ref = -(ref_p * torch.log_softmax(logits, -1)).nan_to_num(0.0).sum(-1)
    out = entropy_from_logits(logits, chunk_size=4)
    assert out.shape == (3, 6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=_tol(logits), rtol=0)
    out64, logits64 = entropy_from_logits(logits.double(), chunk_size=4), logits.double()
    ref64 = -(torch.softmax(logits64, -1) * torch.log_softmax(logits64, -1)).nan_to_num(0.0).sum(-1)
    torch.testing.assert_close(out64, ref64, atol=_tol(logits64), rtol=0)
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)


def test_pad_left_right_and_errors():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([4])
    torch.testing.assert_close(pad([a, b]), torch.tensor([[1, 2, 3], [4, 0, 0]]))
    torch.testing.assert_close(pad([a, b], padding_value=-1, padding_side="left"), torch.tensor([[1, 2, 3], [-1, -1, 4]]))
    two_d = pad([torch.ones(2, 3), torch.ones(1, 1)])
    assert two_d.shape == (2, 2, 3) and two_d.sum() == 7
    with pytest.raises(ValueError, match="padding_side"):
        pad([a], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        pad([])
