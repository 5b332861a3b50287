"""Tests for posttrain._ops against naive torch references."""

import pytest
import torch

from posttrain._ops import entropy_from_logits, pad, selective_log_softmax


def _naive_logps(logits, index):
    return torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selective_log_softmax_matches_naive(dtype, monkeypatch):
    import posttrain._ops as ops

    monkeypatch.setattr(ops, "_ROW_CHUNK", 5)  # force several chunks
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=g, dtype=dtype) * 4  # (B, T, V)
    index = torch.randint(0, 50, (3, 7), generator=g)  # (B, T)
    out = selective_log_softmax(logits, index)
    assert out.shape == (3, 7) and out.dtype == dtype
    torch.testing.assert_close(out, _naive_logps(logits, index), atol=1e-6, rtol=1e-6)


def test_selective_log_softmax_topk_index_and_temperature():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 30, generator=g)
    index = torch.randint(0, 30, (2, 4, 3), generator=g)  # (B, T, K)
    out = selective_log_softmax(logits, index, temperature=0.7)
    ref = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, index)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
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
    torch.testing.assert_close(out.float(), _naive_logps(logits.bfloat16().float(), index), atol=2e-2, rtol=0)
    # gradients agree with the naive implementation
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    selective_log_softmax(a, index).sum().backward()
    _naive_logps(b, index).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_entropy_from_logits_matches_naive():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 25, generator=g)
    logits[0, 0, :10] = float("-inf")  # masked vocabulary entries (top-k style)
    ref_p = torch.softmax(logits, -1)
    ref = -(ref_p * torch.log_softmax(logits, -1)).nan_to_num(0.0).sum(-1)
    out = entropy_from_logits(logits, chunk_size=4)
    assert out.shape == (3, 6)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
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
