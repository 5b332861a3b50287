"""PPO on 2 processes (gloo, through the CLI): a run resumed from a checkpoint taken inside a rollout's updates repeats
the uninterrupted run exactly: each rank's producer (its prompts and its rollout, mid-reuse), the policy, the critic
and both optimizers and schedules are restored per process; with ``value_head=True``, the head on the policy (DDP
wraps it with the policy, one optimizer) and ``value_head.safetensors``. The same processes repeat the same operations in the
same order, so the comparison is equality."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # registered in the repository's pytest config


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(model_dir, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), "-m", "posttrain", "train", "ppo",
           "--config", str(ROOT / "examples" / "ppo.yaml"), "--allow-experimental", "ppo", "--model_name_or_path", model_dir, "--output_dir", out,
           "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3", "--use_cpu", "true", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


@pytest.mark.parametrize("value_head", [False, True], ids=["critic", "value_head"])
def test_resume_inside_a_rollout_on_two_processes_is_exact(tiny_model_dir, tmp_path, value_head):
    from safetensors.torch import load_file

    extra = ("--value_head", "true", "--critic_learning_rate", "none") if value_head else ()
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    _run(tiny_model_dir, full, *extra)  # 2 PPO epochs x 2 mini-batches per rollout: checkpoint-2 is in the middle of the first
    assert json.load(open(os.path.join(full, "run_manifest.json")))["world_size"] == 2
    entries = set(os.listdir(os.path.join(full, "checkpoint-2")))
    if value_head:
        assert "value_head.safetensors" in entries and "critic" not in entries, entries
    else:
        assert {"critic", "scheduler_critic.pt"} <= entries
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-2"), os.path.join(resumed, "checkpoint-2"))
    _run(tiny_model_dir, resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-2"), *extra)
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [3, 4]
    value_key = "loss/value_avg" if value_head else "critic_loss"
    for step in (3, 4):
        assert (got[step]["loss"], got[step][value_key], got[step]["objective/scores"]) == \
               (expected[step]["loss"], expected[step][value_key], expected[step]["objective/scores"]), step
    files = ("model.safetensors", "value_head.safetensors") if value_head else ("model.safetensors", os.path.join("critic", "model.safetensors"))
    for name in files:
        a, b = load_file(os.path.join(full, name)), load_file(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
