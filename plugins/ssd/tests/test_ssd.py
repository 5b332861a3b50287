"""SSD: learning on the tiny arithmetic task (the paper's support compression), exact resume, what holds under
gradient accumulation, evaluation, the filter, and one-line errors. Parity with TRL 1.15: test_ssd_parity.py."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import posttrain
from posttrain import ConfigError, RolloutBatch
from posttrain.testing import arithmetic_prompts, distillation_report


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("ssd", allow_experimental=True)
    yield


def _config(tmp_path, **overrides):
    from posttrain_ssd import SSDConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=6, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False, filter_empty=False)
    values.update(overrides)
    return SSDConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _prompt_ids(tokenizer, row):
    return tokenizer(tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]


@torch.no_grad()
def tail_mass(model, tokenizer, rows, k: int) -> float:
    """Mean probability (temperature 1) outside the k likeliest tokens, at each token of the held-out answers ``\\boxed{A+B}<|im_end|>``."""
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        ids = _prompt_ids(tokenizer, row)
        answer = tokenizer(f"\\boxed{{{row['solution']}}}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        probs = torch.softmax(model(input_ids=torch.tensor([ids + answer])).logits[0, len(ids) - 1 : -1].double(), -1)
        total += float((1.0 - probs.topk(k, dim=-1).values.sum(-1)).sum())
        count += len(answer)
    return total / count


def test_ssd_compresses_the_distractor_tail_of_a_trained_model(tiny_teacher_dir, tmp_path):
    """The paper's mechanism on a tiny version of its setting: a model that already answers (the tiny trained teacher
    as the model being self-distilled, no other model involved) samples its own answers with top-k truncation
    (rho_train: top_k=5, T_train=1) and is fine-tuned on them. The probability it keeps outside its top 5 tokens on
    held-out answers (the distractor tail) must fall, without losing the greedy answer format.

    Measured (seeds 0 and 1, 1 and 2 threads): tail mass 0.086 -> 0.031 / 0.037; greedy format accuracy 1.0 -> 1.0;
    forward KL from the starting model 0 -> 0.15 / 0.12 nats/token (distillation_report against the frozen start).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain_ssd import SSDTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    start = copy.deepcopy(model)
    held_out = arithmetic_prompts(32, seed=777)
    tail_before = tail_mass(model, tokenizer, held_out, k=5)
    report_before = distillation_report(model, start, tokenizer, held_out)
    args = _config(tmp_path, max_steps=10, per_device_train_batch_size=16, learning_rate=1e-3, temperature=1.0, top_k=5, max_completion_length=8, seed=0)
    trainer = SSDTrainer(model=model, args=args, train_dataset=arithmetic_prompts(256, seed=5), processing_class=tokenizer)
    trainer.train()
    tail_after = tail_mass(trainer.model, tokenizer, held_out, k=5)
    report_after = distillation_report(trainer.model, start, tokenizer, held_out)
    print(f"tail mass {tail_before:.4f} -> {tail_after:.4f}; report {report_before} -> {report_after}")
    assert tail_after < 0.7 * tail_before, (tail_before, tail_after)
    assert report_after["format_accuracy"] >= 0.9, report_after
    entropies = [m["entropy"] for m in _metrics(args.output_dir) if "entropy" in m]
    assert len(entropies) == 10 and sum(entropies[-3:]) < sum(entropies[:3]), entropies


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2), resume: steps 4-5 log the same losses and samples.

    float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible, while a wrongly
    restored state (weights, rollout buffer, Adam moments, schedule, sampling seed) moves the loss by far more.
    """
    from posttrain_ssd import SSDTrainer

    tiny_model.double()
    rows = [{"prompt": f"what is {i} + {i % 7}"} for i in range(16)]
    args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2)
    SSDTrainer(model=copy.deepcopy(tiny_model), args=args, train_dataset=rows, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir) if "loss" in m}
    resumed_args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    SSDTrainer(model=copy.deepcopy(tiny_model), args=resumed_args, train_dataset=rows, processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir) if "loss" in m}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["completions/mean_length"] == full[step]["completions/mean_length"], step


def _fixed_rollout(tokenizer, prompt_ids, lengths):
    completions = [[(17 + 5 * i + j) % 200 + 20 for j in range(n)] for i, n in enumerate(lengths)]
    return RolloutBatch(prompt_ids, completions, [[0.0] * n for n in lengths], [False] * len(lengths))


def test_accumulation_what_holds(tiny_model, tiny_tokenizer, tmp_path):
    """TRL's SSD loss is a token mean PER MICRO-BATCH, averaged over the micro-batches: so 2 micro-batches of 2 give the
    gradient of 1 batch of 4 exactly when the micro-batches hold as many completion tokens, and otherwise weight each
    micro-batch's tokens by 1 / (its tokens x micro-batches) (both checked, float64)."""
    from posttrain_ssd import SSDTrainer

    tiny_model.double()
    rows = [{"prompt": f"what is {i} + 1"} for i in range(4)]
    trainer = SSDTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer)
    prompt_ids = [trainer._prompt_ids(r) for r in rows]

    def grads(rollout, size):
        trainer.model.zero_grad(set_to_none=True)
        for batch in trainer.micro_batches(rollout, size):
            trainer.compute_loss(trainer.model, batch, None)[0].backward()
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])

    even = _fixed_rollout(tiny_tokenizer, prompt_ids, [3, 5, 6, 2])  # 8 tokens in each half
    one, two = grads(even, 4), grads(even, 2)
    # different padding widths: transformers' float32 rotary tables and masks leave ~5e-9 relative (measured); a wrong weighting, ~1e-1
    assert float((one - two).abs().max()) <= 1e-6 * float(one.abs().max())
    uneven = _fixed_rollout(tiny_tokenizer, prompt_ids, [1, 1, 6, 6])  # 2 vs 12 tokens
    one, two = grads(uneven, 4), grads(uneven, 2)
    assert float((one - two).abs().max()) > 1e-2 * float(one.abs().max())
    # the per-micro-batch mean, written out: tokens of half h weigh 1 / (tokens_h * 2)
    trainer.model.zero_grad(set_to_none=True)
    from posttrain import completion_logps

    total = 0.0
    for batch in trainer.micro_batches(uneven, 2):
        logps = completion_logps(trainer.model, batch, 1.0, compute_entropy=False)[0]
        total = total + (-logps * batch["completion_mask"]).sum() / (batch["completion_mask"].sum() * 2)
    total.backward()
    manual = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    assert float((two - manual).abs().max()) <= 1e-9 * float(two.abs().max())


