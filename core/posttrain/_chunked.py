"""Log-probs, entropies and divergences computed from hidden states and the LM head, a chunk of rows at a time.

With a real vocabulary (Qwen's 151,936 entries) the logits ``(B, T, V)`` -- their float32 copy,
their log-softmax and their gradient -- are the memory peak of post-training. The functions here
never hold more than ``chunk_size x V`` logits: the forward computes ``hidden @ lm_head`` and the
log-softmax chunk by chunk inside a :class:`torch.autograd.Function` that keeps only the hidden
states and one float per token, and the backward recomputes each chunk's logits to form its
gradient. Pure PyTorch: the same code runs on CPU and GPU.

Plugins use two names:

* :func:`causal_lm_states` runs a causal LM so that its LM head sees no rows (the model computes
  no logits) and returns the hidden states it would have projected, wrapped in a :class:`TokenStates`;
  for a model whose logits it cannot reproduce it returns the model's own logits instead.
* :meth:`TokenStates.score` (or :func:`chunked_token_logprobs` directly) turns them into
  per-token log-probs, entropies and detached statistics.

Every result equals the unchunked computation (``tests/test_chunked.py``, relative 1e-5 in float32).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Collection, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "TokenScores",
    "TokenStates",
    "causal_lm_states",
    "chunked_distillation_divergence",
    "chunked_nll_loss",
    "chunked_token_logprobs",
    "lm_head_of",
]

#: The statistics :func:`chunked_token_logprobs` can return (detached, per token).
TOKEN_STATS = ("argmax", "mean_logit", "log_sum_sq")

#: Config attributes of models whose logits are post-processed after the LM head (soft-capping,
#: scaling); such models are scored from their own logits, unchunked.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "output_multiplier_scale", "lm_head_multiplier")


class TokenScores(NamedTuple):
    """Per-token results of :func:`chunked_token_logprobs` (all float32 but ``argmax``).

    Attributes:
        logps: ``(...)`` log-probabilities of the labels (0 where the label is ``ignore_index``).
        entropy: ``(...)`` entropies (nats) of the predicted distributions, or None if not asked.
        stats: Detached statistics asked for by name: ``argmax`` (the top token id),
            ``mean_logit`` (the mean logit over the vocabulary), ``log_sum_sq`` (``log sum_v p_v^2``).
    """

    logps: torch.Tensor
    entropy: torch.Tensor | None
    stats: dict[str, torch.Tensor]


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Return the logits ``(hidden @ weight.T + bias) / temperature`` of one chunk ``(n, V)``, float32 (float64 stays float64)."""
    z = F.linear(hidden, weight, bias)
    z = z if z.dtype == torch.float64 else z.float()
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _consume_logits(z: torch.Tensor, safe: torch.Tensor, want_entropy: bool, keep_probs: bool):
    """From one chunk's logits ``z`` (n, V), overwritten in place: ``(lse, log p(label), entropy or None, probs or None)``.

    At most one other ``(n, V)`` tensor is allocated (the probabilities when the entropy is needed).
    With ``m`` the row max and ``e = exp(z - m)``, ``s = sum e``: ``lse = m + log s`` and
    ``H = log s - sum e (z - m) / s``.
    """
    label = z.gather(1, safe[:, None]).squeeze(1)  # (n,)
    m = z.amax(dim=-1)  # (n,)
    z.sub_(m[:, None])  # shifted logits
    if want_entropy:
        probs = z.exp()
        s = probs.sum(-1)
        shifted_dot = torch.bmm(probs.unsqueeze(1), z.unsqueeze(2)).view(-1)  # sum_v e_v (z_v - m), no (n, V) temporary
    else:
        probs = z.exp_()
        s = probs.sum(-1)
    log_s = s.log()
    lse = m + log_s
    entropy = log_s - shifted_dot / s if want_entropy else None
    if keep_probs:
        probs.div_(s[:, None])
    return lse, label - lse, entropy, probs if keep_probs else None


