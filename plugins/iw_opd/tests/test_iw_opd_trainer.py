"""IW-OPD trainer: learning toward the tiny trained teacher, exact resume, gradient-accumulation invariance, data formats,
evaluation, and the one-line errors."""

from __future__ import annotations

import copy
import json
import os
import random

import pytest
import torch

import posttrain
from posttrain import ConfigError


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("iw_opd", allow_experimental=True)
    yield


def _classes():
    from posttrain_iw_opd import IWOPDConfig, IWOPDTrainer

    return IWOPDConfig, IWOPDTrainer


def _config(path, **overrides):
    IWOPDConfig, _ = _classes()
    values = dict(output_dir=str(path), per_device_train_batch_size=4, max_completion_length=6, max_length=64, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False, seed=0)
    values.update(overrides)
    return IWOPDConfig(**values)


def _prompts(n=16):
    return [{"prompt": f"what is {i} + {i % 7}"} for i in range(n)]


@pytest.fixture(scope="module")
def models():
    """A tiny random student and a wider random teacher on the same tokenizer."""
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, seed=0), build_model(tokenizer, hidden_size=48, seed=3)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- learning
def test_student_moves_toward_the_trained_teacher(tiny_teacher_dir, tmp_path):
    """On-policy IW-OPD pulls a student back to the tiny trained teacher: held-out KL falls, the answer format comes back.

    The student is the teacher with seeded Gaussian noise (std = each weight matrix's own std) on every matrix: it starts
    off the teacher's format (it never answers ``\\boxed{N}<|im_end|>`` greedily) but close enough that its own samples
    reach the teacher's support, the regime on-policy distillation is for. Measured (1 and 2 threads): KL 0.60 -> 0.06,
    format accuracy 0.0 -> 1.0 in 20 steps. (A randomly initialized tiny student learns far more slowly from the sampled-token
    signal: KL 5.6 -> 3.0 in 60 steps, format still 0; see the docs page.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.testing import distillation_report
    from posttrain.testing import arithmetic_prompts

    _, IWOPDTrainer = _classes()
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=generator) * p.std())
    held_out = arithmetic_prompts(16, seed=99)
    before = distillation_report(student, teacher, tokenizer, held_out)
    args = _config(tmp_path, per_device_train_batch_size=16, max_completion_length=8, max_length=96, max_steps=20, learning_rate=3e-3)
    trainer = IWOPDTrainer(model=student, teacher_model=tiny_teacher_dir, args=args, train_dataset=arithmetic_prompts(64, seed=0), processing_class=tokenizer)
    trainer.train()
    after = distillation_report(trainer.model, teacher, tokenizer, held_out)
    print(f"before {before}\nafter  {after}")
    assert before["format_accuracy"] <= 0.25 and before["kl_to_teacher"] > 0.3, before
    assert after["kl_to_teacher"] < 0.5 * before["kl_to_teacher"], (before, after)
    assert after["format_accuracy"] >= before["format_accuracy"] + 0.5, (before, after)
    logged = _metrics(args.output_dir)
    assert all(k in logged[0] for k in ("teacher_kl", "teacher_entropy", "entropy", "iw_opd/mean_weight", "iw_opd/min_weight", "completions/mean_length"))
    assert all(1.0 <= row["iw_opd/min_weight"] <= row["iw_opd/max_weight"] <= 1.5 for row in logged)  # gamma 0.5


# ----------------------------------------------------------------------------- resume and accumulation
@pytest.mark.parametrize("objective", ["iw_opd", "jsd"])
def test_resume_is_bit_exact(models, tmp_path, objective):
    """4 steps straight == 2 steps, a checkpoint, a fresh trainer, 2 resumed steps: every weight bit-equal."""
    tokenizer, student, teacher = models
    _, IWOPDTrainer = _classes()
    plan = dict(max_steps=4, save_strategy="steps", save_steps=2, distillation_objective=objective)
    full = IWOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=_config(tmp_path / "full", **plan),
                        train_dataset=_prompts(), processing_class=tokenizer)
    full.train()
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    resumed = IWOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=_config(tmp_path / "resumed", **plan),
                           train_dataset=_prompts(), processing_class=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected, got = full.model.state_dict(), resumed.model.state_dict()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, differ[:3]
    assert [r["loss"] for r in _metrics(tmp_path / "resumed")] == [r["loss"] for r in _metrics(tmp_path / "full")][2:]


class _FixedBackend:
    """Deterministic completions that depend only on the prompt (so different micro-batch layouts train on the same rollout)."""

    name = "fixed"

    def __init__(self):
        self.policy_version = 0

    def generate(self, prompt_ids, sampling):
        from posttrain import RolloutBatch

        prompts, completions, logprobs, truncated = [], [], [], []
        for p in prompt_ids:
            for k in range(sampling.n):
                rng = random.Random(hash((tuple(p), k)) % (2**31))
                length = rng.randint(1, sampling.max_tokens)
                prompts.append(list(p))
                completions.append([rng.randrange(3, 400) for _ in range(length)])
                logprobs.append([-1.0] * length)
                truncated.append(length == sampling.max_tokens)
        return RolloutBatch(prompts, completions, logprobs, truncated, policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


@pytest.mark.parametrize("objective", ["iw_opd", "jsd"])
def test_gradient_accumulation_is_invariant(models, tmp_path, objective):
    """Same fixed rollout: batch 8 x GA 1, 2 x 4 and 1 x 8 give the same update (float64; the loss is a token sum over the step's
    completion tokens and the IW-OPD weights are per sequence, so only summation order differs: measured <= 1e-13 relative)."""
    from posttrain import RolloutEngine

    tokenizer, student, teacher = models
    _, IWOPDTrainer = _classes()
    initial = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    updates = []
    for bs, ga in ((8, 1), (2, 4), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0,
                       adam_epsilon=1.0, max_grad_norm=0.0, distillation_objective=objective,
                       **(dict(loss_top_k=0, beta=0.5) if objective == "jsd" else {}))
        trainer = IWOPDTrainer(model=copy.deepcopy(student).double(), teacher_model=copy.deepcopy(teacher).double(), args=args,
                               train_dataset=_prompts(), processing_class=tokenizer, rollout_engine=RolloutEngine(_FixedBackend()))
        trainer.train()
        updates.append({n: p.detach().clone() - initial[n] for n, p in trainer.model.named_parameters()})
    worst = 0.0
    for other in updates[1:]:
        for name, update in updates[0].items():
            assert update.norm() > 0, name
            rel = ((update - other[name]).norm() / update.norm()).item()
            worst = max(worst, rel)
            assert rel <= 1e-9, f"{name}: updates differ by {rel:.2e} relative"
    print(f"worst relative update difference: {worst:.2e}")


# ----------------------------------------------------------------------------- data formats and evaluation
def test_trl_messages_rows_and_evaluation(models, tmp_path):
    """TRL's ``messages`` rows train (a trailing assistant turn is dropped: the student generates); evaluate() rolls out the eval prompts."""
    tokenizer, student, teacher = models
    _, IWOPDTrainer = _classes()
    rows = [{"messages": [{"role": "user", "content": f"what is {i} + 1"}, {"role": "assistant", "content": str(i + 1)}]} for i in range(8)]
    trainer = IWOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=_config(tmp_path, num_generations=2),
                           train_dataset=rows, eval_dataset=_prompts(4), processing_class=tokenizer)
    first = trainer.train_dataset[0]
    assert first["prompt"] == [{"role": "user", "content": "what is 0 + 1"}] and "messages" not in first
    trainer.train()
    metrics = trainer.evaluate()
    assert all(k in metrics for k in ("eval_loss", "eval_teacher_kl", "eval_entropy")), metrics
    assert all(map(torch.isfinite, map(torch.tensor, (metrics["eval_loss"], metrics["eval_teacher_kl"]))))


