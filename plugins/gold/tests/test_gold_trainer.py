"""GOLD trainer: learning toward a trained teacher with another tokenizer, exact resume, gradient accumulation, the
on/off-policy mix, evaluation, and one-line errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import posttrain
from gold_helpers import TEACHER_SEED, TEACHER_VOCAB, conversational_rows, cross_tokenizer_report, saved_tokenizer
from posttrain import ConfigError, DataError


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gold", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Student and teacher tokenizers that differ, and float64 tiny models on them."""
    from posttrain.testing.tiny_model import build_model

    base = tmp_path_factory.mktemp("gold_pair")
    student_tok = saved_tokenizer(base / "student")
    teacher_tok = saved_tokenizer(base / "teacher", vocab_size=TEACHER_VOCAB, seed=TEACHER_SEED)
    return {"student_tok": student_tok, "teacher_dir": str(base / "teacher"),
            "student": build_model(student_tok, seed=0, dtype=torch.float64), "teacher": build_model(teacher_tok, hidden_size=48, seed=1, dtype=torch.float64)}


def _config(tmp_path, **overrides):
    from posttrain_gold.config import GOLDConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6, max_length=128, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return GOLDConfig(**values)


def _trainer(pair, args, rows=None, **kwargs):
    from posttrain_gold.trainer import GOLDTrainer

    return GOLDTrainer(model=kwargs.pop("model", copy.deepcopy(pair["student"])), teacher_model=kwargs.pop("teacher", pair["teacher"]), args=args,
                       train_dataset=rows if rows is not None else conversational_rows(16), processing_class=pair["student_tok"], **kwargs)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.mark.slow
def test_student_learns_from_a_teacher_with_another_tokenizer(tmp_path):
    """A random student distilled (ULD, hybrid, half on-policy) from a trained teacher whose tokenizer differs moves toward it."""
    from posttrain.testing import arithmetic_prompts
    from posttrain.testing.tiny_model import train_teacher
    from posttrain.testing.tiny_model import build_model

    student_tok = saved_tokenizer(tmp_path / "student")
    teacher_tok = saved_tokenizer(tmp_path / "teacher", vocab_size=TEACHER_VOCAB, seed=TEACHER_SEED)
    teacher = train_teacher(teacher_tok, steps=150)  # "\boxed{A+B}<|im_end|>" answers, in the teacher's own tokens
    student = build_model(student_tok)
    held_out = [r["prompt"] for r in arithmetic_prompts(16, seed=99)]
    before = cross_tokenizer_report(student, student_tok, teacher, teacher_tok, held_out)
    args = _config(tmp_path, per_device_train_batch_size=8, max_steps=80, max_completion_length=8, learning_rate=1e-2, logging_steps=10,
                   lmbda=0.5, beta=0.0, temperature=1.0, top_p=1.0, use_uld_loss=True, uld_use_hybrid_loss=True, uld_token_merge_strategy="bayesian",
                   teacher_tokenizer_name_or_path=str(tmp_path / "teacher"))
    from posttrain_gold.trainer import GOLDTrainer

    trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=conversational_rows(64), processing_class=student_tok)
    trainer.train()
    after = cross_tokenizer_report(student, student_tok, teacher, teacher_tok, held_out)
    logged = _metrics(args.output_dir)
    on_policy = sum(m["on_policy"] for m in logged) / len(logged)
    print(f"GOLD learning (cross-tokenizer): NLL of the teacher's answers {before['nll_of_teacher_answer']:.2f} -> {after['nll_of_teacher_answer']:.2f} "
          f"nats, format accuracy {before['format_accuracy']:.2f} -> {after['format_accuracy']:.2f}, divergence {logged[0]['divergence']:.3f} -> "
          f"{logged[-1]['divergence']:.3f}, on-policy share {on_policy:.2f}")
    assert 0.2 < on_policy < 0.8  # both kinds of micro-batch were trained on
    assert after["nll_of_teacher_answer"] < 0.5 * before["nll_of_teacher_answer"]
    assert after["format_accuracy"] >= before["format_accuracy"] + 0.5
    assert logged[-1]["divergence"] < logged[0]["divergence"]


