"""Multi-process runs through the real CLI: SFT on 2 processes (gloo) and under DeepSpeed ZeRO-2.

Each compares the trained weights with a single-process run of the same global batch. The processes
reduce in another order than one process does, so equality holds up to rounding: the gloo run is
compared in float64 (``--model_init_kwargs '{"dtype": "float64"}'``), DeepSpeed's (whose optimizer
works in float32 whatever the model's dtype) in float32 with a tolerance derived from its sums.
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
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), DS_BUILD_OPS="0")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as fh:
        for a in range(16):
            b = (a * 7) % 10
            msgs = [{"role": "user", "content": f"what is {a} + {b}"}, {"role": "assistant", "content": str(a + b)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def _train_args(model_dir, data, out, batch_size, extra=(), learning_rate="1e-2"):
    return ["-m", "posttrain", "train", "sft", "--model_name_or_path", model_dir, "--dataset_name", data,
            "--output_dir", out, "--per_device_train_batch_size", str(batch_size), "--max_steps", "3",
            "--learning_rate", learning_rate, "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *extra]


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def _assert_same_weights(a_dir, b_dir, init_dir, *, rtol, update_rtol, dtype):
    """Weights of two runs agree to ``rtol`` of the weight plus ``update_rtol`` of the tensor's largest update (an
    update has near-zero entries, and a weight is much larger than its update: relative to either alone is vacuous)."""
    from safetensors.torch import load_file

    a, b = load_file(os.path.join(a_dir, "model.safetensors")), load_file(os.path.join(b_dir, "model.safetensors"))
    init = load_file(os.path.join(init_dir, "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == dtype, (key, a[key].dtype, b[key].dtype)
        largest_update = (b[key].double() - init[key].double()).abs().max().item()
        assert largest_update > 0, f"{key} was not trained"
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=update_rtol * largest_update, msg=lambda m: f"{key}: {m}")


def _run(cmd):
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_sft_on_two_processes_matches_one_process_with_the_same_global_batch(tiny_model_dir, sft_data, tmp_path):
    """In float64: measured <= 8e-14 of the largest update (float32: 6.4e-5, Adam turning last-bit gradient differences
    of near-zero entries into visible ones). The bound 1e-6 leaves room for transformers' RMSNorm, which computes in
    float32 inside a float64 model: two float64 inputs 1e-16 apart round to adjacent float32 values once in ~1e8 elements,
    moving that element by 2**-24 relative. A gradient not averaged over both processes is off by > 1%."""
    float64 = ["--model_init_kwargs", json.dumps({"dtype": "float64"})]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _run([sys.executable, *_train_args(tiny_model_dir, sft_data, one, 8, float64)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          *_train_args(tiny_model_dir, sft_data, two, 4, float64)])
    assert json.load(open(os.path.join(two, "run_manifest.json")))["world_size"] == 2
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-6)
    _assert_same_weights(one, two, tiny_model_dir, rtol=0, update_rtol=1e-6, dtype=torch.float64)


@pytest.mark.slow
def test_sft_under_deepspeed_zero2_matches_one_process(tiny_model_dir, sft_data, tmp_path):
    pytest.importorskip("deepspeed")
    ds_config = tmp_path / "zero2.json"
    ds_config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    # DeepSpeed's ZeRO-2 optimizer works in float32 whatever the model's dtype (a float64 model still differs by ~7e-6 of
    # the update), so this comparison is float32, with a bound derived from the computation. adam_epsilon=1 makes Adam's
    # update ~lr*g/(|g|+1), 1-Lipschitz in the gradient (with eps=1e-8 it is ~lr*sign(g), and an entry with |g| near eps
    # turns a last-bit gradient difference into an O(lr) one); the update is then ~g, so lr=1 gives updates well above
    # the weights' own rounding. What remains: each weight rounds to float32 once per step on each side (3 steps: <= 4
    # eps relative), and the gradients are float32 sums of at most a few hundred terms per step (<= ~1e-4 of the largest
    # update over 3 steps, the gamma_n bound n * eps). Measured: 1.2e-7 absolute (1 ulp of a weight of ~1).
    one, ds = str(tmp_path / "one"), str(tmp_path / "ds")
    _run([sys.executable, *_train_args(tiny_model_dir, sft_data, one, 8, ["--adam_epsilon", "1.0"], learning_rate="1.0")])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
          *_train_args(tiny_model_dir, sft_data, ds, 4, ["--deepspeed", str(ds_config), "--adam_epsilon", "1.0"], learning_rate="1.0")])
    # the losses are float32 means whose longest reduction is the vocabulary's logsumexp (512 terms): 512 * eps = 6e-5
    assert _losses(one) == pytest.approx(_losses(ds), rel=1e-4)
    _assert_same_weights(one, ds, tiny_model_dir, rtol=4 * torch.finfo(torch.float32).eps, update_rtol=1e-4, dtype=torch.float32)


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
