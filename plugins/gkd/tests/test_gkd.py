"""GKD on the posttrain loop: learning toward the tiny trained teacher (off-policy on teacher completions, on-policy
through the rollout engine), the seeded on/off-policy mix, exact resume, gradient accumulation (off-policy), the
sequences generated for a micro-batch, bad input in one line, and examples/gkd.yaml through the CLI."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

import posttrain
from posttrain.testing import arithmetic_prompts, distillation_report, make_tiny_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gkd", allow_experimental=True)
    yield


def _config(tmp_path, name="run", **cfg):
    from posttrain.experimental.gkd import GKDConfig

    base = {"report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", "max_new_tokens": 8,
            "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "seed": 0}
    return GKDConfig(output_dir=str(tmp_path / name), **{**base, **cfg})


def _trainer(tmp_path, model, teacher, data, tokenizer=None, name="run", eval_dataset=None, **cfg):
    from posttrain.experimental.gkd import GKDTrainer

    return GKDTrainer(model=model, teacher_model=teacher, args=_config(tmp_path, name, **cfg), train_dataset=data, eval_dataset=eval_dataset,
                      processing_class=tokenizer)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tiny_teacher_dir):
    """(tokenizer, student, teacher) loaded from the saved tiny model and the tiny trained teacher."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)