@pytest.mark.parametrize("use_uld_loss", [False, True], ids=["jsd", "uld"])
def test_resume_reproduces_uninterrupted_losses(pair, tmp_path, use_uld_loss):
    """Checkpoint at step 2 of 4 (on- and off-policy micro-batches, GA 2), resume: steps 3-4 log the same losses and weights.

    float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible, while a wrongly restored
    state (weights, the producer's position, the on/off-policy draws, Adam moments, sampling seeds) moves the loss by far more.
    """
    from posttrain.testing.tiny_model import build_model

    teacher = pair["teacher"] if use_uld_loss else build_model(pair["student_tok"], hidden_size=48, seed=3, dtype=torch.float64)
    extra = {"use_uld_loss": True, "teacher_tokenizer_name_or_path": pair["teacher_dir"]} if use_uld_loss else {}
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=4, save_strategy="steps", save_steps=2, lmbda=0.5, seed=3, **extra)
    args = _config(tmp_path, **common)
    full_trainer = _trainer(pair, args, teacher=teacher)
    full_trainer.train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    assert {full[s]["on_policy"] for s in full} != {0.0} and {full[s]["on_policy"] for s in full} != {1.0}  # the mix is exercised
    resumed_trainer = _trainer(pair, _config(tmp_path, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"), **common), teacher=teacher)
    resumed_trainer.train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["on_policy"] == full[step]["on_policy"]
    for (name, p), q in zip(full_trainer.model.named_parameters(), resumed_trainer.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=0), name


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["dataset_completions", "sampled_completions"])
@pytest.mark.parametrize("use_uld_loss", [False, True], ids=["jsd", "uld"])
def test_gradient_accumulation_4x1_equals_1x4(pair, tmp_path, use_uld_loss, lmbda):
    """The same rows (and, on-policy, the same samples) as one micro-batch of 4 or four of 1 give the same update.

    JSD is a mean over the step's completion tokens, ULD a mean over its sequences: both are sums over micro-batches
    divided by the step's count, so the layouts differ by summation order only (float64). ULD's optional
    cross-entropy term is TRL's per-micro-batch mean and is not invariant (left out here).
    """
    from posttrain.testing.tiny_model import build_model

    teacher = pair["teacher"] if use_uld_loss else build_model(pair["student_tok"], hidden_size=48, seed=3, dtype=torch.float64)
    extra = {"use_uld_loss": True, "teacher_tokenizer_name_or_path": pair["teacher_dir"]} if use_uld_loss else {}
    params = []
    for bs, ga in ((4, 1), (1, 4)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, lmbda=lmbda,
                       learning_rate=1.0, optim="sgd", max_grad_norm=0.0, **extra)
        trainer = _trainer(pair, args, teacher=teacher)
        trainer.train()
        params.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    initial = dict(pair["student"].named_parameters())
    for name in params[0]:
        a, b = params[0][name] - initial[name].detach(), params[1][name] - initial[name].detach()
        if a.norm() == 0:
            assert b.norm() == 0, name
            continue
        assert ((a - b).norm() / a.norm()).item() <= 1e-10, name


def test_eval_and_prompt_only_rows_when_fully_on_policy(pair, tmp_path):
    rows = [{"prompt": r["prompt"]} for r in conversational_rows(8)]
    args = _config(tmp_path, lmbda=1.0, use_uld_loss=True, teacher_tokenizer_name_or_path=pair["teacher_dir"])
    trainer = _trainer(pair, args, rows=rows, eval_dataset=conversational_rows(4, seed=5))
    trainer.train()
    assert all(m["on_policy"] == 1.0 for m in _metrics(args.output_dir) if "on_policy" in m)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_divergence" in metrics and metrics["eval_on_policy"] == 0.0  # eval: the dataset's completions


def test_standard_text_rows_get_an_eos_and_messages_rows_use_the_last_assistant_turn(pair, tmp_path):
    args = _config(tmp_path, lmbda=0.0, use_uld_loss=True, teacher_tokenizer_name_or_path=pair["teacher_dir"])
    trainer = _trainer(pair, args, rows=[{"prompt": "what is 2 + 2 =", "completion": " 4"}])
    seq = trainer._sequence({"prompt": "what is 2 + 2 =", "completion": " 4"}, 0)
    tok = pair["student_tok"]
    assert seq["completion_ids"][-1] == tok.eos_token_id and seq["completion_text"] == " 4"
    assert seq["spans"][-1] == (2, 2)  # the appended EOS is not in the text: zero width at its end
    messages = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "2 + 2?"},
                             {"role": "assistant", "content": "4"}]}
    seq = trainer._sequence(messages, 0)
    assert seq["completion_text"] == "4<|im_end|>\n" and seq["prompt_text"].endswith("2 + 2?<|im_end|>\n<|im_start|>assistant\n")


