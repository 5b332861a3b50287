"""Training behaviour of SFTTrainer: parameters move, logs are written, GA is exact, packing is exact, PEFT, resume, learning."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from datasets import Dataset

from posttrain_sft import SFTTrainer
from posttrain_sft.trainer import pack_bfd
from posttrain.testing import warning_events


def _uneven_texts(n: int = 8) -> Dataset:
    words = "the cat sat on the red mat and the dog said hello world please think step".split()
    return Dataset.from_dict({"text": [" ".join(words[: 2 + 2 * i]) for i in range(n)]})


def test_init_minimal(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    trainer = SFTTrainer(model=tiny_model, args=make_config(), train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer)
    assert len(trainer.train_dataset) == len(tiny_datasets["text"])
    assert trainer.model is tiny_model and trainer.processing_class is tiny_tokenizer


def test_train_changes_every_parameter_and_writes_logs(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    args = make_config(learning_rate=1e-2, logging_steps=1)
    output = SFTTrainer(model=tiny_model, args=args, train_dataset=tiny_datasets["messages"], processing_class=tiny_tokenizer).train()
    assert output.global_step == 2 and output.training_loss > 0
    for name, param in tiny_model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"
    lines = [json.loads(line) for line in open(os.path.join(args.output_dir, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [1, 2]
    for key in ("loss", "learning_rate", "grad_norm", "epoch", "mean_token_accuracy", "entropy", "tokens_per_second"):
        assert key in lines[-1], key
    manifest = json.load(open(os.path.join(args.output_dir, "run_manifest.json")))
    assert (manifest["method"], manifest["distribution"], manifest["maturity"]) == ("sft", "posttrain-sft", "stable")
    assert os.path.isfile(os.path.join(args.output_dir, "model.safetensors"))


def test_train_accepts_model_path(tiny_model_dir, tiny_datasets, make_config):
    trainer = SFTTrainer(model=tiny_model_dir, args=make_config(max_steps=1), train_dataset=tiny_datasets["prompt_completion"])
    assert trainer.processing_class.eos_token == "<|im_end|>"
    assert trainer.train().global_step == 1


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, make_config, loss_type, tmp_path):
    """One optimizer step over the same 8 uneven sequences gives the same parameters either way.

    float64: the two layouts sum the same per-token losses in different orders, which float64 makes
    negligible (~1e-16 relative), so a 1e-10 tolerance holds on any machine and a mis-scaled
    micro-batch (a relative error ~1e-1) cannot hide in it.
    """
    from posttrain.testing.tiny_model import build_model

    # adam_epsilon=1 makes Adam's first update ~ lr * grad, so a mis-scaled gradient shows in the parameters
    common = dict(max_steps=1, learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, loss_type=loss_type)
    results = []
    for batch_size, gas in ((8, 1), (1, 8)):
        model = build_model(tiny_tokenizer).double()
        args = make_config(per_device_train_batch_size=batch_size, gradient_accumulation_steps=gas, output_dir=str(tmp_path / f"ga-{batch_size}"), **common)
        SFTTrainer(model=model, args=args, train_dataset=_uneven_texts(), processing_class=tiny_tokenizer).train()
        results.append(dict(model.named_parameters()))
    initial = dict(build_model(tiny_tokenizer).double().named_parameters())
    moved = max((results[0][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4  # the step is not trivial
    for name in initial:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-10, atol=1e-12, msg=name)


def _loss_and_grads(trainer, model, examples):
    model.zero_grad()
    batch = trainer.collate(examples)
    loss, _ = trainer.compute_loss(model, batch, trainer.count_items(batch))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("layout", [{"packing": True, "max_length": 64}, {"padding_free": True, "max_length": None}])
def test_packed_loss_and_gradients_equal_padded(tiny_model, tiny_tokenizer, tiny_datasets, make_config, layout):
    """Packed / padding-free rows give the padded loss and gradients: no attention or labels cross sequences.

    float64, so the different shapes (and summation orders) of the two layouts leave ~1e-16 relative
    differences and a tight tolerance holds on any machine.
    """
    data = tiny_datasets["conversational_prompt_completion"]
    padded = SFTTrainer(model=tiny_model.double(), args=make_config(), train_dataset=data, processing_class=tiny_tokenizer)
    packed = SFTTrainer(model=copy.deepcopy(tiny_model), args=make_config(**layout), train_dataset=data, processing_class=tiny_tokenizer)
    if layout.get("packing"):
        assert len(packed.train_dataset) < len(padded.train_dataset)  # rows really hold several sequences
    padded_rows, packed_rows = list(padded.train_dataset), list(packed.train_dataset)
    batch = packed.collate(packed_rows)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["num_label_tokens"] == padded.collate(padded_rows)["num_label_tokens"]
    loss_a, grads_a = _loss_and_grads(padded, padded.model, padded_rows)
    loss_b, grads_b = _loss_and_grads(packed, packed.model, packed_rows)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-12, msg=name)


def test_packed_rows_do_not_attend_across_sequences(tiny_model, tiny_tokenizer, make_config):
    """Changing the first sequence of a packed row leaves the second sequence's logits unchanged (float64: tight tolerance)."""
    tiny_model.double()
    trainer = SFTTrainer(model=tiny_model, args=make_config(padding_free=True, max_length=None), train_dataset=_uneven_texts(2), processing_class=tiny_tokenizer)
    first, second = trainer.train_dataset
    other = {"input_ids": [t + 1 for t in first["input_ids"]], "labels": first["labels"]}
    with torch.no_grad():
        batches = [trainer.collate([a, second]) for a in (first, other)]
        # use_cache=False: with a KV cache transformers ignores the packed position_ids (compute_loss passes it too)
        logits = [tiny_model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits for b in batches]
    n = len(first["input_ids"])
    torch.testing.assert_close(logits[0][:, n:], logits[1][:, n:], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(logits[0][:, :n], logits[1][:, :n])


def test_pack_bfd_places_every_sequence_once_within_max_length():
    examples = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (7, 3, 5, 2, 8, 1, 4)]
    rows = pack_bfd(examples, max_length=10)
    assert sorted(n for row in rows for n in row["seq_lengths"]) == [1, 2, 3, 4, 5, 7, 8]
    assert all(sum(row["seq_lengths"]) == len(row["input_ids"]) <= 10 for row in rows)
    assert len(rows) == 3  # 30 tokens into rows of 10: best fit is optimal here


