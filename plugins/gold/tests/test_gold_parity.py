"""GOLD against TRL 1.16's ``trl.experimental.gold`` on the same student, teacher and micro-batch, in float64.

* cross-tokenizer (ULD): two tiny models whose tokenizers DIFFER (vocabulary size and merges); our batch (student
  ids, completion byte spans, the teacher's tokenization) is checked against TRL's builders, then our loss and
  gradients against ``ULDLoss`` on the full logits, for every option (extended / positional alignment, observed /
  bayesian merging, hybrid with adaptive or fixed weights, cross-entropy term, temperatures, EOS skipping);
* same tokenizer: the generalized JSD (chunked from hidden states here) against ``GOLDTrainer.generalized_jsd_loss``.

float64 on both sides: the two computations then differ by summation order only (~1e-16 relative per operation), so
the tolerances (loss 1e-5, gradients 1e-4 relative) hold on any machine and thread count.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

import posttrain
from gold_helpers import TEACHER_SEED, TEACHER_VOCAB, conversational_rows, saved_tokenizer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl_gold = pytest.importorskip("trl.experimental.gold.gold_trainer")
trl_utils = pytest.importorskip("trl.experimental.utils")

LOSS_REL, GRAD_REL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gold", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    base = tmp_path_factory.mktemp("gold_tokenizers")
    student = saved_tokenizer(base / "student")
    teacher = saved_tokenizer(base / "teacher", vocab_size=TEACHER_VOCAB, seed=TEACHER_SEED)
    return student, teacher, str(base / "teacher")


@pytest.fixture(scope="module")
def models(tokenizers):
    from posttrain.testing.tiny_model import build_model

    student_tok, teacher_tok, _ = tokenizers
    student = build_model(student_tok, hidden_size=32, seed=0, dtype=torch.float64)
    teacher = build_model(teacher_tok, hidden_size=48, seed=1, dtype=torch.float64)
    return student, teacher


def _trainer(models, tokenizers, tmp_path, **cfg):
    from posttrain_gold.config import GOLDConfig
    from posttrain_gold.trainer import GOLDTrainer

    student, teacher = models
    student_tok, _, teacher_dir = tokenizers
    args = GOLDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=8, max_length=128,
                      teacher_tokenizer_name_or_path=teacher_dir, report_to="none", save_strategy="no", disable_tqdm=True, **cfg)
    return GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=conversational_rows(8), processing_class=student_tok)


def _batch(trainer, tokenizers, on_policy: bool):
    """A micro-batch of 4 sequences: the dataset's completions, or completions of random student tokens (odd splits, stray bytes)."""
    rows = conversational_rows(4, seed=3, worked=True)
    if not on_policy:
        return trainer.build_micro_batch([trainer._sequence(r, i) for i, r in enumerate(rows)], False)
    rng = random.Random(7)
    student_tok = tokenizers[0]
    sequences = []
    for i, r in enumerate(rows):
        ids = [rng.randrange(3, len(student_tok)) for _ in range(rng.randint(2, 7))] + ([student_tok.eos_token_id] if i % 2 == 0 else [])
        sequences.append(trainer._sequence(r, i, completion_ids=ids))
    return trainer.build_micro_batch(sequences, True)


def _labels(batch, prefix=""):
    ids = batch[f"{prefix}input_ids"]
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(zip(batch[f"{prefix}prompt_lengths"].tolist(), batch[f"{prefix}completion_lengths"].tolist())):
        labels[i, p: p + c] = ids[i, p: p + c]
    return labels


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _compare(ours_loss, ours_grads, trl_loss, trl_grads):
    rel = abs(float(ours_loss) - float(trl_loss)) / max(abs(float(trl_loss)), 1e-30)
    assert rel <= LOSS_REL, f"loss {float(ours_loss)!r} vs TRL {float(trl_loss)!r} (rel {rel:.2e})"
    assert ours_grads.keys() == trl_grads.keys()
    worst = 0.0
    for name, g in trl_grads.items():
        err = ((ours_grads[name] - g).norm() / g.norm().clamp_min(1e-30)).item() if g.norm() > 0 else ours_grads[name].abs().max().item()
        assert err <= GRAD_REL, f"{name}: gradient differs from TRL's by {err:.2e} relative"
        worst = max(worst, err)
    return rel, worst


