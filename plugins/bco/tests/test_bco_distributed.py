"""BCO on 2 processes (gloo, through the CLI) equals 1 process with the same global batch: the running reward moments
use global statistics (accelerator.reduce), so delta, the losses and the trained weights agree.

The model is float64 and the optimizer SGD, so the comparison is tight on any machine: the two runs differ in how the
batch is split and reduced (summation order, ~1e-16 relative), and SGD keeps the update linear in the gradient (Adam's
first steps divide by sqrt(v) + eps, which can amplify a 1e-16 difference in a near-zero gradient component by lr/eps).
delta itself is float32 (TRL's running-moment arithmetic) on both sides, rounded from float64 statistics that agree to
~1e-16: the same float32 value unless one sits that close to a rounding boundary (a chance of ~1e-9 per step); the
tolerances allow one float32 ulp of delta, which moves each loss term by at most 2**-24 |delta|."""

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
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _args(model_dir, out, batch_size):
    return ["-m", "posttrain", "train", "bco", "--config", str(ROOT / "examples" / "bco.yaml"), "--allow-experimental", "bco",
            "--model_name_or_path", model_dir, "--output_dir", out, "--per_device_train_batch_size", str(batch_size), "--max_steps", "3",
            "--learning_rate", "0.5", "--optim", "sgd", "--beta", "0.5", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true",
            "--model_init_kwargs", '{"dtype": "float64"}']


def test_two_processes_match_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, *_args(tiny_model_dir, one, 8)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), *_args(tiny_model_dir, two, 4)])
    assert json.load(open(os.path.join(two, "run_manifest.json")))["world_size"] == 2
    rows = {name: [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line] for name, out in (("one", one), ("two", two))}
    assert len(rows["one"]) == len(rows["two"]) == 3
    for a, b in zip(rows["one"], rows["two"]):
        ulp = 2.0**-23 * abs(a["delta"])  # one float32 ulp of delta (see the module docstring)
        assert b["delta"] == pytest.approx(a["delta"], rel=1e-9, abs=ulp)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9, abs=ulp)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-9, abs=1e-12)
    assert rows["one"][-1]["delta"] != 0.0
    a, b = load_file(os.path.join(one, "model.safetensors")), load_file(os.path.join(two, "model.safetensors"))
    assert a["model.norm.weight"].dtype == torch.float64
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    moved = max((a[key] - initial[key].double()).abs().max().item() for key in a)
    for key in a:  # 3 SGD steps of float64 gradients that agree to ~1e-15 relative
        torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12 * max(moved, 1.0), msg=lambda m: f"{key}: {m}")
    print(f"largest weight change {moved:.2e}; losses {[r['loss'] for r in rows['one']]}")
