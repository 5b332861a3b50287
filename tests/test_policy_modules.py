"""A module trained as part of the policy (``TrainingLoop.add_policy_module``): the shape of a PPO value head.

The toy value-head method (posttrain.testing._toy.ToyValueHeadTrainer) puts a ``Linear(hidden, 1)`` on the toy LM's
last hidden states and regresses the tokens left in each row. Checked: the head and the trunk both learn from its loss
through the policy's one optimizer; every checkpoint and output_dir hold ``value_head.safetensors`` beside the policy's
``model.safetensors``, which keeps only the policy's weights (transformers loads it with no unexpected key); a resumed
run reproduces the uninterrupted one exactly, in one process and on 2 processes (DDP); bad uses are one-line errors.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain import ConfigError
from posttrain.testing._toy import TOY_VALUE_HEAD_SPEC, ToyConfig, ToyValueHeadTrainer, toy_sequences

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "toy_train.py")


@pytest.fixture
def toy_value_head(register_method):
    register_method(TOY_VALUE_HEAD_SPEC)


def _trainer(model_dir, out, **kw):
    settings = dict(disable_tqdm=True, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6, save_strategy="steps", save_steps=3, seed=3)
    args = ToyConfig(output_dir=out, **{**settings, **kw})
    return ToyValueHeadTrainer(model=model_dir, args=args, train_dataset=toy_sequences(32, vocab=500))


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def test_the_value_head_trains_with_the_policy_and_is_saved_beside_it(toy_value_head, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    full = str(tmp_path / "full")
    trainer = _trainer(tiny_model_dir, full)
    head = trainer.loop.policy_module("value_head")
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    trainer.train()
    rows = _rows(full)
    assert rows[6]["value_loss"] < rows[1]["value_loss"]  # the head learns its regression target
    assert any(not torch.equal(head_before[k], v) for k, v in head.state_dict().items())
    for directory in (os.path.join(full, "checkpoint-3"), full):
        saved = load_file(os.path.join(directory, "value_head.safetensors"))
        assert set(saved) == {"weight", "bias"}
        assert not any(k.startswith("value_head") for k in load_file(os.path.join(directory, "model.safetensors")))
        model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)  # plain transformers
        assert not info["unexpected_keys"] and not info["missing_keys"], info
    final = load_file(os.path.join(full, "value_head.safetensors"))
    assert all(torch.equal(final[k], v) for k, v in head.state_dict().items())

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    _trainer(tiny_model_dir, resumed).train(resume_from_checkpoint=True)
    again = _rows(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):  # one process repeats the same ops: bit-identical
        assert (again[step]["loss"], again[step]["value_loss"]) == (rows[step]["loss"], rows[step]["value_loss"])
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_value_heads_loss_reaches_the_trunk(toy_value_head, tiny_model_dir, tmp_path):
    """One optimizer for policy and head: the head's loss alone moves the trunk's parameters."""
    trainer = _trainer(tiny_model_dir, str(tmp_path / "run"))
    model = trainer.loop.unwrapped_model()
    batch = trainer.collate(trainer.train_dataset[:4])
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    trainer.loop.policy_module("value_head")(out.hidden_states[-1]).pow(2).sum().backward()
    trunk = [p for n, p in model.named_parameters() if n.startswith("model.layers.")]
    assert trunk and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk[:2])
    assert "value_head.weight" in {n for n, _ in model.named_parameters()}  # the optimizer is built from these


def test_a_checkpoint_without_the_head_is_refused_on_resume(toy_value_head, tiny_model_dir, tmp_path):
    out, again = str(tmp_path / "run"), str(tmp_path / "again")
    _trainer(tiny_model_dir, out, max_steps=3).train()
    os.makedirs(again)
    shutil.copytree(os.path.join(out, "checkpoint-3"), os.path.join(again, "checkpoint-3"))
    os.remove(os.path.join(again, "checkpoint-3", "value_head.safetensors"))
    with pytest.raises(FileNotFoundError, match="value_head.safetensors"):
        _trainer(tiny_model_dir, again, max_steps=3).train(resume_from_checkpoint=True)


def test_bad_uses_of_add_policy_module_are_one_line_errors(toy_value_head, tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="already has an attribute 'value_head'"):
        trainer.loop.add_policy_module("value_head", torch.nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="already has an attribute 'lm_head'"):
        trainer.loop.add_policy_module("lm_head", torch.nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="is invalid"):
        trainer.loop.add_policy_module("value head", torch.nn.Linear(2, 1))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        trainer.loop.add_policy_module("other", torch.nn.Linear(2, 1).requires_grad_(False))
    with pytest.raises(KeyError, match="added: \\['value_head'\\]"):
        trainer.loop.policy_module("critic")
    trainer.args.save_strategy = "no"
    trainer.train()
    with pytest.raises(ConfigError, match="after training started"):
        trainer.loop.add_policy_module("late", torch.nn.Linear(2, 1))


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.distributed
def test_the_value_head_resumes_exactly_on_two_processes(tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    config = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_steps": 4,
              "save_strategy": "steps", "save_steps": 2, "save_total_limit": 5, "seed": 3, "disable_tqdm": True, "use_cpu": True}

    def run(out, **extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, tiny_model_dir,
               json.dumps({**config, "output_dir": out, **extra}), "--value-head"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run(full)
    assert "value_head.safetensors" in os.listdir(os.path.join(full, "checkpoint-2"))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run(resumed, resume_from_checkpoint=True)
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert (got[step]["loss"], got[step]["value_loss"]) == (expected[step]["loss"], expected[step]["value_loss"]), step
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert expected[4]["value_loss"] < expected[1]["value_loss"]
