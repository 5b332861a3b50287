"""Frozen models (reference, reward model, teacher, judge) are sharded by the distributed backend, never replicated.

Each test runs tests/scripts/frozen_sharding.py on 2 processes: a tiny model loaded by name (as a reference / teacher is)
goes through ``TrainingLoop.prepare_frozen``; the script compares its forward with the unsharded model's and records
the parameter bytes this process holds.

Before plugin API 1.5, ``prepare_frozen`` moved the model to the device whole: a model loaded under ZeRO-3 (which
transformers partitions while loading) then crashed in its first forward ("'weight' must be 2-D"), and a model built
before the loop was replicated on every process (local bytes = full bytes).
"""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.distributed
SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "frozen_sharding.py")


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _records(cmd, out):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", DS_BUILD_OPS="0", PYTHONUNBUFFERED="1")
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]


def _check_common(records):
    for record in records:
        assert record["world"] == 2
        assert not record["requires_grad"] and not record["training"]


@pytest.mark.slow
def test_a_frozen_model_under_zero3_is_partitioned_and_computes_the_same_logits(tmp_path):
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    out = str(tmp_path / "out")
    records = _records([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), SCRIPT, out, str(config)], out)
    _check_common(records)
    for record in records:
        assert record["type"] == "DeepSpeedEngine"
        # DeepSpeed keeps partitions in its own precision (float32 here, 4 bytes against the float64 model's 8): each process
        # holds half of every partitioned parameter; the small ones (< 10 * hidden elements) stay whole, as DeepSpeed's
        # persistence threshold decides. So: well under half of the full model's float32 bytes, never all of it.
        full_fp32 = record["full_bytes"] // 2
        assert record["local_bytes"] <= 0.55 * full_fp32, record
        # the engine computes in float32: |diff| <= a few float32 roundings of the logits' scale (eps32 = 1.2e-7)
        assert record["max_abs_diff"] <= 64 * 1.2e-7 * max(1.0, record["logit_scale"]), record


def test_a_frozen_model_under_fsdp2_is_sharded_and_computes_the_same_logits(tmp_path):
    out = str(tmp_path / "out")
    records = _records([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", _port(),
                        "--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_auto_wrap_policy",
                        "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", SCRIPT, out, "-"], out)
    _check_common(records)
    for record in records:
        assert record["type"].startswith("FSDP")
        assert record["local_bytes"] * 2 == record["full_bytes"], record  # every parameter split in two, in the model's dtype
        # float64 on both sides, the same ops on gathered weights: equal up to float64 rounding
        assert record["max_abs_diff"] <= 1e-12 * max(1.0, record["logit_scale"]), record


@pytest.mark.slow
def test_grpo_with_a_synced_reference_trains_under_zero3(tiny_model_dir, tmp_path):
    """The reference of a policy ZeRO-3 partitioned while loading is loaded again (a copy would hold empty shards) and put in
    its own ZeRO-3 engine; TR-DPO's sync gathers both. Before plugin API 1.5 this run crashed in the first reference forward."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("posttrain_grpo")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))
    out = str(tmp_path / "grpo")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", DS_BUILD_OPS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), "-m", "posttrain", "train", "grpo",
           "--config", os.path.join(root, "examples", "grpo.yaml"), "--model_name_or_path", tiny_model_dir,
           "--dataset_name", os.path.join(root, "examples", "data", "prompts_arith.jsonl"), "--output_dir", out, "--max_steps", "3",
           "--beta", "0.1", "--sync_ref_model", "true", "--ref_model_sync_steps", "1", "--per_device_train_batch_size", "8",
           "--save_strategy", "no", "--deepspeed", str(config)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the initial policy (float32 engine forwards)
    assert all(r["kl"] > 0 for r in rows[1:])  # and the policy moved away from it