ULD_CASES = {
    "extended_observed": {},
    "extended_bayesian": {"uld_token_merge_strategy": "bayesian"},
    "positional": {"use_extended_uld": False},
    "positional_bayesian_no_eos_skip": {"use_extended_uld": False, "uld_token_merge_strategy": "bayesian", "uld_skip_student_eos": False, "uld_skip_teacher_eos": False},
    "hybrid_adaptive": {"uld_use_hybrid_loss": True, "beta": 0.5},
    "hybrid_fixed_forward_kl_ce": {"uld_use_hybrid_loss": True, "beta": 0.0, "uld_hybrid_matched_weight": 0.7, "uld_hybrid_unmatched_weight": 0.3,
                                   "uld_crossentropy_weight": 0.5, "uld_distillation_weight": 2.0, "uld_student_temperature": 2.0, "uld_teacher_temperature": 1.5},
    "hybrid_reverse_kl_bayesian": {"uld_use_hybrid_loss": True, "beta": 1.0, "uld_token_merge_strategy": "bayesian", "uld_skip_teacher_eos": False},
}


@pytest.mark.parametrize("case", list(ULD_CASES))
def test_uld_loss_and_gradients_match_trl(models, tokenizers, tmp_path, case):
    """Both the dataset's completions and sampled ones (random student tokens: odd splits, stray bytes)."""
    cfg = {"use_uld_loss": True, **ULD_CASES[case]}
    trainer = _trainer(models, tokenizers, tmp_path, **cfg)
    for on_policy in (False, True):
        _check_uld_against_trl(trainer, models, tokenizers, cfg, case, on_policy)