@pytest.fixture(scope="module")
def teacher_rows(pair):
    """64 training conversations whose completions the teacher wrote (greedy), and 16 held-out prompts."""
    tokenizer, _, teacher = pair
    rows = []
    with torch.no_grad():
        for row in arithmetic_prompts(64, seed=1):
            prompt = tokenizer(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
            out = teacher.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answer = out[0, len(prompt):].tolist()
            answer = answer[: answer.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in answer else answer
            rows.append({"messages": row["prompt"] + [{"role": "assistant", "content": tokenizer.decode(answer)}]})
    return rows, arithmetic_prompts(16, seed=7)


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["off_policy_teacher_data", "on_policy"])
def test_learns_toward_the_trained_teacher(lmbda, pair, teacher_rows, tmp_path):
    """Held-out forward KL to the teacher falls and the student picks up the teacher's answer format.

    lmbda=0: forward KL on the teacher's own completions (supervised KD); lmbda=1: every batch sampled from
    the student by the rollout engine, forward KL (beta=0) on those samples. Numbers printed (pytest -s).
    """
    tokenizer, student, teacher = pair
    rows, heldout = teacher_rows
    student = copy.deepcopy(student)
    before = distillation_report(student, teacher, tokenizer, heldout)
    steps, batch = (20, 8) if lmbda == 0.0 else (60, 16)
    trainer = _trainer(tmp_path, student, teacher, rows, tokenizer, lmbda=lmbda, beta=0.0, temperature=1.0, max_steps=steps, per_device_train_batch_size=batch,
                       learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=5)
    trainer.train()
    after = distillation_report(trainer.model, teacher, tokenizer, heldout)
    logged = _metrics(trainer.args.output_dir)
    print(f"lmbda={lmbda}: held-out KL to teacher {before['kl_to_teacher']:.3f} -> {after['kl_to_teacher']:.3f}, format accuracy "
          f"{before['format_accuracy']:.2f} -> {after['format_accuracy']:.2f}, answer accuracy {before['answer_accuracy']:.2f} -> {after['answer_accuracy']:.2f}")
    assert after["kl_to_teacher"] < 0.5 * before["kl_to_teacher"]
    assert after["format_accuracy"] >= before["format_accuracy"] + 0.5
    assert all(r["on_policy"] == lmbda for r in logged if "on_policy" in r)
    assert logged[-1]["divergence"] < 0.5 * logged[0]["divergence"]


def test_the_mix_is_seeded_per_step_and_micro_batch(pair, tmp_path):
    """lmbda=0.5: which micro-batches are on-policy depends on (seed, step, micro-batch) only; about half are."""
    tokenizer, student, teacher = pair
    data = make_tiny_datasets(n=8)["messages"]
    a = _trainer(tmp_path, copy.deepcopy(student), teacher, data, tokenizer, name="a", lmbda=0.5)
    b = _trainer(tmp_path, copy.deepcopy(student), teacher, data, tokenizer, name="b", lmbda=0.5)
    c = _trainer(tmp_path, copy.deepcopy(student), teacher, data, tokenizer, name="c", lmbda=0.5, seed=1)
    draws = [[t._draw(step, i) < 0.5 for step in range(200) for i in range(2)] for t in (a, b, c)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    assert 0.4 < sum(draws[0]) / len(draws[0]) < 0.6


def test_generated_micro_batch_layout(pair, tmp_path):
    """A student-sampled micro-batch: the prompts kept (left-padded), the sampled completion scored up to its EOS, -100 elsewhere."""
    tokenizer, student, teacher = pair
    data = make_tiny_datasets(n=4)["messages"]
    trainer = _trainer(tmp_path, copy.deepcopy(teacher), teacher, data, tokenizer, lmbda=1.0, max_new_tokens=12)  # a student that ends its answers
    batch = trainer.collate([trainer.train_dataset[i] for i in range(4)])
    (new,) = trainer.prepare_step([batch], trainer.loop.state)
    assert float(new["on_policy"]) == 1.0
    width = batch["prompts"].shape[1]
    assert torch.equal(new["input_ids"][:, :width], batch["prompts"]) and torch.equal(new["attention_mask"][:, :width], batch["prompt_attention_mask"])
    completion, labels, mask = new["input_ids"][:, width:], new["labels"][:, width:], new["attention_mask"][:, width:]
    assert (new["labels"][:, :width] == -100).all()
    assert torch.equal(labels, completion.masked_fill(mask == 0, -100))
    for row, m in zip(completion, mask):
        kept = row[m.bool()].tolist()
        assert tokenizer.eos_token_id not in kept[:-1]  # nothing after the first EOS is scored
    again = trainer.prepare_step([trainer.collate([trainer.train_dataset[i] for i in range(4)])], trainer.loop.state)[0]
    assert torch.equal(again["input_ids"], new["input_ids"])  # the sample is seeded by (seed, step, micro-batch)


def test_resume_is_exact_with_student_and_teacher_samples(tiny_model_dir, tiny_teacher_dir, tmp_path):
    """lmbda=0.5 with seq_kd: dataset, student and teacher micro-batches; a run resumed at step 2 ends bit-identical."""
    data = make_tiny_datasets(n=16)["messages"]
    cfg = {"max_steps": 4, "gradient_accumulation_steps": 2, "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2,
           "lmbda": 0.5, "seq_kd": True, "teacher_model_name_or_path": tiny_teacher_dir}
    torch.manual_seed(0)
    full = _trainer(tmp_path, tiny_model_dir, None, data, name="full", **cfg)
    full.train()
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    resumed = _trainer(tmp_path, tiny_model_dir, None, data, name="resumed", **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    logged = [r for r in _metrics(full.args.output_dir) if "loss" in r]
    assert any(r["on_policy"] > 0 for r in logged) and any(r["teacher_generated"] > 0 for r in logged)  # the steps mixed both samplers


def test_gradient_accumulation_off_policy(tiny_tokenizer, tmp_path):
    """lmbda=0: per-device batch 4 x accumulation 1 == 2 x 2 == 1 x 4 (the loss is a token mean over the whole step).

    Float64 and SGD: the weights move by the gradients, whose computations differ by summation order only (AdamW would
    divide near-zero gradients by their own size and amplify that rounding)."""
    from posttrain.testing.tiny_model import build_model

    student = build_model(tiny_tokenizer, hidden_size=32, seed=0, dtype=torch.float64)
    teacher = build_model(tiny_tokenizer, hidden_size=48, seed=1, dtype=torch.float64)
    data = make_tiny_datasets(n=8, seed=2)["messages"]
    runs = []
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        trainer = _trainer(tmp_path, copy.deepcopy(student), teacher, data, tiny_tokenizer, name=f"bs{bs}", lmbda=0.0, max_steps=2,
                           per_device_train_batch_size=bs, gradient_accumulation_steps=ga, learning_rate=1.0, optim="sgd", data_seed=0)
        trainer.train()
        runs.append((trainer, [r["loss"] for r in _metrics(trainer.args.output_dir) if "loss" in r]))
    (ref, ref_losses), *others = runs
    for trainer, losses in others:
        assert losses == pytest.approx(ref_losses, rel=1e-9)
        for a, b in zip(ref.model.parameters(), trainer.model.parameters()):
            assert (a - b).abs().max() < 1e-12


def test_bad_input_is_one_line(pair, tiny_tokenizer, tmp_path):
    from posttrain.experimental.gkd import GKDConfig
    from posttrain.testing.tiny_model import build_model

    tokenizer, student, teacher = pair
    good = make_tiny_datasets(n=4)["messages"].to_list()

    def refused(error, match, **kwargs):
        kw = {"model": copy.deepcopy(student), "teacher": teacher, "data": good, "tokenizer": tokenizer, **kwargs}
        with pytest.raises(error, match=match) as info:
            _trainer(tmp_path, kw.pop("model"), kw.pop("teacher"), kw.pop("data"), kw.pop("tokenizer"), **kw)
        assert "\n" not in str(info.value)

    refused(posttrain.ConfigError, "needs a teacher", teacher=None)
    other_vocab = build_model(build_tokenizer_of(300), hidden_size=16, seed=0)
    refused(posttrain.ConfigError, "vocab_size.*'gold'", teacher=other_vocab)
    refused(posttrain.ConfigError, "teacher_model_init_kwargs", teacher_model_init_kwargs={"dtype": "float32"})
    refused(posttrain.DataError, "train_dataset row 1: no 'messages'", data=[good[0], {"text": "hello"}])
    refused(posttrain.DataError, r"train_dataset row 0, column 'messages': the last message has role 'user'",
            data=[{"messages": good[0]["messages"][:1] * 2}])
    refused(posttrain.DataError, r"Prompt-only conversational rows are accepted .*lmbda=1\.0", data=[{"prompt": good[0]["messages"][:1]}])
    refused(posttrain.DataError, "row 0: the completion alone fills max_length=4",
            data=[{"messages": good[0]["messages"][:1] + [{"role": "assistant", "content": "a long answer that fills the window"}]}], max_length=4)
    for field, value, match in (("lmbda", 1.5, "lmbda=1.5 is invalid"), ("beta", -0.1, "beta=-0.1 is invalid"), ("packing", True, "packing=True is not supported"),
                                ("temperature", 0.0, "temperature=0.0 is invalid"), ("max_new_tokens", 0, "max_new_tokens=0 is invalid")):
        with pytest.raises(posttrain.ConfigError, match=match) as info:
            GKDConfig(output_dir=str(tmp_path / "x"), **{field: value})
        assert "\n" not in str(info.value)


def build_tokenizer_of(vocab_size):
    from posttrain.testing.tiny_model import build_tokenizer

    return build_tokenizer(vocab_size=vocab_size)


def test_prompt_only_rows_train_when_every_completion_is_generated(pair, tmp_path):
    tokenizer, student, teacher = pair
    rows = arithmetic_prompts(8, seed=3)
    trainer = _trainer(tmp_path, copy.deepcopy(student), teacher, rows, tokenizer, lmbda=0.0, seq_kd=True, max_steps=2)
    trainer.train()
    logged = [r for r in _metrics(trainer.args.output_dir) if "loss" in r]
    assert [r["teacher_generated"] for r in logged] == [1.0, 1.0] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in logged)


def test_example_yaml_trains_through_the_cli(tiny_model_dir, tiny_teacher_dir, tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    code = main(["train", "gkd", "--config", "examples/gkd.yaml", "--allow-experimental", "gkd", "--model_name_or_path", tiny_model_dir,
                 "--teacher_model_name_or_path", tiny_teacher_dir, "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1",
                 "--save_strategy", "no", "--preset", "on_policy_gkd"])
    assert code == 0
    rows = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in rows][:2] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["on_policy"] == 1.0 for r in rows)  # the preset's lmbda=1


def test_evaluation_scores_the_eval_completions(pair, tmp_path):
    """evaluate(): the eval rows' own completions (no sampling, as TRL's prediction_step); a dict / IterableDataset works."""
    tokenizer, student, teacher = pair
    data = make_tiny_datasets(n=8)["messages"]
    trainer = _trainer(tmp_path, copy.deepcopy(student), teacher, data, tokenizer, lmbda=1.0,
                       eval_dataset={"a": data.select(range(4)), "b": data.select(range(4, 8)).to_iterable_dataset()})
    metrics = trainer.evaluate()
    for name in ("a", "b"):
        # the same per-token sums divided by the same count (each eval micro-batch's completion tokens), averaged over the
        # micro-batches by two paths: equal up to float32 rounding of those divisions and means (~1e-7 relative); 1e-5 = 100x
        assert metrics[f"eval_{name}_loss"] > 0 and metrics[f"eval_{name}_divergence"] == pytest.approx(metrics[f"eval_{name}_loss"], rel=1e-5)
        assert f"eval_{name}_on_policy" not in metrics  # no micro-batch was sampled
