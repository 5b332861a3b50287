"""A served teacher's loss: generalized JSD on the support of the teacher's top-k log-probs (heavy: imports torch).

With ``teacher_model_server_url`` the teacher never sits in training memory: a teacher server
(``posttrain.TeacherServer`` or vLLM's OpenAI-compatible server) returns, per completion position, the
teacher's top ``loss_top_k`` log-probs and the sampled token's. The loss is TRL 1.16 server distillation's
(the ``server_distill`` method's, whose functions below are copied line for line and checked by
tests/test_copied_blocks.py): ``beta == 0`` forward KL on the teacher's top-k; ``beta > 0`` the top-1
support (the teacher's top-1 and the sampled token); ``loss_add_tail`` adds the mass outside the support
as one more entry, else both distributions are renormalized over it. When ``loss_top_k`` covers the whole
vocabulary and ``beta == 0`` it is the full-vocabulary forward KL of a local teacher.

    support_ids, support_mask, teacher_lp = served_support(teacher, completion_ids, completion_mask, beta=..., loss_top_k=...)
    student_lp, entropy = support_logprobs(states, support_ids, temperature=..., return_entropy=True)
    per_token = served_topk_divergence(student_lp, teacher_lp, support_mask, beta=..., add_tail=...)   # (B, T)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TEACHER_KEYS", "add_tail_bucket", "served_support", "served_topk_divergence", "sparse_generalized_jsd", "slice_teacher",
           "support_logprobs"]

#: micro-batch keys of the served answer -> ``TeacherServerClient.sequence_logprobs`` keys (top-level tensors: the loop moves them to the device)
TEACHER_KEYS = {"teacher_logprobs": "logprobs", "teacher_logprob_token_ids": "logprob_token_ids", "teacher_actual_logprobs": "actual_logprobs"}


def slice_teacher(teacher: dict, rows: slice, width: int) -> dict:
    """The step's served answer (``(N, T, .)``) cut to a micro-batch's rows and padded/cut to its completion width, under :data:`TEACHER_KEYS`.

    Positions past the served ``T`` get -inf log-probs and token id 0 (the client's padding); ``teacher_actual_logprobs`` is ``(b, width)``.
    """
    out = {}
    for key, source in TEACHER_KEYS.items():
        value = teacher[source][rows]
        if source == "actual_logprobs":
            value = value[..., 0]
        value = value[:, :width]
        if value.shape[1] < width:
            fill = 0 if source == "logprob_token_ids" else float("-inf")
            value = torch.cat([value, value.new_full((value.shape[0], width - value.shape[1], *value.shape[2:]), fill)], dim=1)
        out[key] = value
    return out


# Copied from posttrain_server_distill.loss.add_tail_bucket
def add_tail_bucket(log_probs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the tail entry ``log(1 - sum_s exp(log_probs_s))`` (always on the support) to ``(..., S)`` log-probs and their mask.

    The sum is clamped just below 1 (``log_sum <= -1e-7``) so the tail stays finite.
    """
    log_sum = torch.logsumexp(log_probs, dim=-1, keepdim=True).clamp(max=-1e-7)
    tail = torch.log(-torch.expm1(log_sum))  # log(1 - exp(log_sum))
    return torch.cat([log_probs, tail], dim=-1), torch.cat([mask, torch.ones_like(mask[..., :1])], dim=-1)


# Copied from posttrain_server_distill.loss.sparse_generalized_jsd
def sparse_generalized_jsd(student_lp: torch.Tensor, teacher_lp: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise generalized JSD terms on a masked support (0 off the support); sum them over the last dim.

    ``beta * p_T (log p_T - log m) + (1 - beta) * p_S (log p_S - log m)`` with ``m = (1 - beta) p_S + beta p_T``;
    ``beta = 0``: ``p_T (log p_T - log p_S)`` (forward KL), ``beta = 1``: ``p_S (log p_S - log p_T)`` (reverse KL).
    """
    zero = torch.zeros_like(student_lp)
    s_lp, t_lp = torch.where(mask, student_lp, zero), torch.where(mask, teacher_lp, zero)
    s_p, t_p = torch.where(mask, student_lp.exp(), zero), torch.where(mask, teacher_lp.exp(), zero)
    if beta == 0:
        return torch.nan_to_num(t_p * (t_lp - s_lp), nan=0.0)
    if beta == 1:
        return torch.nan_to_num(s_p * (s_lp - t_lp), nan=0.0)
    b = torch.tensor(beta, dtype=student_lp.dtype, device=student_lp.device)
    m_lp = torch.where(mask, torch.log(((1 - b) * s_p + b * t_p).clamp_min(torch.finfo(s_p.dtype).tiny)), zero)
    return b * torch.nan_to_num(t_p * (t_lp - m_lp), nan=0.0) + (1 - b) * torch.nan_to_num(s_p * (s_lp - m_lp), nan=0.0)


# Copied from posttrain_server_distill.loss.served_support
def served_support(teacher: dict, completion_ids: torch.Tensor, completion_mask: torch.Tensor, *, beta: float,
                   loss_top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(support_ids (B, T, S) long, support_mask (B, T, S) bool, teacher_lp (B, T, S))`` of the served loss.

    Args:
        teacher: The teacher's answer aligned with the completions (``TeacherServerClient.sequence_logprobs``
            laid out ``(B, T, ...)``): ``logprobs`` ``(B, T, K)`` top-k log-probs (sorted, -inf padded),
            ``logprob_token_ids`` ``(B, T, K)``, ``actual_logprobs`` ``(B, T)`` or ``(B, T, 1)`` (the sampled token's).
        completion_ids: ``(B, T)`` sampled tokens.
        completion_mask: ``(B, T)`` 1 on completion tokens, 0 on padding.
        beta: 0 forward KL on the top ``loss_top_k``; > 0 top-1 support (``loss_top_k`` must be 1).
        loss_top_k: Teacher tokens on the forward-KL support.

    Raises:
        ValueError: ``beta > 0`` with ``loss_top_k != 1``, ``loss_top_k < 1``, or a teacher log-prob
            missing (not finite) at a completion token where the support needs it.
    """
    if loss_top_k < 1 or (beta > 0 and loss_top_k != 1):
        raise ValueError(f"served_support: loss_top_k must be >= 1, and 1 when beta > 0 (got loss_top_k={loss_top_k}, beta={beta}).")
    top_lp, top_ids = teacher["logprobs"][..., :loss_top_k], teacher["logprob_token_ids"][..., :loss_top_k].long()
    required = completion_mask.bool()
    if beta == 0:
        mask = top_lp > float("-inf")
        return torch.where(mask, top_ids, torch.zeros_like(top_ids)), mask, top_lp
    actual = teacher["actual_logprobs"]
    actual = actual.squeeze(-1) if actual.dim() == 3 else actual
    missing = required & ~torch.isfinite(actual)
    if beta < 1:
        missing = missing | (required & ~torch.isfinite(top_lp[..., 0]))
    if bool(missing.any()):
        raise ValueError(f"served_support: the teacher has no finite log-prob for {int(missing.sum())}/{int(required.sum())} completion "
                         "tokens (the sampled token or its top-1).")
    actual = torch.where(required, actual, torch.zeros_like(actual))  # padding: 0, not -inf (no inf in the backward)
    sampled = completion_ids.long().unsqueeze(-1)  # (B, T, 1)
    if beta == 1:
        return sampled, torch.ones_like(sampled, dtype=torch.bool), actual.unsqueeze(-1)
    top1_lp = torch.where(required, top_lp[..., 0], torch.zeros_like(actual))
    ids = torch.cat([top_ids[..., :1], sampled], dim=-1)  # (B, T, 2): teacher's top-1, then the sampled token
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[..., 1] = ids[..., 1] != ids[..., 0]  # the sampled token once when it is the teacher's top-1
    return torch.where(mask, ids, torch.zeros_like(ids)), mask, torch.stack([top1_lp, actual], dim=-1)


# Copied from posttrain_server_distill.loss.support_logprobs
def support_logprobs(states, support_ids: torch.Tensor, *, temperature: float = 1.0,
                     return_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(log-probs (B, T, S) of support_ids, detached entropies (B, T) or None)`` from ``posttrain.TokenStates`` ``(B, T, .)``.

    One chunk of logits at a time (the entropies come from the same pass, when asked).

    ``log p(s) = z_s - lse = log p(s_0) + (z_s - z_{s_0})`` with ``z = (h W^T + b) / temperature``: one chunked
    log-prob (:meth:`TokenStates.score`) for the first support column gives the log-normalizer; the other columns'
    logits come from their gathered LM-head rows (``(B, T, S, H)``), so no ``(B, T, V)`` logits are formed.
    States holding logits (a model the chunking cannot reproduce) are gathered from their log-softmax.
    """
    if states.weight is None:  # the model's own logits
        z = states.tensor if states.tensor.dtype == torch.float64 else states.tensor.float()
        logps = F.log_softmax(z / temperature, dim=-1)
        entropy = -(logps.exp() * logps).sum(-1).detach() if return_entropy else None
        return logps.gather(-1, support_ids), entropy
    scores = states.score(support_ids[..., 0], temperature=temperature, return_entropy=return_entropy, entropy_grad=False)
    first, entropy = scores.logps, scores.entropy  # (B, T), (B, T) or None
    if support_ids.shape[-1] == 1:
        return first.unsqueeze(-1), entropy
    dtype = states.compute_dtype or states.weight.dtype
    hidden = states.tensor.to(dtype)
    rows = states.weight.to(dtype)[support_ids]  # (B, T, S, H)
    z = torch.einsum("bth,btsh->bts", hidden, rows)
    if states.bias is not None:
        z = z + states.bias.to(dtype)[support_ids]
    z = z if z.dtype == torch.float64 else z.float()
    z = z / temperature
    return first.unsqueeze(-1) + (z - z[..., :1]), entropy


# Copied from posttrain_server_distill.loss.served_topk_divergence
def served_topk_divergence(student_lp: torch.Tensor, teacher_lp: torch.Tensor, support_mask: torch.Tensor, *, beta: float,
                           add_tail: bool = True) -> torch.Tensor:
    """Per-token divergence ``(B, T)`` on the served support (TRL 1.16 server distillation's loss before reduction).

    Args:
        student_lp: ``(B, T, S)`` student log-probs of the support tokens (full-vocabulary normalized).
        teacher_lp: ``(B, T, S)`` teacher log-probs of the same tokens.
        support_mask: ``(B, T, S)`` which support entries exist.
        beta: Generalized JSD interpolation (0 forward KL, 1 reverse KL).
        add_tail: Add the tail entry (rest of the mass) instead of renormalizing over the support.

    Returns:
        The divergence summed over the support at every position; mask padding and reduce as the method does
        (TRL: sum over completion tokens / their number).
    """
    neg_inf = torch.full((), float("-inf"), dtype=student_lp.dtype, device=student_lp.device)
    s = torch.where(support_mask, student_lp, neg_inf)
    t = torch.where(support_mask, teacher_lp.to(student_lp.dtype), neg_inf)
    if add_tail:
        s, mask = add_tail_bucket(s, support_mask)
        t, _ = add_tail_bucket(t, support_mask)
    else:
        mask = support_mask
        s = s - torch.logsumexp(s, dim=-1, keepdim=True)
        t = t - torch.logsumexp(t, dim=-1, keepdim=True)
    return sparse_generalized_jsd(s, t, mask, beta).sum(-1)
