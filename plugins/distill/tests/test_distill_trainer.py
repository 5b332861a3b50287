"""DistillationTrainer: construction, training, learning toward a trained teacher, accumulation, resume, several teachers, errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from distill_helpers import FixedBackend, rel_err, tiny_lm
from posttrain import ConfigError, DataError, RolloutEngine
from posttrain.methods.distill import DistillationConfig, DistillationTrainer


def _config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False)
    values.update(overrides)
    return DistillationConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _weights(model) -> dict:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()}


def test_init_minimal_freezes_the_teacher_in_its_own_dtype(tiny_tokenizer, prompt_rows, tmp_path):
    teacher = tiny_lm(tiny_tokenizer, hidden_size=24, seed=1, dtype=torch.float64)
    trainer = DistillationTrainer(model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32), teacher_model=teacher,
                                  args=_config(tmp_path), train_dataset=prompt_rows, processing_class=tiny_tokenizer)
    assert trainer.teacher_model is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert next(teacher.parameters()).dtype == torch.float64  # the teacher keeps its own dtype
    assert trainer.args.beta == 1.0 and trainer.args.learning_rate == 1e-2


def test_train_changes_the_student_not_the_teacher_and_logs_trls_metrics(tiny_tokenizer, prompt_rows, tmp_path):
    student, teacher = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32), tiny_lm(tiny_tokenizer, hidden_size=24, seed=1, dtype=torch.float32)
    before, teacher_before = _weights(student), _weights(teacher)
    args = _config(tmp_path, beta=0.5, temperature=0.9)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer).train()
    assert all(not torch.equal(before[n], p.detach()) for n, p in student.named_parameters())
    assert all(torch.equal(teacher_before[n], p.detach()) for n, p in teacher.named_parameters())
    logged = _metrics(args.output_dir)
    expected = {"loss", "entropy", "teacher_entropy", "completions/mean_length", "completions/min_length", "completions/max_length",
                "completions/clipped_ratio", "completions/mean_terminated_length", "completions/min_terminated_length",
                "completions/max_terminated_length", "num_tokens"}
    assert [m["step"] for m in logged] == [1, 2] and expected <= set(logged[0]), expected - set(logged[0])
    assert all(m["loss"] > 0 and m["entropy"] > 0 for m in logged)


def test_chunked_and_unchunked_losses_agree(tiny_tokenizer, prompt_rows, tmp_path):
    """logprob_chunk_size=0 (the full logits, the fallback for post-processed heads) gives the chunked loss (float64)."""
    losses = []
    for chunk in (3, 0):
        student, teacher = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0), tiny_lm(tiny_tokenizer, hidden_size=24, seed=1)
        args = _config(tmp_path / f"c{chunk}", logprob_chunk_size=chunk, max_steps=2, beta=0.3)
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer,
                            rollout_engine=RolloutEngine(FixedBackend())).train()
        losses.append([m["loss"] for m in _metrics(args.output_dir)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-10)


@pytest.mark.parametrize("layout", [(2, 2), (1, 4)])
def test_gradient_accumulation_4x1_equals_other_layouts(tiny_tokenizer, prompt_rows, tmp_path, layout):
    """Same fixed completions: per-device batch 4 x GA 1 and 2 x 2 / 1 x 4 give the same update after one step (float64).

    The loss is a sum over the step's valid tokens divided by their global count, so the layouts differ in summation order
    (~1e-16) and in one more place: a micro-batch left-pads its prompts to its own longest one, which shifts the rotary
    positions, and transformers computes RoPE's cos/sin in float32 even for a float64 model (~1e-7 per element; measured
    2e-8 relative on the update). Each tensor's update is compared relative to its own norm, to 1e-6; a micro-batch
    normalized by its own token count instead (TRL before its num_items fix) is off by ~1e-1.
    """
    params = []
    for bs, ga in ((4, 1), layout):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0,
                       adam_epsilon=1.0, max_grad_norm=0.0)
        student = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0)
        DistillationTrainer(model=student, teacher_model=tiny_lm(tiny_tokenizer, hidden_size=24, seed=1), args=args, train_dataset=prompt_rows,
                            processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend())).train()
        params.append(_weights(student))
    initial = _weights(tiny_lm(tiny_tokenizer, hidden_size=16, seed=0))
    for name in params[0]:
        update_a, update_b = params[0][name] - initial[name], params[1][name] - initial[name]
        assert update_a.norm() > 0, name
        assert ((update_a - update_b).norm() / update_a.norm()).item() <= 1e-6, name


def test_resume_reproduces_uninterrupted_losses(tiny_tokenizer, prompt_rows, tmp_path):
    """Checkpoint at step 2, resume: steps 3-4 log the same losses (float64; the student samples its own completions)."""
    student, teacher = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0), tiny_lm(tiny_tokenizer, hidden_size=24, seed=1)
    args = _config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=prompt_rows, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=resumed_args, train_dataset=prompt_rows,
                        processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["completions/mean_length"] == full[step]["completions/mean_length"]


def test_several_teachers_route_each_row_to_its_own(tiny_tokenizer, tmp_path):
    """A 'teacher' column picks the teacher per row: the loss and gradients equal the sum of the two single-teacher losses on their rows."""
    teachers = {"small": tiny_lm(tiny_tokenizer, hidden_size=16, seed=1), "wide": tiny_lm(tiny_tokenizer, hidden_size=24, seed=2)}
    rows = [{"prompt": f"q{i}", "teacher": "small" if i % 3 else "wide"} for i in range(6)]
    pad = tiny_tokenizer.pad_token_id
    batch = {
        "prompt_ids": torch.tensor([[pad, 5, 6], [7, 8, 9], [pad, 10, 11], [12, 13, 14], [pad, pad, 15], [16, 17, 18]]),
        "prompt_mask": torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]),
        "completion_ids": torch.tensor([[20, 21, 22, 23], [30, 31, pad, pad], [40, 41, 42, pad], [50, 51, 52, 53], [60, pad, pad, pad], [70, 71, 72, 73]]),
        "completion_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]),
    }
    num_items = torch.tensor(float(batch["completion_mask"].sum()))
    student = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0)
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teachers, args=_config(tmp_path / "multi", beta=0.5),
                                  train_dataset=rows, processing_class=tiny_tokenizer)
    index = torch.tensor([trainer.teacher_names.index(r["teacher"]) for r in rows])
    loss, _ = trainer.compute_loss(trainer.model, {**batch, "teacher_index": index}, num_items)
    loss.backward()

    separate, grads = 0.0, None
    for name, teacher in teachers.items():
        keep = torch.tensor([r["teacher"] == name for r in rows])
        single = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=_config(tmp_path / name, beta=0.5),
                                     train_dataset=rows, processing_class=tiny_tokenizer)
        part, _ = single.compute_loss(single.model, {k: v[keep] for k, v in batch.items()}, num_items)
        part.backward()
        separate = separate + part.detach()
        g = {n: p.grad.clone() for n, p in single.model.named_parameters()}
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    assert rel_err(loss, separate) < 1e-12
    for n, p in trainer.model.named_parameters():
        assert rel_err(p.grad, grads[n]) < 1e-10, n


def test_trains_with_several_teachers_from_the_config(tiny_tokenizer, tiny_model_dir, tmp_path):
    """teacher_models (names -> directories) loads each teacher by path; a run trains and logs the teacher column."""
    rows = [{"prompt": f"q{i}", "teacher": ["a", "b", None][i % 3]} for i in range(8)]
    args = _config(tmp_path, teacher_models={"a": tiny_model_dir, "b": tiny_model_dir}, log_completions=True, max_steps=1)
    trainer = DistillationTrainer(model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32), args=args, train_dataset=rows,
                                  processing_class=tiny_tokenizer)
    assert trainer.teacher_names == ["a", "b"]
    trainer.train()
    assert set(trainer._logs["extra"]["teacher"]) <= {"a", "b"}


# ----------------------------------------------------------------------------- one-line errors
def test_vocabulary_mismatch_is_one_line_pointing_to_gold(tiny_tokenizer, prompt_rows, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    student = tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32)
    other = Qwen2ForCausalLM(Qwen2Config(vocab_size=student.config.vocab_size + 7, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ConfigError) as err:
        DistillationTrainer(model=student, teacher_model=other, args=_config(tmp_path), train_dataset=prompt_rows, processing_class=tiny_tokenizer)
    message = str(err.value)
    assert "\n" not in message and str(student.config.vocab_size) in message and str(student.config.vocab_size + 7) in message
    assert "posttrain train gold" in message


def test_unknown_teacher_name_names_the_row_and_the_known_teachers(tiny_tokenizer, tmp_path):
    teachers = {"a": tiny_lm(tiny_tokenizer, hidden_size=16, seed=1, dtype=torch.float32), "b": tiny_lm(tiny_tokenizer, hidden_size=16, seed=2, dtype=torch.float32)}
    rows = [{"prompt": "x", "teacher": "a"}, {"prompt": "y", "teacher": "b"}, {"prompt": "z", "teacher": "c"}]
    with pytest.raises(DataError, match=r"train_dataset row 2 has teacher='c'.*\['a', 'b'\]"):
        DistillationTrainer(model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32), teacher_model=teachers,
                            args=_config(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer)


def test_missing_prompt_column_is_one_line(tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="row 0 has no 'prompt' column"):
        DistillationTrainer(model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32),
                            teacher_model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=1, dtype=torch.float32), args=_config(tmp_path),
                            train_dataset=[{"question": "x"}], processing_class=tiny_tokenizer)


@pytest.mark.parametrize("kwargs,overrides,match", [
    ({"teacher_model": None}, {}, "no teacher"),
    ({"tools": [len]}, {}, r"^tool 'len': its schema cannot be built"),
    ({}, {"teacher_model_init_kwargs": {"dtype": "float32"}}, "teacher_model_init_kwargs is set but the teacher"),
])
def test_trainer_argument_errors(tiny_tokenizer, prompt_rows, tmp_path, kwargs, overrides, match):
    values = {"teacher_model": tiny_lm(tiny_tokenizer, hidden_size=16, seed=1, dtype=torch.float32), **kwargs}
    with pytest.raises(ConfigError, match=match):
        DistillationTrainer(model=tiny_lm(tiny_tokenizer, hidden_size=16, seed=0, dtype=torch.float32), args=_config(tmp_path, **overrides),
                            train_dataset=prompt_rows, processing_class=tiny_tokenizer, **values)


@pytest.mark.parametrize("overrides,match", [
    ({"beta": 1.5}, r"beta=1.5 is invalid"),
    ({"temperature": 0.0}, r"temperature=0.0 is invalid"),
    ({"teacher_models": "{not json"}, r"teacher_models=.* is not a JSON object"),
    ({"teacher_models": {"a": "x"}, "teacher_model_name_or_path": "y"}, r"both set"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)
