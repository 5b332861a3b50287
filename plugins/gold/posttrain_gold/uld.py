"""GOLD's losses as pure functions (heavy: imports torch): the generalized JSD, and universal logit distillation (ULD)
across tokenizers with byte-offset alignment, merged split tokens and a vocabulary mapping.

The cross-tokenizer path, per sequence (TRL 1.16 ``trl.experimental.gold.ULDLoss``)::

    student completion tokens  s_0 .. s_m   (byte spans of the completion text)
    teacher completion tokens  t_0 .. t_n   (the same text, the teacher's tokenizer)
      -> groups: walk both byte spans, close a group where both tokenizations end on the same byte  (align_by_byte_offsets)
      -> one distribution per group and side: a group of k tokens multiplies one position's distribution by the
         probabilities of the group's other actual tokens                                             (merge_group_probs)
      -> distance: L1 between the two sides' probabilities sorted in decreasing order (ULD, arXiv:2402.12030), or,
         with a vocabulary mapping, generalized JSD on the tokens both vocabularies spell the same plus sorted L1 on
         the others (hybrid)
      -> / number of groups; the batch loss is the mean over sequences
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "generalized_jsd", "align_by_byte_offsets", "merge_group_probs", "sorted_l1", "VocabularyMap", "uld_sequence_loss",
    "token_byte_lengths", "completion_byte_offsets", "is_byte_level",
]

_EPS = 1e-8  # TRL's clamp of a merged token probability and of probabilities before a log


# ----------------------------------------------------------------------------- divergences
def generalized_jsd(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-row generalized JSD of GKD (arXiv:2306.13649 Eq. 1): ``beta * KL(T || M) + (1 - beta) * KL(S || M)``, M = (1-beta) S + beta T.

    ``beta=0`` is the forward KL ``KL(T || S)``, ``beta=1`` the reverse KL ``KL(S || T)``. Inputs are log-probabilities
    ``(..., V)`` (unnormalized ones are taken as given, as TRL's probability inputs are); returns ``(...)``.
    """
    if beta == 0:
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if beta == 1:
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student_logp + math.log1p(-beta), teacher_logp + math.log(beta)]), dim=0)
    return beta * (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1) + (1 - beta) * (student_logp.exp() * (student_logp - mixture)).sum(-1)


def sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Sum over rows of the L1 distance between each row's probabilities sorted in decreasing order (the shorter side zero-padded)."""
    s = student_probs.sort(dim=-1, descending=True).values
    t = teacher_probs.sort(dim=-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = F.pad(s, (0, width - s.shape[-1]))
    t = F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum()


# ----------------------------------------------------------------------------- alignment
def align_by_byte_offsets(student_spans: list, teacher_spans: list) -> tuple[list[list[int]], list[list[int]]]:
    """Group two tokenizations of the same text where their token boundaries agree.

    Each span is a token's ``(start, end)`` bytes in the completion text. Both lists are walked together, advancing
    the side whose current token ends first; when both current tokens end on the same byte, the tokens walked since
    the last such point form one group on each side. Tokens left over on either side form a final group (the
    other side's may be empty).

    Returns:
        ``(student_groups, teacher_groups)``: equally long lists of token-index lists.
    """
    s_groups: list[list[int]] = []
    t_groups: list[list[int]] = []
    i = j = s_open = t_open = 0
    while i < len(student_spans) and j < len(teacher_spans):
        s_end, t_end = student_spans[i][1], teacher_spans[j][1]
        if s_end == t_end:
            i, j = i + 1, j + 1
            s_groups.append(list(range(s_open, i)))
            t_groups.append(list(range(t_open, j)))
            s_open, t_open = i, j
        elif s_end < t_end:
            i += 1
        else:
            j += 1
    if i < len(student_spans) or j < len(teacher_spans):
        s_groups.append(list(range(s_open, len(student_spans))))
        t_groups.append(list(range(t_open, len(teacher_spans))))
    return s_groups, t_groups


def merge_group_probs(probs: torch.Tensor, groups: list[list[int]], token_ids: list[int], strategy: str = "observed") -> torch.Tensor:
    """One distribution per group: ``(len(groups), V)`` from per-position ``probs`` ``(L, V)``.

    A one-token group is its position's distribution. A group of several tokens takes one position's full
    distribution (``"observed"``: the first; ``"bayesian"``: the last) times the probability each other position
    gives its actual token (clamped at 1e-8): an unnormalized distribution over the group's joint outcome. An empty
    group is all zeros. No groups: ``probs`` unchanged.
    """
    if not groups:
        return probs
    rows = []
    for group in groups:
        if not group:
            rows.append(torch.zeros_like(probs[0]))
            continue
        base, others = (group[-1], group[:-1]) if strategy == "bayesian" else (group[0], group[1:])
        row = probs[base]
        if others:
            factor = 1.0
            for pos in others:
                factor = factor * probs[pos, token_ids[pos]].clamp_min(_EPS)
            row = row * factor
        rows.append(row)
    return torch.stack(rows)


class VocabularyMap:
    """Token strings both vocabularies share: teacher id -> student id (the hybrid loss's matched tokens).

    Args:
        student_tokenizer: The student's tokenizer (``get_vocab()``).
        teacher_tokenizer: The teacher's.

    Attributes:
        teacher_ids: ``(M,)`` matched teacher ids, ascending.
        student_ids: ``(M,)`` the student id of each (same string).
    """

    def __init__(self, student_tokenizer, teacher_tokenizer):
        student_vocab = student_tokenizer.get_vocab()
        pairs = sorted((t_id, student_vocab[token]) for token, t_id in teacher_tokenizer.get_vocab().items() if token in student_vocab)
        self.teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        self.student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def split_loss(self, student: torch.Tensor, teacher: torch.Tensor, *, beta: float, matched_weight: float | None,
                   unmatched_weight: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(weighted total, matched JSD, unmatched sorted L1)`` for aligned ``(G, V_s)`` / ``(G, V_t)`` probabilities.

        Matched tokens: generalized JSD (``beta``) of the log of the probabilities (clamped at 1e-8) as they are (no
        renormalization), summed over tokens, averaged over groups. Unmatched tokens: sorted L1 per group, averaged
        over groups. Weights default to the matched share of the teacher's vocabulary and its complement.
        """
        device = student.device
        t_ids, s_ids = self.teacher_ids.to(device), self.student_ids.to(device)
        rows = student.shape[0]
        matched = student.new_zeros(())
        if len(t_ids):
            s_logp = student[:, s_ids].clamp_min(_EPS).log()
            t_logp = teacher[:, t_ids].clamp_min(_EPS).log()
            matched = generalized_jsd(s_logp, t_logp, beta).sum() / max(rows, 1)
        t_free = torch.ones(teacher.shape[-1], dtype=torch.bool, device=device)
        s_free = torch.ones(student.shape[-1], dtype=torch.bool, device=device)
        t_free[t_ids] = False
        s_free[s_ids] = False
        unmatched = student.new_zeros(())
        if t_free.any() and s_free.any():
            unmatched = sorted_l1(student[:, s_free], teacher[:, t_free]) / rows
        if matched_weight is None:
            matched_weight = len(t_ids) / max(1, teacher.shape[-1])
            unmatched_weight = 1.0 - matched_weight
        return matched_weight * matched + unmatched_weight * unmatched, matched, unmatched


# ----------------------------------------------------------------------------- one sequence
def uld_sequence_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, student_ids: list[int], teacher_ids: list[int],
                      student_spans: list | None, teacher_spans: list | None, *, extended: bool, strategy: str, student_temperature: float,
                      teacher_temperature: float, vocabulary: VocabularyMap | None = None, beta: float = 0.5,
                      matched_weight: float | None = None, unmatched_weight: float | None = None) -> tuple[torch.Tensor, tuple | None]:
    """ULD loss of one sequence's completion.

    Args:
        student_logits: ``(L_s, V_s)`` the logits used for the completion tokens (already sliced: the tokens'
            own positions for ``"observed"``, the positions before them for ``"bayesian"``).
        teacher_logits: ``(L_t, V_t)`` likewise.
        student_ids / teacher_ids: The completion tokens (``L_s`` / ``L_t``).
        student_spans / teacher_spans: Their byte spans (``extended`` only).
        extended: Align by byte spans and merge split tokens; else truncate both to the shorter length.
        strategy: ``"observed"`` or ``"bayesian"`` (see :func:`merge_group_probs`).
        student_temperature / teacher_temperature: Softmax temperatures.
        vocabulary: With it, the hybrid loss (see :meth:`VocabularyMap.split_loss`).

    Returns:
        ``(loss, (matched, unmatched) or None)``.
    """
    s_probs = F.softmax(student_logits / student_temperature, dim=-1)
    t_probs = F.softmax(teacher_logits / teacher_temperature, dim=-1)
    if extended:
        s_groups, t_groups = align_by_byte_offsets(student_spans, teacher_spans)
        kept = [(sg, tg) for sg, tg in zip(s_groups, t_groups) if sg and tg]  # a group empty on one side has nothing to compare
        s_aligned = merge_group_probs(s_probs, [sg for sg, _ in kept], student_ids, strategy)
        t_aligned = merge_group_probs(t_probs, [tg for _, tg in kept], teacher_ids, strategy)
    else:
        n = min(len(student_ids), len(teacher_ids))
        s_aligned, t_aligned = s_probs[:n], t_probs[:n]
    if vocabulary is not None:
        loss, matched, unmatched = vocabulary.split_loss(s_aligned, t_aligned, beta=beta, matched_weight=matched_weight, unmatched_weight=unmatched_weight)
        return loss, (matched, unmatched)
    return sorted_l1(s_aligned, t_aligned) / s_aligned.shape[0], None


# ----------------------------------------------------------------------------- byte spans
def is_byte_level(tokenizer) -> bool:
    """Whether a fast tokenizer is byte-level BPE (each character of a token piece stands for one byte of text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and ("ByteLevel" in repr(backend.pre_tokenizer) or "ByteLevel" in repr(backend.decoder))


def token_byte_lengths(tokenizer, ids: list[int]) -> list[int]:
    """UTF-8 length of each token's text: a special token's content, or a byte-level piece's characters (one per byte)."""
    added = {int(i): tok.content for i, tok in tokenizer.added_tokens_decoder.items()}
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return [len(added[t].encode("utf-8")) if t in added else len(piece) for t, piece in zip(ids, pieces)]


def completion_byte_offsets(tokenizer, ids: list[int], *, text_tokens: int | None = None) -> list[tuple[int, int]]:
    """Byte span of each completion token in the completion text (consecutive, from 0).

    ``text_tokens``: how many of ``ids`` spell the text; the rest (an end-of-sequence token appended after it) get a
    zero-width span at the text's end.
    """
    n = len(ids) if text_tokens is None else text_tokens
    spans, cursor = [], 0
    for length in token_byte_lengths(tokenizer, ids[:n]):
        spans.append((cursor, cursor + length))
        cursor += length
    return spans + [(cursor, cursor)] * (len(ids) - n)