def test_filter_empty_masks_stubs_and_logs_the_active_ratio(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_ssd import SSDTrainer
    from posttrain_ssd.trainer import is_stub_completion

    assert is_stub_completion("") and is_stub_completion("  \n ") and is_stub_completion("\\boxed{7}")
    assert not is_stub_completion("\\boxed{10}") and not is_stub_completion("a\nb")
    rows = [{"prompt": "p one"}, {"prompt": "p two"}]
    trainer = SSDTrainer(model=tiny_model, args=_config(tmp_path, filter_empty=True), train_dataset=rows, processing_class=tiny_tokenizer)
    ids = [tiny_tokenizer("hi", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id],
           tiny_tokenizer("line one\nline two", add_special_tokens=False)["input_ids"]]
    rollout = RolloutBatch([trainer._prompt_ids(r) for r in rows], ids, [[0.0] * len(c) for c in ids], [False, True])
    (batch,) = trainer.micro_batches(rollout, 2)
    assert batch["completion_mask"].sum(1).tolist() == [0, len(ids[1])]
    metrics = dict(zip(batch["rollout_metric_names"], batch["rollout_metric_values"].tolist()))
    assert metrics["ssd/active_sample_ratio"] == 0.5 and metrics["completions/clipped_ratio"] == 0.5


def test_train_and_evaluate_conversational(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_ssd import SSDTrainer

    rows = arithmetic_prompts(8, seed=3)
    trainer = SSDTrainer(model=tiny_model, args=_config(tmp_path, max_prompt_length=12), train_dataset=rows, eval_dataset=rows[:2],
                         processing_class=tiny_tokenizer)
    assert all(len(trainer._prompt_ids(r)) == 12 for r in rows)  # kept from the left: the end of the chat template stays
    assert trainer._prompt_ids(rows[0])[-3:] == _prompt_ids(tiny_tokenizer, rows[0])[-3:]
    trainer.train()
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_entropy" in metrics, metrics


@pytest.mark.parametrize("overrides, needle", [
    ({"temperature": 0.0}, "temperature=0.0 is invalid"),
    ({"max_prompt_length": 0}, "max_prompt_length=0 is invalid"),
    ({"max_completion_length": 0}, "max_completion_length=0 is invalid"),
    ({"num_iterations": 0}, "num_iterations=0 is invalid"),
    ({"steps_per_generation": 3}, "steps_per_generation=3 is not offered"),
    ({"top_p": 0.0}, "top_p=0.0 are invalid"),
    ({"vllm_mode": "remote"}, "vllm_mode='remote' is invalid"),
])
def test_config_errors_are_one_line(tmp_path, overrides, needle):
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, **overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_trainer_errors_are_one_line(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_ssd import SSDTrainer

    cases = [
        (dict(train_dataset=None), "`train_dataset` is required"),
        (dict(train_dataset=[{"question": "hi"}]), "train_dataset row 0 has no 'prompt' column"),
        (dict(train_dataset=[{"prompt": "hi"}], optimizers=(torch.optim.SGD(tiny_model.parameters(), lr=0.1), None)), "optimizers=(optimizer, scheduler) is not supported"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ConfigError) as err:
            SSDTrainer(model=tiny_model, args=_config(tmp_path), processing_class=tiny_tokenizer, **kwargs)
        assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)
