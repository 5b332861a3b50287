"""Several models in one loop: a trainable auxiliary (the shape of a PPO critic) with its own optimizer and schedule.

The toy critic method (posttrain.testing._toy.ToyCriticTrainer) trains the toy LM and, beside it, a sequence-classification
model regressing each row's length, through ``TrainingLoop.add_trainable_model``. Checked: the critic learns with its
own learning rate, its checkpoint holds its weights (loadable with transformers), optimizer and schedule, and a run
resumed from a checkpoint reproduces the uninterrupted one exactly, in one process, on 2 processes (DDP) and under
DeepSpeed ZeRO-2.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from posttrain import ConfigError
from posttrain.testing._toy import TOY_CRITIC_SPEC, ToyCriticConfig, ToyCriticTrainer, toy_sequences

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "toy_train.py")


@pytest.fixture
def toy_critic(register_method):
    register_method(TOY_CRITIC_SPEC)


def _trainer(model_dir, out, **kw):
    args = ToyCriticConfig(output_dir=out, disable_tqdm=True, per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6,
                           save_strategy="steps", save_steps=3, seed=3, **kw)
    return ToyCriticTrainer(model=model_dir, args=args, train_dataset=toy_sequences(32, vocab=500))


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_the_critic_trains_with_its_own_optimizer_and_resumes_exactly(toy_critic, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    full = str(tmp_path / "full")
    trainer = _trainer(tiny_model_dir, full)
    before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    trainer.train()
    rows = _rows(full)
    assert sorted(rows) == [1, 2, 3, 4, 5, 6] and all("critic_loss" in r and "critic_value" in r for r in rows.values())
    assert rows[6]["critic_loss"] < rows[1]["critic_loss"]  # the critic learns its regression target
    ckpt = os.path.join(full, "checkpoint-3")
    assert {"critic", "scheduler_critic.pt", "optimizer.bin", "optimizer_1.bin"} <= set(os.listdir(ckpt))
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(full, "critic"))  # plain transformers loads it
    trained = trainer.loop.trainable_model("critic").state_dict()
    assert all(torch.equal(critic.state_dict()[k], trained[k]) for k in trained)
    assert any(not torch.equal(before[k], trained[k]) for k in before)

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(ckpt, os.path.join(resumed, "checkpoint-3"))
    _trainer(tiny_model_dir, resumed).train(resume_from_checkpoint=True)
    again = _rows(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in (4, 5, 6):  # one process repeats the same ops: bit-identical
        assert (again[step]["loss"], again[step]["critic_loss"]) == (rows[step]["loss"], rows[step]["critic_loss"])
    for name in ("", "critic"):
        a, b = _weights(os.path.join(full, name)), _weights(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_the_critic_uses_its_own_learning_rate(toy_critic, tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, str(tmp_path / "run"), critic_learning_rate=0.0)
    trainer.args.save_strategy = "no"
    before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    policy_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.loop.trainable_model("critic").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # learning rate 0: the critic does not move
    assert any(not torch.equal(policy_before[k], v) for k, v in trainer.loop.unwrapped_model().state_dict().items())


def test_bad_uses_of_add_trainable_model_are_one_line_errors(toy_critic, tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="already trained beside the policy"):
        trainer.loop.add_trainable_model("critic", trainer.critic)
    with pytest.raises(ConfigError, match="not 'model'"):
        trainer.loop.add_trainable_model("model", trainer.critic)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        trainer.loop.add_trainable_model("other", frozen)
    with pytest.raises(KeyError, match="added: \\['critic'\\]"):
        trainer.loop.trainable_model("value_head")
    trainer.compute_loss = lambda model, batch, n: (torch.zeros((), requires_grad=True), {})  # a loss without the critic's
    trainer.args.save_strategy = "no"
    with pytest.raises(TypeError, match="must return its loss as a dict"):
        trainer.train()


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero2", marks=pytest.mark.slow)])
def test_the_critic_resumes_exactly_on_two_processes(backend, tiny_model_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", DS_BUILD_OPS="0", PYTHONUNBUFFERED="1")
    config = {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-2, "max_steps": 4,
              "save_strategy": "steps", "save_steps": 2, "save_total_limit": 5, "seed": 3, "disable_tqdm": True, "use_cpu": True}
    if backend == "zero2":
        pytest.importorskip("deepspeed")
        ds = tmp_path / "zero2.json"
        ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
        config["deepspeed"] = str(ds)

    def run(out, **extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, tiny_model_dir,
               json.dumps({**config, "output_dir": out, **extra}), "--critic"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run(full)
    names = set(os.listdir(os.path.join(full, "checkpoint-2")))
    assert "critic" in names and "scheduler_critic.pt" in names
    if backend == "zero2":  # DeepSpeed saves each engine's own state (the critic's is the second)
        assert {"pytorch_model", "pytorch_model_1"} <= names, sorted(names)
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    run(resumed, resume_from_checkpoint=True)
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):  # the same processes repeat the same ops in the same order: identical
        assert (got[step]["loss"], got[step]["critic_loss"]) == (expected[step]["loss"], expected[step]["critic_loss"]), step
    for name in ("", "critic"):
        a, b = _weights(os.path.join(full, name)), _weights(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    from transformers import AutoTokenizer

    from posttrain.testing.tiny_model import build_reward_model

    initial = build_reward_model(AutoTokenizer.from_pretrained(tiny_model_dir), seed=1).state_dict()  # the script's critic before training
    trained = _weights(os.path.join(full, "critic"))
    assert any(not torch.equal(initial[k], trained[k].to(initial[k].dtype)) for k in trained)  # the backend really trained it
    assert expected[4]["critic_loss"] < expected[1]["critic_loss"]