def test_prompts_are_cut_to_max_prompt_length(models, tmp_path):
    tokenizer, student, teacher = models
    _, IWOPDTrainer = _classes()
    trainer = IWOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=_config(tmp_path, max_prompt_length=3),
                           train_dataset=_prompts(), processing_class=tokenizer)
    full = tokenizer("what is 10 + 3", add_special_tokens=False)["input_ids"]
    assert len(full) > 3 and trainer._prompt_ids({"prompt": "what is 10 + 3"}) == full[:3]  # truncation_side 'right', as TRL's collator


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("overrides, match", [
    (dict(lmbda=0.5), r"lmbda=0.5 is not offered: IW-OPD is an on-policy objective"),
    (dict(distillation_objective="jsd", lmbda=0.5), r"lmbda=0.5 is not offered.*gkd plugin"),
    (dict(lmbda=1.5), r"lmbda=1.5 is invalid"),
    (dict(beta=2.0), r"beta=2.0 is invalid"),
    (dict(distillation_objective="kl"), r"distillation_objective='kl' is invalid: use one of 'iw_opd', 'jsd'"),
    (dict(reverse_kl_top_1_mode="argmax"), r"requires reverse_kl_top_1_mode='sampled'"),
    (dict(iw_opd_gamma=-1.0), r"iw_opd_gamma=-1.0 is invalid"),
    (dict(iw_opd_epsilon=0.0), r"iw_opd_epsilon=0.0 is invalid"),
    (dict(max_completion_length=64), r"max_completion_length \(64\) must be smaller than max_length \(64\)"),
    (dict(per_device_train_batch_size=3, num_generations=2), r"generation_batch_size \(1\) \* num_generations \(2\) must equal"),
    (dict(use_teacher_server=True, teacher_model_server_url="http://localhost:8000"), r"use_teacher_server.*server_distill plugin"),
    (dict(vllm_sync_frequency=2), r"vllm_sync_frequency=2 is not offered"),
    (dict(loss_top_k=-1), r"loss_top_k=-1 is invalid"),
    (dict(teacher_model_init_kwargs="{bad"), r"teacher_model_init_kwargs='\{bad' is not a JSON object"),
])
def test_config_errors_are_one_line(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        _config(tmp_path, **overrides)
    assert "\n" not in str(info.value)


def test_trainer_errors_are_one_line(models, tmp_path):
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tokenizer, student, teacher = models
    _, IWOPDTrainer = _classes()
    cases = [
        (dict(train_dataset=_prompts()), r"IW-OPD needs a teacher: pass teacher_model="),
        (dict(teacher_model=teacher, train_dataset=None), r"`train_dataset` is required"),
        (dict(teacher_model=teacher, train_dataset=_prompts(), data_collator=lambda rows: rows), r"data_collator is not supported"),
        (dict(teacher_model=teacher, train_dataset=[{"text": "hi"}] * 4), r"train_dataset row 0 has no 'prompt' column"),
        (dict(teacher_model=teacher, train_dataset=_prompts(), optimizers=(object(), None)), r"optimizers=\(optimizer, scheduler\) is not supported"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match) as info:
            IWOPDTrainer(model=copy.deepcopy(student), args=_config(tmp_path / "x"), processing_class=tokenizer, **kwargs)
        assert "\n" not in str(info.value)
    other = build_model(build_tokenizer(vocab_size=300), seed=0)  # another vocabulary, no loadable tokenizer to compare
    with pytest.raises(ConfigError, match=r"teacher's vocabulary \(\d+ rows\) differs from the student's .* gold plugin"):
        IWOPDTrainer(model=copy.deepcopy(student), teacher_model=other, args=_config(tmp_path / "y"), train_dataset=_prompts(), processing_class=tokenizer)


def test_teacher_with_another_tokenizer_points_to_gold(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from posttrain.testing.tiny_model import build_model, build_tokenizer

    _, IWOPDTrainer = _classes()
    other_dir = str(tmp_path / "other")
    other_tokenizer = build_tokenizer(vocab_size=300, seed=5)
    build_model(other_tokenizer, seed=1).save_pretrained(other_dir)
    other_tokenizer.save_pretrained(other_dir)
    with pytest.raises(ConfigError, match=r"the teacher's tokenizer differs from the student's.*gold plugin") as info:
        IWOPDTrainer(model=tiny_model_dir, teacher_model=other_dir, args=_config(tmp_path / "run"), train_dataset=_prompts(),
                     processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert "\n" not in str(info.value)
