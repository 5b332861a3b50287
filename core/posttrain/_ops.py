"""Numerics shared by every method: gathered log-probs, entropies and padding.

All functions are memory-conscious: they never materialize a full ``(B, T, V)`` log-softmax for
float32/float64 inputs, processing rows in chunks instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["selective_log_softmax", "entropy_from_logits", "pad"]

#: Rows of the flattened ``(N, V)`` logits processed at once (bounds peak extra memory to
#: ``_ROW_CHUNK * V`` elements).
_ROW_CHUNK = 1024
_ENTROPY_CHUNK_ELEMENTS = 1 << 22  # rows x vocab of one entropy chunk (16 MiB in float32)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Return ``log_softmax(logits / temperature)`` gathered at ``index``, without materializing the full log-softmax.

    Equivalent to ``torch.log_softmax(logits / temperature, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)``.
    For float32/float64 it uses ``logit[index] - logsumexp(logits)`` row-chunked to bound memory; for
    bf16/fp16 (where that subtraction loses precision) it falls back to a per-row log-softmax loop.

    Args:
        logits: ``(..., V)`` unnormalized scores, e.g. ``(B, T, V)``.
        index: ``(...)`` token ids to gather (e.g. ``(B, T)``), or ``(..., K)`` to gather ``K`` per row.
        temperature: Divide the logits by this before normalizing (must be > 0).

    Returns:
        Log-probabilities with the shape of ``index`` (``(B, T)`` for ``(B, T)`` ids), in ``logits.dtype``.

    Raises:
        ValueError: ``temperature`` is not positive, or the leading shapes of ``logits`` and ``index`` differ.
    """
    if not temperature > 0:
        raise ValueError(f"selective_log_softmax: temperature must be > 0, got {temperature}.")
    squeeze = index.dim() == logits.dim() - 1
    if squeeze:
        index = index.unsqueeze(-1)  # (..., 1)
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"selective_log_softmax: logits {tuple(logits.shape)} and index {tuple(index.shape)} must share leading "
            "dimensions; pass index of shape logits.shape[:-1] (or logits.shape[:-1] + (K,))."
        )
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (N, V)
    flat_index = index.reshape(flat_logits.shape[0], -1).long()  # (N, K)

    if logits.dtype in (torch.float32, torch.float64):
        outs = []
        for rows, idx in zip(flat_logits.split(_ROW_CHUNK, dim=0), flat_index.split(_ROW_CHUNK, dim=0)):
            selected = rows.gather(-1, idx)  # (n, K)
            outs.append(selected - torch.logsumexp(rows, dim=-1, keepdim=True))  # (n, K)
        out = torch.cat(outs, dim=0) if outs else flat_logits.new_zeros(flat_index.shape)
    else:  # low precision: logsumexp - logit cancels badly, normalize row by row instead
        outs = []
        for rows, idx in zip(flat_logits.split(_ROW_CHUNK, dim=0), flat_index.split(_ROW_CHUNK, dim=0)):
            outs.append(F.log_softmax(rows, dim=-1).gather(-1, idx))  # (n, K)
        out = torch.cat(outs, dim=0) if outs else flat_logits.new_zeros(flat_index.shape)
    out = out.reshape(index.shape)
    return out.squeeze(-1) if squeeze else out


def entropy_from_logits(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Return the Shannon entropy (nats) of ``softmax(logits)`` at every position, processing rows in chunks.

    Args:
        logits: ``(..., V)`` unnormalized scores, e.g. ``(B, T, V)``.
        chunk_size: Rows of the flattened ``(N, V)`` logits processed at once (smaller: less memory).
            None: as many rows as fit ~4M elements, at least 128 (128 rows for a 150k vocabulary; a
            small vocabulary is done in one pass, without a per-chunk op overhead).

    Returns:
        ``(...)`` entropies, e.g. ``(B, T)``, in ``logits.dtype``.

    Raises:
        ValueError: ``chunk_size`` is not a positive integer.
    """
    if chunk_size is None:
        chunk_size = max(128, _ENTROPY_CHUNK_ELEMENTS // max(1, logits.shape[-1]))
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"entropy_from_logits: chunk_size must be a positive integer, got {chunk_size!r}.")
    lead_shape = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
    outs = []
    for rows in flat.split(chunk_size, dim=0):
        logp = F.log_softmax(rows.float() if rows.dtype in (torch.float16, torch.bfloat16) else rows, dim=-1)
        # where p == 0 (logit -inf), p*logp is 0*-inf = nan: clamping logp to the finite range makes it 0*finite = 0
        plogp = logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)
        outs.append((-plogp.sum(-1)).to(logits.dtype))  # (n,)
    out = torch.cat(outs) if outs else flat.new_zeros(flat.shape[0])
    return out.reshape(lead_shape)


def pad(tensors: Sequence[torch.Tensor], padding_value: float = 0, padding_side: str = "right") -> torch.Tensor:
    """Stack tensors of different shapes into one, padding every dimension to the largest size.

    Args:
        tensors: Non-empty list of tensors with the same number of dimensions, dtype and device,
            e.g. ``[(T_0,), (T_1,), ...]``.
        padding_value: Value written in the padded positions.
        padding_side: ``"right"`` (pad after the data) or ``"left"`` (pad before it).

    Returns:
        ``(len(tensors), *max_shape)`` tensor, e.g. ``(B, max_T)``.

    Raises:
        ValueError: Empty list, mismatched numbers of dimensions, or an unknown ``padding_side``.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"pad: padding_side must be 'left' or 'right', got {padding_side!r}.")
    if len(tensors) == 0:
        raise ValueError("pad: got an empty list of tensors; pass at least one tensor.")
    ndims = {t.dim() for t in tensors}
    if len(ndims) != 1:
        raise ValueError(f"pad: all tensors must have the same number of dimensions, got {sorted(ndims)}.")
    max_shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    first = tensors[0]
    out = torch.full((len(tensors), *max_shape), padding_value, dtype=first.dtype, device=first.device)
    for i, t in enumerate(tensors):
        if padding_side == "left":
            slices = tuple(slice(m - s, m) for m, s in zip(max_shape, t.shape))
        else:
            slices = tuple(slice(0, s) for s in t.shape)
        out[(i, *slices)] = t
    return out