def test_teacher_defaults_to_a_frozen_copy_of_the_student(pair, tmp_path):
    trainer = _trainer(pair, _config(tmp_path), teacher=None)  # TRL: "If None, the teacher model will be the same as the model being trained"
    assert trainer.teacher_model is not trainer.model and not any(p.requires_grad for p in trainer.teacher_model.parameters())
    batch = trainer.build_micro_batch([trainer._sequence(r, i) for i, r in enumerate(conversational_rows(2))], False)
    loss, _ = trainer.compute_loss(trainer.model, batch, torch.tensor(float(batch["num_completion_tokens"])))
    assert float(loss) == 0.0  # the same model: no divergence


@pytest.mark.parametrize("overrides, rows, match", [
    ({"lmbda": 1.5}, None, r"lmbda=1.5 is invalid"),
    ({"use_vllm": True}, None, r"use_vllm=True is not offered"),
    ({"packing": True}, None, r"packing / padding_free are refused"),
    ({"use_uld_loss": True, "uld_use_hybrid_loss": True, "uld_hybrid_matched_weight": 0.5}, None, r"must both be None"),
    ({"use_uld_loss": True, "uld_token_merge_strategy": "mean"}, None, r"uld_token_merge_strategy='mean' is invalid"),
    ({"max_completion_length": 200, "max_length": 128}, None, r"must be smaller than max_length"),
    ({"num_generations": 3}, None, r"generation_batch_size \(1\) x num_generations \(3\) must equal"),
    ({}, [{"prompt": [{"role": "user", "content": "hi"}]}], r"has prompts only .* lmbda=0.5 < 1"),
    ({}, [{"text": "hello"}], r"neither 'prompt' nor 'messages'"),
    ({}, [{"messages": [{"role": "user", "content": "hi"}]}], r"row 0: 'messages' needs an assistant turn"),
    ({}, [{"prompt": "hi", "completion": [{"role": "assistant", "content": "x"}]}], r"row 0: a string prompt needs a string completion"),
])
def test_bad_settings_and_rows_are_one_line_errors(pair, tmp_path, overrides, rows, match):
    with pytest.raises((ConfigError, DataError), match=match) as info:
        _trainer(pair, _config(tmp_path, **{"use_uld_loss": True, "teacher_tokenizer_name_or_path": pair["teacher_dir"], **overrides}), rows=rows)
    assert "\n" not in str(info.value)


def test_vocabulary_mismatch_without_uld_points_to_use_uld_loss(pair, tmp_path):
    with pytest.raises(ConfigError, match=r"differs from the student's .* set use_uld_loss=True") as info:
        _trainer(pair, _config(tmp_path))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"data_collator is not offered"):
        _trainer(pair, _config(tmp_path, use_uld_loss=True, teacher_tokenizer_name_or_path=pair["teacher_dir"]), data_collator=lambda rows: rows)


def test_long_prompts_keep_their_end_within_max_length(pair, tmp_path):
    """Dataset rows: prompt + completion fit max_length; sampled rows train on the very prompt they were sampled from."""
    row = {"prompt": [{"role": "user", "content": "long " * 60 + "what is 1 + 2?"}], "completion": [{"role": "assistant", "content": "3"}]}
    args = _config(tmp_path, max_length=40, max_completion_length=8, use_uld_loss=True, teacher_tokenizer_name_or_path=pair["teacher_dir"])
    trainer = _trainer(pair, args, rows=[row] * 4)
    sampled_from = trainer._sequence_prompt(row, 0)
    assert len(sampled_from) == 32  # max_length - max_completion_length
    on = trainer._sequence(row, 0, completion_ids=[5, 6, 7])
    assert on["prompt_ids"] == sampled_from and on["prompt_text"].endswith("what is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    off = trainer._sequence(row, 0)
    assert len(off["prompt_ids"]) + len(off["completion_ids"]) == 40 and off["prompt_ids"][-3:] == sampled_from[-3:]
    assert trainer.processing_class(off["prompt_text"], add_special_tokens=False)["input_ids"] == off["prompt_ids"]  # the teacher reads that text
