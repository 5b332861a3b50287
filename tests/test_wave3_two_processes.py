"""The online methods of issue 20 on 2 processes (gloo, through the CLI, from each method's example YAML): a run resumed
from a checkpoint repeats the uninterrupted run exactly. Each rank's producer state (its prompts and rollouts; GRPO
with replay: its own replay buffer; Nash-MD: its mixture sampler's seed; A*-PO: the V* of its prompts), the policy, its
optimizer and schedule are restored per process; the same processes repeat the same operations in the same order, so
the comparison is equality. (PPO, ReMax and PRIME have their own 2-process tests in their plugins.)"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

#: method -> overrides of its example (small batches that divide over 2 processes; a checkpoint inside a rollout's reuse
#: where the method reuses rollouts)
CASES = {
    "grpo_replay": ["--per_device_train_batch_size", "8", "--num_generations", "4", "--replay_buffer_size", "4"],
    "gspo_token": ["--per_device_train_batch_size", "8", "--num_generations", "4", "--num_iterations", "2", "--max_completion_length", "4"],
    "gmpo": ["--per_device_train_batch_size", "8", "--num_generations", "4", "--max_completion_length", "4"],
    "a2po": ["--per_device_train_batch_size", "4", "--num_value_samples", "2", "--max_completion_length", "4"],
    "online_dpo": ["--per_device_train_batch_size", "4", "--max_new_tokens", "4"],
    "xpo": ["--per_device_train_batch_size", "4", "--max_new_tokens", "4"],
    "nash_md": ["--per_device_train_batch_size", "4", "--max_new_tokens", "4"],
}


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(method, model_dir, out, *extra):
    pytest.importorskip(f"posttrain_{method}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(), "-m", "posttrain", "train", method,
           "--config", str(ROOT / "examples" / f"{method}.yaml"), "--allow-experimental", method, "--model_name_or_path", model_dir,
           "--output_dir", out, "--max_steps", "4", "--save_steps", "3", "--save_total_limit", "3", "--warmup_steps", "0", "--use_cpu", "true",
           *CASES[method], *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


@pytest.mark.parametrize("method", sorted(CASES))
def test_a_resumed_run_on_two_processes_repeats_the_uninterrupted_one(method, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    _run(method, tiny_model_dir, full)
    assert json.load(open(os.path.join(full, "run_manifest.json")))["world_size"] == 2
    assert {"producer_state_0.pt", "producer_state_1.pt"} <= set(os.listdir(os.path.join(full, "checkpoint-3")))
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    _run(method, tiny_model_dir, resumed, "--resume_from_checkpoint", os.path.join(resumed, "checkpoint-3"))
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [4]
    timing = ("time", "per_second", "memory", "prepare_step_fraction")  # wall-clock and memory readings differ between runs
    numbers = {k for k, v in expected[4].items() if isinstance(v, (int, float)) and k not in ("step", "epoch") and not any(t in k for t in timing)}
    assert {k: got[4].get(k) for k in numbers} == {k: expected[4][k] for k in numbers}
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
