"""SDFT trainer: self-distillation learning on the tiny trained teacher, exact resume, accumulation invariance, teacher kinds,
data formats and one-line errors."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

import posttrain
from posttrain import ConfigError, DataError


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("sdft", allow_experimental=True)


def _config(tmp_path, **overrides):
    from posttrain_sdft.config import SDFTConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=5, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", distillation_topk=20,
                  gradient_checkpointing=False)
    values.update(overrides)
    return SDFTConfig(**values)


def _rows(n: int = 8):
    return [{"prompt": f"what is {i} + {i % 5}?", "privileged_context": f"The answer is {i + i % 5}."} for i in range(n)]


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- learning
def _strip_format(row: dict) -> dict:
    """The student prompt without the format instruction; the instruction is the teacher's privileged context."""
    text = row["prompt"][0]["content"].replace(" answer in \\boxed{}", "")
    return {"prompt": [{"role": "user", "content": text}], "privileged_context": "answer in \\boxed{}", "solution": row["solution"]}


def _self_distillation_report(student, context_model, tok, rows) -> dict:
    """KL(with-context model || student without context) per token of the with-context model's greedy answers, and the
    share of the student's greedy answers (without context) in the ``\\boxed{N}<|im_end|>`` format."""
    kl, tokens, formatted = 0.0, 0, 0
    student.eval()
    with torch.no_grad():
        for row in rows:
            s_ids = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            t_ids = tok.apply_chat_template([{"role": "user", "content": f"{row['prompt'][0]['content']} {row['privileged_context']}"}],
                                            add_generation_prompt=True, tokenize=False)
            s_ids, t_ids = tok(s_ids, add_special_tokens=False)["input_ids"], tok(t_ids, add_special_tokens=False)["input_ids"]
            answer = context_model.generate(torch.tensor([t_ids]), max_new_tokens=8, do_sample=False)[0, len(t_ids):].tolist()
            if tok.eos_token_id in answer:
                answer = answer[: answer.index(tok.eos_token_id) + 1]
            t = torch.log_softmax(context_model(torch.tensor([t_ids + answer])).logits[0, len(t_ids) - 1 : -1].double(), -1)
            s = torch.log_softmax(student(torch.tensor([s_ids + answer])).logits[0, len(s_ids) - 1 : -1].double(), -1)
            kl += float((t.exp() * (t - s)).sum())
            tokens += len(answer)
            mine = student.generate(torch.tensor([s_ids]), max_new_tokens=8, do_sample=False)[0, len(s_ids):].tolist()
            formatted += bool(re.match(r"^\s*\\boxed\{\d+\}<\|im_end\|>", tok.decode(mine)))
    student.train()
    return {"kl_to_context_model": kl / tokens, "format_accuracy": formatted / len(rows)}


