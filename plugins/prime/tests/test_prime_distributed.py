"""PRIME on 2 processes (gloo, through the CLI): a run resumed from a checkpoint taken in the middle of a rollout's reuse
(num_iterations=2) repeats the uninterrupted run exactly: each rank's producer state, the policy, the implicit PRM and both
optimizers and schedules are restored per process. The same processes repeat the same operations in the same order, so the
comparison is equality."""

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), "-m", "posttrain", "train", "prime",
           "--config", str(ROOT / "examples" / "prime.yaml"), "--allow-experimental", "prime", "--model_name_or_path", model_dir, "--output_dir", out,
           "--per_device_train_batch_size", "4", "--num_iterations", "2", "--max_steps", "4", "--save_steps", "3", "--save_total_limit", "3",
           "--use_cpu", "true", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def test_resume_mid_rollout_reuse_on_two_processes_is_exact(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    _run(tiny_model_dir, full)  # num_iterations=2: checkpoint-3 sits between the two updates of the second rollout
    assert json.load(open(os.path.join(full, "run_manifest.json")))["world_size"] == 2
    assert {"prm", "scheduler_prm.pt"} <= set(os.listdir(os.path.join(full, "checkpoint-3")))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    _run(tiny_model_dir, resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-3"))
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [4]
    assert (got[4]["loss"], got[4]["prm_loss"], got[4]["reward"]) == (expected[4]["loss"], expected[4]["prm_loss"], expected[4]["reward"])
    for name in ("", "prm"):
        a, b = load_file(os.path.join(full, name, "model.safetensors")), load_file(os.path.join(resumed, name, "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
