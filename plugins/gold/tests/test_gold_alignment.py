"""GOLD's cross-tokenizer alignment on hand-made examples: byte spans, groups where two tokenizations split the same text
differently, merged split-token probabilities, the vocabulary mapping (and the grouping against TRL's on random spans)."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from gold_helpers import TEACHER_SEED, TEACHER_VOCAB, saved_tokenizer
from posttrain_gold.uld import VocabularyMap, align_by_byte_offsets, completion_byte_offsets, merge_group_probs, sorted_l1


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    base = tmp_path_factory.mktemp("gold_align_tokenizers")
    return saved_tokenizer(base / "student"), saved_tokenizer(base / "teacher", vocab_size=TEACHER_VOCAB, seed=TEACHER_SEED)


def test_groups_close_where_both_tokenizations_end_on_the_same_byte():
    # "12345": student "12" "345", teacher "1" "23" "45"  -> boundaries agree at bytes 5 only... and nowhere inside
    assert align_by_byte_offsets([(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)]) == ([[0, 1]], [[0, 1, 2]])
    # "ab cd": student "ab" " cd", teacher "a" "b" " c" "d"  -> groups {ab | a b}, { cd | c d}
    assert align_by_byte_offsets([(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 4), (4, 5)]) == ([[0], [1]], [[0, 1], [2, 3]])
    # the same split on both sides: one token per group
    assert align_by_byte_offsets([(0, 1), (1, 3)], [(0, 1), (1, 3)]) == ([[0], [1]], [[0], [1]])
    # a teacher EOS appended after the text (zero width at the end) stays as a trailing group with an empty student side
    assert align_by_byte_offsets([(0, 3)], [(0, 3), (3, 3)]) == ([[0], []], [[0], [1]])
    # spans that never meet again: the rest is one group
    assert align_by_byte_offsets([(0, 2), (2, 4)], [(0, 3)]) == ([[0, 1]], [[0]])


def test_real_tokenizers_split_digits_differently_and_groups_spell_the_same_text(tokenizers):
    student, teacher = tokenizers
    text = "what is 3 + 50? 53 \\boxed{53}<|im_end|>"  # student " 50" | " 5" "3" | "5" "3", teacher " 5" "0" | " 53" | "53"
    s_ids = student(text, add_special_tokens=False)["input_ids"]
    t_ids = teacher(text, add_special_tokens=False)["input_ids"]
    s_spans, t_spans = completion_byte_offsets(student, s_ids), completion_byte_offsets(teacher, t_ids)
    assert s_spans[-1][1] == t_spans[-1][1] == len(text.encode())  # both cover the whole text, "<|im_end|>" as its 10 bytes
    s_groups, t_groups = align_by_byte_offsets(s_spans, t_spans)
    assert [student.decode([s_ids[i] for i in g]) for g in s_groups if len(g) > 1] == [" 53", "53"]
    assert [teacher.decode([t_ids[i] for i in g]) for g in t_groups if len(g) > 1] == [" 50"]
    assert any(len(g) > 1 for g in s_groups) and any(len(g) > 1 for g in t_groups)  # each side merges somewhere
    assert sum(map(len, s_groups)) == len(s_ids) and sum(map(len, t_groups)) == len(t_ids)  # every token in exactly one group
    for sg, tg in zip(s_groups, t_groups):
        assert student.decode([s_ids[i] for i in sg]) == teacher.decode([t_ids[i] for i in tg])  # each group pair spells the same text


def test_completion_byte_offsets_count_special_tokens_stray_bytes_and_an_appended_eos(tokenizers):
    student, _ = tokenizers
    ids = student("é1", add_special_tokens=False)["input_ids"] + [student.eos_token_id, student.eos_token_id]
    spans = completion_byte_offsets(student, ids, text_tokens=len(ids) - 1)  # the last EOS appended after the text
    assert spans[-2:] == [(3, 13), (13, 13)]  # "é1" is 3 bytes; "<|im_end|>" is 10; the appended EOS has no width
    stray = [b for b in range(len(student)) if student.convert_ids_to_tokens(b) == "Ã"]  # one byte of a 2-byte character
    assert completion_byte_offsets(student, stray) == [(0, 1)]


def test_merging_a_split_token_observed_and_bayesian():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]], dtype=torch.float64)
    token_ids = [0, 1, 2]
    # observed: the first position's distribution times the probabilities of the later actual tokens (0.6 * 0.6)
    merged = merge_group_probs(probs, [[0, 1, 2]], token_ids, "observed")
    assert torch.allclose(merged, probs[0] * 0.6 * 0.6)
    # bayesian: the last position's distribution times the earlier actual tokens' probabilities (0.5 * 0.6)
    merged = merge_group_probs(probs, [[0, 1, 2]], token_ids, "bayesian")
    assert torch.allclose(merged, probs[2] * 0.5 * 0.6)
    # single-token groups are their rows; an empty group is zeros; a vanishing probability is clamped at 1e-8
    assert torch.equal(merge_group_probs(probs, [[1], []], token_ids), torch.stack([probs[1], torch.zeros(3, dtype=torch.float64)]))
    tiny = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(merge_group_probs(tiny, [[0, 1]], [0, 0], "observed"), tiny[0] * 1e-8)


def test_sorted_l1_compares_shapes_not_token_identities():
    a = torch.tensor([[0.7, 0.2, 0.1]])
    b = torch.tensor([[0.1, 0.7, 0.2, 0.0]])  # the same probabilities on other tokens, a larger vocabulary
    assert sorted_l1(a, b) == 0
    assert math.isclose(float(sorted_l1(a, torch.tensor([[0.5, 0.5]]))), 0.2 + 0.3 + 0.1, rel_tol=1e-6)


def test_vocabulary_map_pairs_tokens_spelled_the_same(tokenizers):
    student, teacher = tokenizers
    vocab = VocabularyMap(student, teacher)
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    assert 0 < len(vocab) < len(t_vocab)  # partly shared vocabularies
    for t_id, s_id in zip(vocab.teacher_ids.tolist(), vocab.student_ids.tolist()):
        assert teacher.convert_ids_to_tokens(t_id) == student.convert_ids_to_tokens(s_id)
    shared = set(s_vocab) & set(t_vocab)
    assert len(vocab) == len(shared) and {"<|im_end|>", "boxed"} <= shared


def test_grouping_equals_trls_on_random_span_pairs():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
    rng = random.Random(0)

    def spans(total):
        cuts = sorted(rng.sample(range(1, total), rng.randint(0, total - 1))) + [total]
        out, start = [], 0
        for cut in cuts:
            out.append((start, cut))
            start = cut
        if rng.random() < 0.3:
            out.append((total, total))  # a zero-width EOS
        return out

    for _ in range(300):
        total = rng.randint(1, 12)
        s, t = spans(total), spans(total if rng.random() < 0.9 else rng.randint(1, 12))
        assert align_by_byte_offsets(s, t) == trl_gold.ULDLoss._align_by_byte_offsets(s, t), (s, t)
