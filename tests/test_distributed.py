"""Multi-process runs through the real CLI: SFT on 2 processes (gloo) and under DeepSpeed ZeRO-2.

Each compares the trained weights with a single-process run of the same global batch.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("posttrain_sft")
pytestmark = pytest.mark.distributed


def _free_port() -> str:
    """A TCP port nobody listens on now (a fixed port collides when two test runs share the machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_BUILD_OPS="0")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as fh:
        for a in range(16):
            b = (a * 7) % 10
            msgs = [{"role": "user", "content": f"what is {a} + {b}"}, {"role": "assistant", "content": str(a + b)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def _train_args(model_dir, data, out, batch_size, extra=()):
    return ["-m", "posttrain", "train", "sft", "--model_name_or_path", model_dir, "--dataset_name", data,
            "--output_dir", out, "--per_device_train_batch_size", str(batch_size), "--max_steps", "3",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def _assert_same_weights(a_dir, b_dir, rtol, atol):
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def _run(cmd):
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_sft_on_two_processes_matches_one_process_with_the_same_global_batch(tiny_model_dir, sft_data, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, *_train_args(tiny_model_dir, sft_data, one, 8)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          *_train_args(tiny_model_dir, sft_data, two, 4)])
    assert json.load(open(os.path.join(two, "run_manifest.json")))["world_size"] == 2
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)
    _assert_same_weights(one, two, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sft_under_deepspeed_zero2_matches_one_process(tiny_model_dir, sft_data, tmp_path):
    pytest.importorskip("deepspeed")
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    one, ds = str(tmp_path / "one"), str(tmp_path / "ds")
    _run([sys.executable, *_train_args(tiny_model_dir, sft_data, one, 8)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          *_train_args(tiny_model_dir, sft_data, ds, 4, ["--deepspeed", str(ds_config)])])
    assert _losses(one) == pytest.approx(_losses(ds), rel=1e-4)
    _assert_same_weights(one, ds, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method, extra", [("grpo", ["--scale_rewards", "batch"]), ("rloo", ["--normalize_advantages", "true", "--beta", "0.05"])])
def test_online_rl_on_two_processes_gathers_batch_statistics_and_trains(method, extra, tiny_model_dir, tmp_path):
    pytest.importorskip(f"posttrain_{method}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / method)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          "-m", "posttrain", "train", method, "--config", os.path.join(root, "examples", f"{method}.yaml"),
          "--model_name_or_path", tiny_model_dir, "--dataset_name", os.path.join(root, "examples", "data", "prompts_arith.jsonl"),
          "--output_dir", out, "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra])
    assert json.load(open(os.path.join(out, "run_manifest.json")))["world_size"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all("reward" in r and "frac_reward_zero_std" in r for r in rows if "loss" in r)