def test_peft_lora_saves_adapter(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    from peft import LoraConfig

    args = make_config(max_steps=1, save_strategy="steps", save_steps=1, learning_rate=1e-2)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer, peft_config=peft_config)
    trainer.train()
    for directory in (args.output_dir, os.path.join(args.output_dir, "checkpoint-1")):
        assert os.path.isfile(os.path.join(directory, "adapter_model.safetensors")), directory
        assert not os.path.isfile(os.path.join(directory, "model.safetensors"))


def test_resume_reproduces_losses(tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    """Resuming from checkpoint-2 gives the uninterrupted run's losses of steps 3 and 4.

    float64 (the checkpoint stores float64 weights and optimizer state): the same computation then
    agrees to ~1e-16 even where an accelerator's kernels are not bit-reproducible, so 1e-12 holds
    anywhere, while a wrong restored state (weights, Adam moments, schedule, data order) moves the loss
    by far more.
    """
    from posttrain.testing.tiny_model import build_model

    def losses(output_dir):
        return [json.loads(line)["loss"] for line in open(os.path.join(output_dir, "metrics.jsonl")) if "loss" in json.loads(line)]

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=1e-2)
    full = make_config(output_dir=str(tmp_path / "full"), **common)
    SFTTrainer(model=build_model(tiny_tokenizer).double(), args=full, train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer).train()
    resumed = make_config(output_dir=str(tmp_path / "resumed"), resume_from_checkpoint=True, **common)
    shutil.copytree(os.path.join(full.output_dir, "checkpoint-2"), os.path.join(resumed.output_dir, "checkpoint-2"))
    SFTTrainer(model=build_model(tiny_tokenizer).double(), args=resumed, train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer).train()
    assert losses(resumed.output_dir) == pytest.approx(losses(full.output_dir)[2:], rel=1e-12)


def test_training_learns_arithmetic(tiny_tokenizer, make_config):
    """A tiny model learns 'what is a + b' answers: the held-out completion loss drops by more than 30%."""
    import random

    from posttrain.testing.tiny_model import build_model

    rng = random.Random(0)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)

    def rows(chunk):
        return Dataset.from_dict(
            {
                "prompt": [[{"role": "user", "content": f"what is {a} + {b}"}] for a, b in chunk],
                "completion": [[{"role": "assistant", "content": str(a + b)}] for a, b in chunk],
            }
        )

    args = make_config(max_steps=40, per_device_train_batch_size=16, learning_rate=3e-3, warmup_steps=2, logging_steps=10)
    model = build_model(tiny_tokenizer, hidden_size=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(pairs[:80]), eval_dataset=rows(pairs[80:]), processing_class=tiny_tokenizer)
    before = trainer.loop.evaluate(trainer)["eval_loss"]
    after = trainer.train().metrics["eval_loss"]
    print(f"held-out completion loss: before {before:.3f}, after {after:.3f}")
    assert after < 0.7 * before
    assert warning_events(args.output_dir) == []  # a healthy run raises no false alarm


def test_example_config_runs_from_the_cli(tiny_model_dir, tmp_path):
    """examples/sft.yaml trains through `posttrain train sft` (shortened to 2 steps)."""
    import subprocess
    import sys

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    command = [sys.executable, "-m", "posttrain", "train", "sft", "--config", os.path.join(root, "examples", "sft.yaml"),
               "--model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "cli"), "--max_steps", "2", "--disable_tqdm", "true"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "cli" / "model.safetensors")