@pytest.mark.slow  # builds the tiny trained teacher (~20 s) and trains 10 steps
def test_self_distillation_moves_the_model_without_context_toward_the_model_with_it(tiny_teacher_dir, tmp_path):
    """Start from the tiny trained teacher; its prompt loses the format instruction, which becomes the privileged context.

    Held-out KL of the with-context model (the frozen initial model) to the trained model without the context falls
    (measured on this CPU: 0.096 -> 0.017 nats/token) and its format accuracy stays 1.0.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.testing import arithmetic_prompts
    from posttrain_sdft.trainer import SDFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    context_model = copy.deepcopy(model).eval()
    train = [_strip_format(r) for r in arithmetic_prompts(64, seed=1)]
    held_out = [_strip_format(r) for r in arithmetic_prompts(16, seed=2)]
    before = _self_distillation_report(model, context_model, tok, held_out)
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=4, max_completion_length=8, max_steps=10, learning_rate=3e-4,
                   teacher_prompt_template="{prompt} {privileged_context}", seed=0)
    SDFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok).train()
    after = _self_distillation_report(model, context_model, tok, held_out)
    print(f"before {before}, after {after}")
    assert after["kl_to_context_model"] < 0.5 * before["kl_to_context_model"]
    assert after["format_accuracy"] >= before["format_accuracy"]


# ----------------------------------------------------------------------------- training paths
def test_train_logs_trl_metrics_and_changes_the_weights(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_sdft.trainer import SDFTTrainer

    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    args = _config(tmp_path, num_iterations=2, max_steps=3, eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=2)
    trainer = SDFTTrainer(model=tiny_model, args=args, train_dataset=_rows(), eval_dataset=_rows(2), processing_class=tiny_tokenizer)
    trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in tiny_model.named_parameters())
    logged = _metrics(args.output_dir)
    expected = {"loss", "sdft/distillation_loss", "self_distillation/distillation_loss", "completions/mean_length", "completions/clipped_ratio",
                "completions/mean_terminated_length"}
    assert expected <= set(logged[0]), expected - set(logged[0])
    assert any("eval_loss" in m for m in logged)


@pytest.mark.parametrize("kind", ["live", "ema"])
def test_teacher_kinds(tiny_model, tiny_tokenizer, tmp_path, kind):
    from posttrain_sdft.trainer import SDFTTrainer

    trainer = SDFTTrainer(model=tiny_model, args=_config(tmp_path, teacher_model_kind=kind, teacher_update_rate=0.5), train_dataset=_rows(),
                          processing_class=tiny_tokenizer)
    if kind == "live":
        assert trainer.teacher_model is None  # the student itself
        trainer.train()
        return
    initial = {n: p.detach().clone() for n, p in trainer.teacher_model.named_parameters()}
    trainer.train()
    student = dict(tiny_model.named_parameters())
    for name, p in trainer.teacher_model.named_parameters():  # moved toward the student, not onto it
        assert not torch.equal(p, initial[name]) or torch.equal(student[name].detach(), initial[name]), name
    assert not p.requires_grad


def test_generate_from_teacher_trains_the_student_prompt(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_sdft.trainer import SDFTTrainer

    trainer = SDFTTrainer(model=tiny_model, args=_config(tmp_path, generate_from_teacher=True, max_steps=1), train_dataset=_rows(),
                          processing_class=tiny_tokenizer)
    batches = trainer._rollout_batches(trainer.train_dataset[:2] if isinstance(trainer.train_dataset, list) else [trainer.train_dataset[i] for i in range(2)],
                                       seed=0, size=4, mode="train")
    student_ids = trainer._prompt_ids(trainer.train_dataset[0])
    row = batches[0]["prompt_ids"][0]
    assert row[row != tiny_tokenizer.pad_token_id].tolist()[-len(student_ids):] == student_ids
    assert batches[0]["teacher_prompt_mask"].sum(1)[0] > batches[0]["prompt_mask"].sum(1)[0]
    trainer.train()


def test_prompt_completion_rows_use_the_completion_as_the_demonstration(tiny_model, tiny_tokenizer, tiny_datasets, tmp_path):
    from posttrain_sdft.trainer import SDFTTrainer

    data = tiny_datasets["conversational_prompt_completion"]
    trainer = SDFTTrainer(model=tiny_model, args=_config(tmp_path, max_steps=1), train_dataset=data, processing_class=tiny_tokenizer)
    batch = trainer._rollout_batches([data[0]], seed=0, size=2, mode="train")[0]
    teacher_text = tiny_tokenizer.decode(batch["teacher_prompt_ids"][0][batch["teacher_prompt_mask"][0].bool()])
    assert data[0]["completion"][0]["content"] in teacher_text and data[0]["prompt"][0]["content"] in teacher_text
    trainer.train()


# ----------------------------------------------------------------------------- resume and accumulation
def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2, EMA teacher), resume: steps 4-5 log the same losses (float64)."""
    from posttrain_sdft.trainer import SDFTTrainer

    tiny_model.double()
    common = dict(max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, teacher_model_kind="ema", teacher_update_rate=0.3)
    args = _config(tmp_path, **common)
    SDFTTrainer(model=copy.deepcopy(tiny_model), args=args, train_dataset=_rows(), processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"), **common)
    SDFTTrainer(model=copy.deepcopy(tiny_model), args=resumed_args, train_dataset=_rows(), processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step


def test_gradient_accumulation_4x1_equals_1x4(tiny_model, tiny_tokenizer, tmp_path):
    """One step of 4 completions in one micro-batch or four: the same update (the loss is a mean over sequences)."""
    from posttrain_sdft.trainer import SDFTTrainer

    tiny_model.double()
    updates = []
    for i, (size, accumulation) in enumerate(((4, 1), (1, 4))):
        model = copy.deepcopy(tiny_model)
        args = _config(tmp_path / str(i), per_device_train_batch_size=size, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                       learning_rate=1.0, max_grad_norm=0.0, distillation_mode="full_logits")
        SDFTTrainer(model=model, args=args, train_dataset=_rows(), processing_class=tiny_tokenizer).train()
        updates.append({n: p.detach() - tiny_model.state_dict()[n] for n, p in model.named_parameters()})
    for name, update in updates[0].items():
        assert update.norm() > 0, name
        assert float((update - updates[1][name]).norm() / update.norm()) <= 1e-10, name


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(("overrides", "match"), [
    ({"distillation_mode": "sampled_token"}, "distillation_alpha=1.0"),
    ({"distillation_mode": "nope"}, "distillation_mode='nope' is invalid"),
    ({"teacher_model_kind": "frozen"}, "teacher_model_kind='frozen' is invalid"),
    ({"teacher_prompt_template": "{prompt} only"}, "must contain both"),
    ({"use_teacher_server": True}, "use_teacher_server=True is not implemented"),
    ({"steps_per_generation": 3}, "steps_per_generation=3 is not offered"),
    ({"num_generations": 3}, "num_generations=3 does not divide"),
    ({"distillation_topk": None}, "distillation_topk=None is invalid"),
    ({"distillation_alpha": 1.5}, "distillation_alpha=1.5 is invalid"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        _config(tmp_path, **overrides)


def test_data_errors_name_the_row(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_sdft.trainer import SDFTTrainer

    rows = _rows(4)
    rows[2] = {"prompt": "x", "privileged_context": None}
    with pytest.raises(DataError, match=r"train_dataset row 2: its privileged_context is None"):
        SDFTTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer)
    no_context = [{"prompt": "x"}] * 4
    with pytest.raises(DataError, match=r"train_dataset has no 'privileged_context' column"):
        SDFTTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=no_context, processing_class=tiny_tokenizer)
    assistant_last = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "privileged_context": "c"}] * 4
    with pytest.raises(DataError, match=r"row 0: its prompt ends with a 'assistant' turn"):
        SDFTTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=assistant_last, processing_class=tiny_tokenizer)