class _ChunkedLogprobs(torch.autograd.Function):
    """Per-token log-probs (and entropies) of ``labels`` under ``softmax(hidden @ weight.T + bias)``, by row chunks.

    Saves the hidden states, the per-token logsumexp and entropy; the backward recomputes each chunk's
    logits. Gradients: d logp/dz = onehot - p; d H/dz = -p * (log p + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, chunk_size, ignore_index, want_entropy, stat_names, stats_out):
        n_rows = hidden.shape[0]
        valid = labels != ignore_index  # (N,)
        safe = labels.masked_fill(~valid, 0).long()  # (N,): gather-safe ids
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        logps = torch.empty(n_rows, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logps)
        entropy = torch.empty_like(logps) if want_entropy else logps.new_empty(0)
        for name in stat_names:
            stats_out[name] = torch.empty(n_rows, dtype=torch.long if name == "argmax" else acc, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _chunk_logits(hidden[rows], weight, bias, temperature)  # (n, V)
            if "argmax" in stat_names:
                stats_out["argmax"][rows] = z.argmax(-1)
            if "mean_logit" in stat_names:
                stats_out["mean_logit"][rows] = z.mean(-1)
            if "log_sum_sq" in stat_names:  # log sum_v p_v^2 = logsumexp(2 z) - 2 lse
                stats_out["log_sum_sq"][rows] = torch.logsumexp(2 * z, dim=-1)
            chunk_lse, logps[rows], chunk_entropy, _ = _consume_logits(z, safe[rows], want_entropy, keep_probs=False)
            del z
            lse[rows] = chunk_lse
            if "log_sum_sq" in stat_names:
                stats_out["log_sum_sq"][rows] -= 2 * chunk_lse
            if want_entropy:
                entropy[rows] = chunk_entropy
        logps.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, safe, valid, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.want_entropy = temperature, chunk_size, want_entropy
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        hidden, weight, bias, safe, valid, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logps is None and grad_entropy is None:
            return (None,) * 10
        n_rows = hidden.shape[0]
        acc = lse.dtype
        coef = grad_logps.to(acc) * valid if grad_logps is not None else torch.zeros(n_rows, dtype=acc, device=hidden.device)  # (N,)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulators across chunks (a bf16 running sum would lose the small chunks' contributions)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        for start in range(0, n_rows, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]  # (n, H)
            logp = _chunk_logits(h, weight, bias, ctx.temperature).sub_(lse[rows, None])  # (n, V): log p
            c = coef[rows, None]  # (n, 1)
            if grad_entropy is not None and ctx.want_entropy:  # dz = -p * (c + g_H * (log p + H)), then + c at the label
                p = logp.exp()
                g_ent = grad_entropy[rows, None].to(acc)
                grad_z = logp.add_(entropy[rows, None]).mul_(g_ent).add_(c).mul_(p).neg_()
                del p
            else:
                grad_z = logp.exp_().mul_(c).neg_()
            del logp
            grad_z.scatter_add_(1, safe[rows, None], c)
            if ctx.temperature != 1.0:
                grad_z.div_(ctx.temperature)
            grad_z = grad_z.to(h.dtype)  # the matmuls run in the head's dtype, as the unchunked backward does
            if need_hidden:
                grad_hidden[rows] = grad_z @ weight
            if need_weight:
                grad_weight.add_(grad_z.t() @ h)
            if need_bias:
                grad_bias.add_(grad_z.sum(0))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    ignore_index: int = -100,
    return_entropy: bool = False,
    entropy_grad: bool = True,
    stats: Collection[str] = (),
    compute_dtype: torch.dtype | None = None,
) -> TokenScores:
    """Return per-token ``log_softmax(hidden @ weight.T + bias) / temperature)[label]`` without materializing the logits.

    Equal to ``selective_log_softmax(F.linear(hidden, weight, bias).float() / temperature, labels)``
    (and ``entropy_from_logits`` of the same logits), computed ``chunk_size`` rows at a time; the
    backward recomputes each chunk's logits, so no ``(N, V)`` tensor outlives a chunk.

    Args:
        hidden: ``(..., H)`` final hidden states (the LM head's input), e.g. ``(B, T, H)``.
        weight: ``(V, H)`` LM head weight (tied embeddings: the embedding matrix).
        labels: ``(...)`` token ids to score, e.g. ``(B, T)``; ``ignore_index`` where not scored.
        bias: ``(V,)`` LM head bias, or None.
        temperature: Divide the logits by this before normalizing (must be > 0).
        chunk_size: Rows of the flattened ``(N, H)`` hidden states per chunk (peak extra memory is
            a few ``chunk_size x V`` float32 tensors).
        ignore_index: Label value of unscored positions: their log-prob is 0 and gets no gradient.
        return_entropy: Also return the entropies of the predicted distributions (at every position).
        entropy_grad: Keep the entropies in the graph (an entropy bonus trains them); otherwise detached.
        stats: Detached statistics to return, a subset of ``("argmax", "mean_logit", "log_sum_sq")``.
        compute_dtype: Dtype of the matmul (default: ``weight``'s); the hidden states, weight and bias
            are cast to it, as autocast or a float32 LM head would. Softmax math is always float32.

    Returns:
        :class:`TokenScores` with float32 ``(...)`` tensors.

    Raises:
        ValueError: A non-positive ``temperature`` or ``chunk_size``, an unknown stat, or mismatched shapes.
    """
    if not temperature > 0:
        raise ValueError(f"chunked_token_logprobs: temperature must be > 0, got {temperature}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked_token_logprobs: chunk_size must be a positive integer, got {chunk_size!r}.")
    unknown = set(stats) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"chunked_token_logprobs: unknown stats {sorted(unknown)}; choose from {TOKEN_STATS}.")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"chunked_token_logprobs: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
            "do not match; pass hidden (..., H), weight (V, H) and labels (...)."
        )
    dtype = compute_dtype or weight.dtype
    lead = labels.shape
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)  # (N, H)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    stats_out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=flat.device.type, enabled=False):
        logps, entropy = _ChunkedLogprobs.apply(
            flat, weight, bias, labels.reshape(-1), float(temperature), chunk_size, ignore_index, return_entropy, tuple(stats), stats_out
        )
    if return_entropy:
        entropy = (entropy if entropy_grad else entropy.detach()).reshape(lead)
    else:
        entropy = None
    return TokenScores(logps.reshape(lead), entropy, {k: v.reshape(lead) for k, v in stats_out.items()})


def _logits_token_scores(logits, labels, *, temperature, ignore_index, return_entropy, entropy_grad, stats) -> TokenScores:
    """:class:`TokenScores` from materialized logits (the unchunked path, for models :func:`causal_lm_states` cannot chunk)."""
    from posttrain._ops import entropy_from_logits, selective_log_softmax

    z = logits if logits.dtype == torch.float64 else logits.float()  # float64 stays float64, as in _chunk_logits
    if temperature != 1.0:
        z = z / temperature
    valid = labels != ignore_index
    logps = selective_log_softmax(z, labels.masked_fill(~valid, 0)).masked_fill(~valid, 0.0)
    entropy = None
    if return_entropy:
        entropy = entropy_from_logits(z if entropy_grad else z.detach())
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if "argmax" in stats:
            out["argmax"] = z.argmax(-1)
        if "mean_logit" in stats:
            out["mean_logit"] = z.mean(-1)
        if "log_sum_sq" in stats:
            out["log_sum_sq"] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return TokenScores(logps, entropy, out)


@dataclass
class TokenStates:
    """What a causal LM's head would project at each position: hidden states plus the head, or (fallback) the logits.

    Index it like the logits (``states[:, :-1]``, ``states[:, positions]``) and call :meth:`score`.

    Attributes:
        tensor: ``(B, T, H)`` hidden states when ``weight`` is set, else ``(B, T, V)`` logits.
        weight: ``(V, H)`` LM head weight, or None when ``tensor`` holds logits.
        bias: ``(V,)`` LM head bias, or None.
        compute_dtype: Dtype the model's own head computes the logits in (autocast, a float32 head).
        chunk_size: Rows per chunk.
    """

    tensor: torch.Tensor
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    compute_dtype: torch.dtype | None = None
    chunk_size: int = 256

    @property
    def is_chunked(self) -> bool:
        """Whether :meth:`score` computes from hidden states chunk by chunk (False: from the model's logits)."""
        return self.weight is not None

    def __getitem__(self, index) -> "TokenStates":
        return TokenStates(self.tensor[index], self.weight, self.bias, self.compute_dtype, self.chunk_size)

    def nll_loss(self, labels: torch.Tensor, *, ignore_index: int = -100, dft: bool = False, stats: Collection[str] = ()) -> tuple[torch.Tensor, TokenScores]:
        """Return ``(sum of per-token NLL (DFT-weighted with ``dft``), TokenScores)`` of ``labels`` (see :func:`chunked_nll_loss`)."""
        if self.weight is not None:
            return chunked_nll_loss(self.tensor, self.weight, labels, bias=self.bias, chunk_size=self.chunk_size, ignore_index=ignore_index,
                                    dft=dft, stats=stats, compute_dtype=self.compute_dtype)
        scores = _logits_token_scores(self.tensor, labels, temperature=1.0, ignore_index=ignore_index, return_entropy="entropy" in stats,
                                      entropy_grad=False, stats=[name for name in stats if name != "entropy"])
        per_token = -scores.logps
        if dft:  # DFT (arXiv:2508.05629): weight each token by its detached probability
            per_token = per_token * scores.logps.detach().exp()
        entropy = None if scores.entropy is None else scores.entropy.detach()
        return per_token.sum(), TokenScores(scores.logps.detach(), entropy, scores.stats)

    def score(
        self,
        labels: torch.Tensor,
        *,
        temperature: float = 1.0,
        ignore_index: int = -100,
        return_entropy: bool = False,
        entropy_grad: bool = True,
        stats: Collection[str] = (),
    ) -> TokenScores:
        """Return :class:`TokenScores` of ``labels`` ``(B, T')`` at these positions (see :func:`chunked_token_logprobs`)."""
        if self.weight is None:
            return _logits_token_scores(self.tensor, labels, temperature=temperature, ignore_index=ignore_index,
                                        return_entropy=return_entropy, entropy_grad=entropy_grad, stats=stats)
        return chunked_token_logprobs(self.tensor, self.weight, labels, bias=self.bias, temperature=temperature, chunk_size=self.chunk_size,
                                      ignore_index=ignore_index, return_entropy=return_entropy, entropy_grad=entropy_grad, stats=stats,
                                      compute_dtype=self.compute_dtype)


def _unwrap(model):
    """Return ``(innermost transformers model, whether FSDP wraps it)`` under DDP/accelerate, ``torch.compile`` and PEFT wrappers."""
    sharded = False
    for _ in range(8):
        sharded = sharded or "FullyShardedDataParallel" in type(model).__name__ or type(model).__name__.startswith("FSDP")
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or "FullyShardedDataParallel" in type(model).__name__:
            model = model.module
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model, sharded


def lm_head_of(model) -> torch.nn.Linear | None:
    """Return the plain ``nn.Linear`` LM head whose logits :func:`causal_lm_states` can reproduce, or None.

    None (score from the model's own logits) when the model has no output embeddings, the head is not
    a plain ``nn.Linear`` (a PEFT adapter or ``modules_to_save`` wrapper on the head, a custom head),
    the model is sharded (FSDP wrappers, DTensor weights, DeepSpeed ZeRO-3), or the model post-processes its logits
    (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``, ``output_multiplier``,
    ``lm_head_multiplier``).

    Args:
        model: A causal LM, possibly wrapped by DDP/accelerate, ``torch.compile`` or PEFT.
    """
    base, sharded = _unwrap(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if sharded or type(head) is not torch.nn.Linear or head.weight.dim() != 2 or head.weight.numel() == 0:
        return None
    if type(head.weight).__name__ == "DTensor" or type(head.weight.data).__name__ == "DTensor" or hasattr(head.weight, "ds_id"):
        return None  # sharded: FSDP2 DTensor, DeepSpeed ZeRO-3 (the weight is gathered only inside the head's own forward)
    config = getattr(base, "config", None)
    configs = [config] + [getattr(config, "get_text_config", lambda: None)()] if config is not None else []
    for cfg in configs:
        for name in _LOGIT_POSTPROCESSING:
            value = getattr(cfg, name, None)
            if value not in (None, 1, 1.0, 0, 0.0, False):
                return None
    return head


def causal_lm_states(model, *, chunk_size: int | None, **model_kwargs) -> tuple[Any, TokenStates]:
    """Run ``model(**model_kwargs)`` without computing its logits; return ``(outputs, TokenStates)``.

    A forward pre-hook on the LM head (:func:`lm_head_of`) keeps the hidden states it would project
    and hands it zero rows instead, so the model's whole forward (DDP, PEFT, prompt-learning
    adapters, ``logits_to_keep``) runs as usual and ``outputs.logits`` is empty. The head's output
    tells the dtype it computes in (autocast, a float32 head), which the chunked scoring reproduces.
    The first forward of each head hands it one position instead (``outputs.logits`` is then
    ``(B, 1, V)``), a probe: if the model's logits there differ from the head's own projection (a
    forward that post-processes its logits in a way :func:`lm_head_of` cannot see from the config: a
    custom scale, softcap or bias), the chunked scores would be wrong, so the forward is run again
    unchunked, a warning says so once, and that model is scored from its own logits from then on.
    The verdict is kept per head, so later forwards add no comparison (nor its host sync). With
    ``chunk_size`` 0/None, or a head it cannot reproduce, it runs the model as is and the states are
    the model's logits (``outputs.logits`` is then the real logits).

    Args:
        model: A causal LM (possibly wrapped), called with ``model_kwargs``.
        chunk_size: Rows per chunk (``TrainingConfig.logprob_chunk_size``); 0 or None: unchunked.
        **model_kwargs: Forwarded to the model (``input_ids``, ``attention_mask``, ``logits_to_keep``, ...).

    Returns:
        The model outputs and the :class:`TokenStates` at the positions the head saw ``(B, T, .)``.

    Raises:
        RuntimeError: The LM head was called more than once in one forward (set ``logprob_chunk_size=0``).
    """
    head = lm_head_of(model) if chunk_size else None
    if head is not None and head in _POSTPROCESSED_HEADS:
        head = None
    probe = head is not None and head not in _VERIFIED_HEADS  # the first forward of each head only: no host sync after that
    if head is None:
        outputs = model(**model_kwargs)
        return outputs, TokenStates(outputs.logits)
    captured: dict[str, Any] = {}

    def keep_hidden(module, args):
        if "hidden" in captured:
            raise RuntimeError(f"{type(module).__name__} LM head called twice in one forward; posttrain cannot chunk this model's log-probs: set logprob_chunk_size=0.")
        hidden = args[0]
        captured["hidden"] = hidden
        return (hidden[..., : 1 if probe else 0, :],) + tuple(args[1:])  # the probe position, or nothing

    def keep_dtype(module, args, output):
        captured["dtype"] = output.dtype
        if probe:
            captured["head_logits"] = output.detach()

    handles = [head.register_forward_pre_hook(keep_hidden), head.register_forward_hook(keep_dtype)]
    try:
        outputs = model(**model_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if "hidden" not in captured:
        raise RuntimeError(f"{type(_unwrap(model)[0]).__name__}'s forward never called its LM head; set logprob_chunk_size=0.")
    if probe and _logits_are_the_heads(getattr(outputs, "logits", None), captured.get("head_logits")):
        _VERIFIED_HEADS.add(head)
    elif probe:
        _POSTPROCESSED_HEADS.add(head)
        warnings.warn(
            f"{type(_unwrap(model)[0]).__name__}'s forward changes the LM head's logits (a scale, softcap or offset its config does not "
            "declare), so posttrain's chunked log-probs cannot reproduce them: this model is scored from its full logits from now on "
            "(the memory saving of logprob_chunk_size is lost; set logprob_chunk_size=0 to skip this check).",
            RuntimeWarning,
            stacklevel=2,
        )
        del outputs, captured
        outputs = model(**model_kwargs)
        return outputs, TokenStates(outputs.logits)
    states = TokenStates(captured["hidden"], head.weight, head.bias, captured.get("dtype"), int(chunk_size))
    return outputs, states


#: LM heads whose model was seen post-processing their logits (scored from the full logits from then on)
_POSTPROCESSED_HEADS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
#: LM heads whose model returned the head's own logits at the probe position (not probed again)
_VERIFIED_HEADS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def _logits_are_the_heads(logits, head_logits) -> bool:
    """Whether the model returned its LM head's output at the probe position unchanged (up to a dtype cast)."""
    if logits is None or head_logits is None or head_logits.numel() == 0:
        return True  # nothing to compare: no logits returned, or an empty sequence
    if logits.shape != head_logits.shape:
        return False
    a, b = logits.detach().float(), head_logits.float()
    finite = b[torch.isfinite(b)]
    scale = float(finite.abs().max()) if finite.numel() else 0.0  # a diverged model's inf/nan logits compare as themselves
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-5 * (1.0 + scale), equal_nan=True))


# ----------------------------------------------------------------------------- SFT: NLL / DFT with gradients formed in the forward
class _ChunkedNLL(torch.autograd.Function):
    """``sum_i w_i * -log p(label_i)`` by row chunks, with the gradient formed during the forward.

    The loss is linear in the per-token log-probs with weights known in the forward (1 for NLL, the
    detached label probability for DFT), so each chunk's gradient is final once its softmax is known:
    no recompute in backward (3 matmuls per chunk, as unchunked), which only scales by the output grad.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index, dft, stat_names, stats_out, grad_enabled):
        n_rows = hidden.shape[0]
        valid = labels != ignore_index  # (N,)
        safe = labels.masked_fill(~valid, 0).long()
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # needs_input_grad is set under no_grad too: only form gradients when the caller records a graph
        need_hidden, need_weight, need_bias = (grad_enabled and needed for needed in ctx.needs_input_grad[:3])
        want_grad = need_hidden or need_weight or need_bias
        logps = torch.empty(n_rows, dtype=acc, device=hidden.device)
        for name in stat_names:
            stats_out[name] = torch.empty(n_rows, dtype=torch.long if name == "argmax" else acc, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            z = _chunk_logits(h, weight, bias, 1.0)  # (n, V)
            if "argmax" in stat_names:
                stats_out["argmax"][rows] = z.argmax(-1)
            _, chunk_logp, chunk_entropy, p = _consume_logits(z, safe[rows], "entropy" in stat_names, keep_probs=want_grad)  # z is consumed
            del z
            logps[rows] = chunk_logp
            if "entropy" in stat_names:
                stats_out["entropy"][rows] = chunk_entropy
            w = valid[rows].to(acc)  # (n,): the token weights
            if dft:  # DFT (arXiv:2508.05629): weight each token by its detached probability
                w = w * chunk_logp.exp()
            loss += -(w * chunk_logp).sum()
            if want_grad:  # d loss / dz = w * (p - onehot)
                grad_z = p.mul_(w[:, None])
                del p
                grad_z.scatter_add_(1, safe[rows, None], -w[:, None])
                grad_z = grad_z.to(h.dtype)
                if need_hidden:
                    grad_hidden[rows] = grad_z @ weight
                if need_weight:
                    grad_weight.add_(grad_z.t() @ h)
                if need_bias:
                    grad_bias.add_(grad_z.sum(0))
        logps.masked_fill_(~valid, 0.0)
        stats_out["logps"] = logps
        # the finished gradients are kept on ctx, not saved tensors: activation offloading (save_on_cpu) would copy them
        ctx.grads = (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None if grad_bias is None else grad_bias.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        scale = lambda g: None if g is None else g.mul_(grad_loss.to(g.dtype))  # noqa: E731  (in place: the buffers are ours, no copy)
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None, None, None, None, None


def chunked_nll_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 256,
    ignore_index: int = -100,
    dft: bool = False,
    stats: Collection[str] = (),
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, TokenScores]:
    """Return the summed SFT loss ``sum_t w_t * -log p(label_t)`` over scored tokens and the per-token scores, chunked.

    ``w_t`` is 1 (cross-entropy), or ``p(label_t)`` detached with ``dft`` (DFT, arXiv:2508.05629).
    Divide the sum by the step's label-token count (``num_items_in_batch``) for TRL's token mean. The
    gradient is formed chunk by chunk during the forward and only scaled in backward, so this costs
    the unchunked matmuls with ``chunk_size x V`` logits alive at a time; the gradient buffers of
    ``hidden`` and the head (weight-sized) live until backward.

    Args:
        hidden: ``(..., H)`` final hidden states at the predicting positions.
        weight: ``(V, H)`` LM head weight.
        labels: ``(...)`` next-token ids, ``ignore_index`` where not scored.
        bias: ``(V,)`` LM head bias, or None.
        chunk_size: Rows per chunk.
        ignore_index: Label value of unscored positions.
        dft: Weight each token's NLL by its detached probability.
        stats: Detached statistics to return: ``argmax``, ``entropy``.
        compute_dtype: Matmul dtype (default ``weight``'s), see :func:`chunked_token_logprobs`.

    Returns:
        ``(loss_sum, TokenScores)``: a 0-dim float32 sum, and detached ``logps`` ``(...)`` with
        ``entropy`` (if asked) and ``stats``.

    Raises:
        ValueError: A non-positive ``chunk_size``, an unknown stat, or mismatched shapes.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked_nll_loss: chunk_size must be a positive integer, got {chunk_size!r}.")
    unknown = set(stats) - {"argmax", "entropy"}
    if unknown:
        raise ValueError(f"chunked_nll_loss: unknown stats {sorted(unknown)}; choose from ('argmax', 'entropy').")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"chunked_nll_loss: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
            "do not match; pass hidden (..., H), weight (V, H) and labels (...)."
        )
    dtype = compute_dtype or weight.dtype
    lead = labels.shape
    flat = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    stats_out: dict[str, torch.Tensor] = {}
    with torch.autocast(device_type=flat.device.type, enabled=False):
        loss = _ChunkedNLL.apply(flat, weight.to(dtype), None if bias is None else bias.to(dtype), labels.reshape(-1), chunk_size,
                                 ignore_index, bool(dft), tuple(stats), stats_out, torch.is_grad_enabled())
    logps = stats_out.pop("logps").reshape(lead)
    entropy = stats_out.pop("entropy").reshape(lead) if "entropy" in stats_out else None
    return loss, TokenScores(logps, entropy, {k: v.reshape(lead) for k, v in stats_out.items()})


# ----------------------------------------------------------------------------- distillation divergences
def _divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD (TRL GKD's ``generalized_jsd_loss``): beta=0 forward KL(T||S), beta=1 reverse KL(S||T)."""
    if beta == 0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if beta == 1:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]), dim=0)
    kl_teacher = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
    kl_student = (student_logp.exp() * (student_logp - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def _post_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float, post: tuple) -> torch.Tensor:
    """Return one chunk's logits after a model's own post-processing, then the temperature: ``cap * tanh(scale * z / cap) / T``.

    ``post`` is ``(logit_scale, final_logit_softcapping or None)`` (TRL's order: scale, soft-cap, temperature);
    out of place, so that autograd can differentiate it. Float32 (float64 stays float64).
    """
    scale, softcap = post
    z = F.linear(hidden, weight, bias)
    z = z if z.dtype == torch.float64 else z.float()
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature if temperature != 1.0 else z


class _ChunkedDivergence(torch.autograd.Function):
    """Per-token divergence between student and teacher heads, by row chunks; backward recomputes each chunk under autograd.

    ``post`` is None (plain heads: the original path) or ``((student scale, softcap), (teacher scale, softcap))``;
    with ``want_entropy`` = ``(student, teacher)`` flags, two more non-differentiable outputs hold the per-token entropies
    (empty when not asked).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, beta, temperature, chunk_size, post=None, want_entropy=None):
        dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        out = torch.empty(s_hidden.shape[0], dtype=dtype, device=s_hidden.device)
        want_s, want_t = want_entropy or (False, False)
        s_entropy = torch.empty(s_hidden.shape[0] if want_s else 0, dtype=dtype, device=s_hidden.device)
        t_entropy = torch.empty(s_hidden.shape[0] if want_t else 0, dtype=dtype, device=s_hidden.device)
        for start in range(0, s_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            if post is None:
                s = F.log_softmax(_chunk_logits(s_hidden[rows], s_weight, s_bias, temperature), -1)
                t = F.log_softmax(_chunk_logits(t_hidden[rows], t_weight, t_bias, temperature), -1)
            else:
                s = F.log_softmax(_post_logits(s_hidden[rows], s_weight, s_bias, temperature, post[0]), -1)
                t = F.log_softmax(_post_logits(t_hidden[rows], t_weight, t_bias, temperature, post[1]), -1)
            out[rows] = _divergence(s, t, beta)
            if want_s:
                s_entropy[rows] = -(s.exp() * s).sum(-1)
            if want_t:
                t_entropy[rows] = -(t.exp() * t).sum(-1)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        ctx.beta, ctx.temperature, ctx.chunk_size, ctx.post = beta, temperature, chunk_size, post
        if want_entropy is not None:
            ctx.mark_non_differentiable(s_entropy, t_entropy)
            return out, s_entropy, t_entropy
        return out

    @staticmethod
    def backward(ctx, grad_out, *_):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(s_hidden) if need_h else None
        acc = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(s_weight.shape, dtype=acc, device=s_weight.device) if need_w else None
        grad_b = torch.zeros(s_bias.shape, dtype=acc, device=s_bias.device) if need_b else None
        post = ctx.post
        for start in range(0, s_hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            if post is None:
                with torch.no_grad():
                    t = F.log_softmax(_chunk_logits(t_hidden[rows], t_weight, t_bias, ctx.temperature), -1)
                with torch.enable_grad():
                    z = _chunk_logits(s_hidden[rows].detach(), s_weight.detach(), None if s_bias is None else s_bias.detach(), ctx.temperature).requires_grad_()
                    (grad_z,) = torch.autograd.grad(_divergence(F.log_softmax(z, -1), t, ctx.beta), z, grad_out[rows].to(z.dtype))
                grad_z = (grad_z / ctx.temperature).to(s_hidden.dtype)
            else:  # differentiate through the scale and soft-cap too: grad_z is the gradient of the raw head output
                with torch.no_grad():
                    t = F.log_softmax(_post_logits(t_hidden[rows], t_weight, t_bias, ctx.temperature, post[1]), -1)
                with torch.enable_grad():
                    raw = _chunk_logits(s_hidden[rows].detach(), s_weight.detach(), None if s_bias is None else s_bias.detach(), 1.0).requires_grad_()
                    scale, softcap = post[0]
                    z = raw * scale if scale != 1.0 else raw
                    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
                    z = z / ctx.temperature if ctx.temperature != 1.0 else z
                    (grad_z,) = torch.autograd.grad(_divergence(F.log_softmax(z, -1), t, ctx.beta), raw, grad_out[rows].to(raw.dtype))
                grad_z = grad_z.to(s_hidden.dtype)
            if need_h:
                grad_h[rows] = grad_z @ s_weight
            if need_w:
                grad_w.add_(grad_z.t() @ s_hidden[rows])
            if need_b:
                grad_b.add_(grad_z.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(s_weight.dtype), None if grad_b is None else grad_b.to(s_bias.dtype),
                None, None, None, None, None, None, None, None)


def chunked_distillation_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 256,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    return_entropy: bool = False,
    return_teacher_entropy: bool = False,
):
    """Return the per-token generalized Jensen-Shannon divergence between student and teacher, chunked.

    The divergence of TRL GKD's ``generalized_jsd_loss`` (arXiv:2306.13649 Eq. 1) before masking and
    reduction, with mixture ``m = (1 - beta) p_S + beta p_T``: ``beta * KL(p_T || m) + (1 - beta) *
    KL(p_S || m)``; ``beta=0`` is the forward KL ``KL(p_T || p_S)``, ``beta=1`` the reverse KL
    ``KL(p_S || p_T)``. Both distributions are ``softmax((hidden @ weight.T + bias) / temperature)``
    in float32. Gradients flow to the student only (the teacher is treated as a constant).

    A model that post-processes its logits (TRL 1.16's ``DistillationTrainer`` reads them from the
    config: Cohere's ``logit_scale``, Gemma's ``final_logit_softcapping``) is described per side by
    ``*_logit_scale`` and ``*_final_logit_softcapping``: the logits are ``cap * tanh(scale * z / cap)``
    before the temperature (TRL's order). With the defaults the computation is the plain one, unchanged.

    Args:
        student_hidden: ``(..., H_s)`` student hidden states.
        student_weight: ``(V, H_s)`` student LM head weight.
        teacher_hidden: ``(..., H_t)`` teacher hidden states at the same positions.
        teacher_weight: ``(V, H_t)`` teacher LM head weight (same vocabulary).
        student_bias: ``(V,)`` or None.
        teacher_bias: ``(V,)`` or None.
        beta: Interpolation in ``[0, 1]``.
        temperature: Softmax temperature (> 0).
        chunk_size: Rows per chunk.
        student_logit_scale: Multiplier of the student's logits (1.0: none).
        teacher_logit_scale: Multiplier of the teacher's logits (1.0: none).
        student_final_logit_softcapping: Soft-cap of the student's logits (None: none).
        teacher_final_logit_softcapping: Soft-cap of the teacher's logits (None: none).
        return_entropy: Also return the student's per-token entropy (nats, at ``temperature``; detached).
        return_teacher_entropy: Also return the teacher's per-token entropy (nats, at ``temperature``).

    Returns:
        ``(...)`` float32 divergences (mask and reduce them as the method requires); with
        ``return_entropy`` and/or ``return_teacher_entropy``, a tuple ``(divergences, [student entropies],
        [teacher entropies])`` holding the ones asked for, in that order.

    Raises:
        ValueError: ``beta`` outside ``[0, 1]``, non-positive ``temperature``/``chunk_size``/soft-cap, or mismatched shapes.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"chunked_distillation_divergence: beta must be in [0, 1], got {beta}.")
    if not temperature > 0 or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked_distillation_divergence: temperature must be > 0 and chunk_size a positive integer, got {temperature}, {chunk_size!r}.")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1] or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"chunked_distillation_divergence: student hidden {tuple(student_hidden.shape)} / weight {tuple(student_weight.shape)} and teacher "
            f"hidden {tuple(teacher_hidden.shape)} / weight {tuple(teacher_weight.shape)} must share positions and vocabulary."
        )
    for name, cap in (("student_final_logit_softcapping", student_final_logit_softcapping), ("teacher_final_logit_softcapping", teacher_final_logit_softcapping)):
        if cap is not None and not cap > 0:
            raise ValueError(f"chunked_distillation_divergence: {name} must be None or > 0, got {cap}.")
    post = None
    if (student_logit_scale, teacher_logit_scale) != (1.0, 1.0) or student_final_logit_softcapping is not None or teacher_final_logit_softcapping is not None:
        post = ((float(student_logit_scale), None if student_final_logit_softcapping is None else float(student_final_logit_softcapping)),
                (float(teacher_logit_scale), None if teacher_final_logit_softcapping is None else float(teacher_final_logit_softcapping)))
    lead = student_hidden.shape[:-1]
    s = student_hidden.reshape(-1, student_hidden.shape[-1])
    t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    with torch.autocast(device_type=s.device.type, enabled=False):
        out = _ChunkedDivergence.apply(s, student_weight, student_bias, t, teacher_weight.detach(),
                                       None if teacher_bias is None else teacher_bias.detach(), float(beta), float(temperature), chunk_size,
                                       post, (bool(return_entropy), bool(return_teacher_entropy)) if return_entropy or return_teacher_entropy else None)
    if return_entropy or return_teacher_entropy:
        divergence, s_entropy, t_entropy = out
        wanted = [s_entropy] * bool(return_entropy) + [t_entropy] * bool(return_teacher_entropy)
        return (divergence.reshape(lead), *(e.reshape(lead) for e in wanted))
    return out.reshape(lead)
