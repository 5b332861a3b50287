"""BCO on 2 processes (gloo, through the CLI) equals 1 process with the same global batch: the running reward moments
use global statistics (accelerator.reduce), so delta, the losses and the trained weights agree."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.distributed  # registered in the repository's pytest config


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(cmd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _args(model_dir, out, batch_size):
    return ["-m", "posttrain", "train", "bco", "--config", str(ROOT / "examples" / "bco.yaml"), "--allow-experimental", "bco",
            "--model_name_or_path", model_dir, "--output_dir", out, "--per_device_train_batch_size", str(batch_size), "--max_steps", "3",
            "--learning_rate", "1e-2", "--beta", "0.5", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"]


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, *_args(tiny_model_dir, one, 8)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), *_args(tiny_model_dir, two, 4)])
    assert json.load(open(os.path.join(two, "run_manifest.json")))["world_size"] == 2
    rows = {name: [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line] for name, out in (("one", one), ("two", two))}
    for a, b in zip(rows["one"], rows["two"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["delta"] == pytest.approx(a["delta"], rel=1e-5, abs=1e-8)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-4, abs=1e-7)
    assert rows["one"][-1]["delta"] != 0.0
    a, b = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