def _check_uld_against_trl(trainer, models, tokenizers, cfg, case, on_policy):
    from types import SimpleNamespace

    student, teacher = models
    student_tok, teacher_tok = trainer.processing_class, trainer.teacher_tokenizer
    batch = _batch(trainer, tokenizers, on_policy)
    b = batch["input_ids"].shape[0]
    prompt_texts = [student_tok.decode(batch["input_ids"][i, :p].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                    for i, p in enumerate(batch["prompt_lengths"].tolist())]
    completion_texts = [student_tok.decode(batch["completion_ids"][i, :c].tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        for i, c in enumerate(batch["completion_lengths"].tolist())]
    if not on_policy:  # the dataset's text: a standard row's appended EOS would not be in it, a conversational row's end-of-turn is
        assert completion_texts[0].endswith("<|im_end|>\n")

    # 1. the teacher's tokenization and byte spans equal TRL's build_teacher_inputs_from_texts
    extended = cfg.get("use_extended_uld", True)
    t_ids, t_labels, t_mask, t_offs = trl_gold.build_teacher_inputs_from_texts(teacher_tok, prompt_texts, completion_texts, use_extended_uld=extended)
    assert torch.equal(t_ids[:, : batch["teacher_input_ids"].shape[1]], batch["teacher_input_ids"])
    assert torch.equal(_labels(batch, "teacher_"), t_labels[:, : batch["teacher_input_ids"].shape[1]])
    # 2. the student's completion byte spans equal TRL's (on-policy: piece lengths; dataset rows: the encoder's character offsets)
    s_offs = torch.zeros(*batch["input_ids"].shape, 2, dtype=torch.long)
    for i in range(b):
        p, c = batch["prompt_lengths"][i].item(), batch["completion_lengths"][i].item()
        ids = batch["completion_ids"][i, :c].tolist()
        if on_policy:
            spans, cursor = [], 0
            for piece in student_tok.convert_ids_to_tokens(ids):
                spans.append((cursor, cursor + trl_utils.piece_byte_len(piece)))
                cursor += spans[-1][1] - spans[-1][0]
        else:
            [(enc_ids, spans)] = trl_utils.encode_with_byte_offsets(student_tok.backend_tokenizer, [completion_texts[i]])
            assert enc_ids == ids
        s_offs[i, p: p + c] = torch.tensor(spans)
        if extended:
            assert batch["spans"][i, :c].tolist() == [list(s) for s in spans]
            t_p = batch["teacher_prompt_lengths"][i].item()
            t_c = batch["teacher_completion_lengths"][i].item()
            assert batch["teacher_spans"][i, :t_c].tolist() == t_offs[i, t_p: t_p + t_c].tolist()

    if extended:  # the two tokenizations split this batch differently, each side merging tokens somewhere
        from posttrain_gold.uld import align_by_byte_offsets

        merged = [0, 0]
        for i in range(b):
            c, t_c = batch["completion_lengths"][i].item(), batch["teacher_completion_lengths"][i].item()
            groups = align_by_byte_offsets(batch["spans"][i, :c].tolist(), batch["teacher_spans"][i, :t_c].tolist())
            merged = [m + sum(len(g) > 1 for g in side) for m, side in zip(merged, groups)]
        assert merged[0] > 0 and merged[1] > 0, merged

    # 3. loss and gradients: ours (per-sequence logits from hidden states) vs TRL's ULDLoss on the full logits
    num_items = torch.tensor(float(b))
    ours, metrics = trainer.compute_loss(student, batch, num_items)
    ours_grads = _grads(student, ours)
    trl_cfg = SimpleNamespace(**{k: getattr(trainer.args, k) for k in (
        "uld_crossentropy_weight", "uld_distillation_weight", "uld_student_temperature", "uld_teacher_temperature", "uld_skip_student_eos",
        "uld_skip_teacher_eos", "use_extended_uld", "uld_token_merge_strategy", "uld_use_hybrid_loss", "uld_hybrid_matched_weight",
        "uld_hybrid_unmatched_weight", "beta")})
    uld = trl_gold.ULDLoss(trl_cfg, student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        te_logits = teacher(input_ids=t_ids, attention_mask=t_mask.long()).logits
    theirs = uld(s_logits, te_logits, _labels(batch), t_labels, batch["input_ids"], t_ids, student_byte_offsets=s_offs, teacher_byte_offsets=t_offs)
    trl_grads = _grads(student, theirs)
    rel, worst = _compare(ours, ours_grads, theirs, trl_grads)
    if trainer.args.uld_use_hybrid_loss:  # the last sequence's parts (TRL keeps the last one it computed)
        assert metrics["matched_loss"] > 0
    print(f"ULD parity {case}/{'on' if on_policy else 'off'}-policy: loss {float(ours):.6g} rel {rel:.1e}, worst grad rel {worst:.1e}")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_same_tokenizer_jsd_matches_trl(tokenizers, tmp_path, beta):
    from posttrain.testing.tiny_model import build_model
    from posttrain_gold.config import GOLDConfig
    from posttrain_gold.trainer import GOLDTrainer

    student_tok = tokenizers[0]
    student = build_model(student_tok, hidden_size=32, seed=0, dtype=torch.float64)
    teacher = build_model(student_tok, hidden_size=48, seed=2, dtype=torch.float64)
    args = GOLDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=8, max_length=128, beta=beta,
                      report_to="none", save_strategy="no", disable_tqdm=True, logprob_chunk_size=3)  # several chunks per micro-batch
    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=conversational_rows(8), processing_class=student_tok)
    for on_policy in (False, True):
        batch = _batch(trainer, tokenizers, on_policy)
        num_items = torch.tensor(float(batch["num_completion_tokens"]))
        ours, metrics = trainer.compute_loss(student, batch, num_items)
        ours_grads = _grads(student, ours)
        mask = batch["attention_mask"]
        s_logits = student(input_ids=batch["input_ids"], attention_mask=mask).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=mask).logits
        theirs = trl_gold.GOLDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], labels=_labels(batch)[:, 1:], beta=beta,
                                                           temperature=args.temperature, num_items_in_batch=num_items)
        rel, worst = _compare(ours, ours_grads, theirs, _grads(student, theirs))
        assert float(metrics["divergence"]) == pytest.approx(float(theirs), rel=1e-9)  # one micro-batch: the per-token mean
        print(f"JSD parity beta={beta} {'on' if on_policy else 'off'}-policy: loss {float(ours):.6g} rel {rel:.1e}, worst grad rel {worst:.1e}")
