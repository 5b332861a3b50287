"""Exact resume on every multi-process backend, through the real CLI (``python -m posttrain train sft``).

For each backend: an uninterrupted 4-step run that checkpoints at steps 2 and 4, then a second
run in a fresh output_dir that holds only that run's ``checkpoint-2`` (what an interruption after
step 2 leaves) and resumes with ``--resume_from_checkpoint true``. Steps 3-4 must log the very
same losses and end in bit-identical weights, and the final checkpoint must load with
``AutoModelForCausalLM.from_pretrained``. Comparisons are exact: with a fixed world size every
backend below runs the same kernels and the same gloo reductions in the same order, so a resumed
run is bit-identical when the checkpoint restores everything (it is, on torch 2.13 / deepspeed
0.19 / accelerate 1.15, CPU).

Every backend runs the plain CLI. On a CPU-only machine accelerate would silently run DeepSpeed
and FSDP as plain DDP (the loop's ``_build_accelerator`` engages them: see its comments), so each
test checks the distributed type recorded in ``run_manifest.json`` and the backend's own
checkpoint files: a silent fallback to DDP fails.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("posttrain_sft")
pytestmark = pytest.mark.distributed

STEPS, SAVE_AT = 4, 2


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_BUILD_OPS="0",
                TOKENIZERS_PARALLELISM="false")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as fh:
        for a in range(16):
            b = (a * 7) % 10
            msgs = [{"role": "user", "content": f"what is {a} + {b}"}, {"role": "assistant", "content": str(a + b)}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def _cli_args(model_dir, data, out, extra=()):
    return ["train", "sft", "--model_name_or_path", model_dir, "--dataset_name", data, "--output_dir", out,
            "--per_device_train_batch_size", "4", "--max_steps", str(STEPS), "--learning_rate", "1e-2", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", str(SAVE_AT), "--disable_tqdm", "true", "--seed", "7", *extra]


def _launch(backend, tmp_path):
    """Return the command prefix that starts 2 processes for ``backend`` and runs the posttrain CLI."""
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    if backend == "ddp":
        return [*torchrun, "-m", "posttrain"], []
    if backend in ("zero2", "zero3"):
        pytest.importorskip("deepspeed")
        config = tmp_path / f"{backend}.json"
        stage = {"zero2": 2, "zero3": 3}[backend]
        config.write_text(json.dumps({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                                      "gradient_accumulation_steps": "auto"}))
        return [*torchrun, "-m", "posttrain"], ["--deepspeed", str(config)]
    if backend == "fsdp2":
        # `accelerate launch` refuses --multi_gpu together with --use_fsdp ("You can only use one of
        # `--cpu`, `--multi_gpu`, `--tpu`, `--use_deepspeed`, `--use_fsdp` at a time"): --use_fsdp alone.
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", port,
                "--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false",
                "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "-m", "posttrain"], []
    raise AssertionError(backend)


def _run(cmd) -> str:
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row["loss"] for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


# what each backend's accelerate save_state writes next to the HF files
_BACKEND_FILES = {
    "ddp": ["optimizer.bin", "optimizer.pt"],
    "zero2": ["pytorch_model/mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "latest"],
    "zero3": ["pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt", "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "fsdp2": ["pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata", "optimizer_0/__1_0.distcp"],
}
_DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp2": "FSDP"}


@pytest.mark.parametrize(
    "backend",
    ["ddp", pytest.param("zero2", marks=pytest.mark.slow), pytest.param("zero3", marks=pytest.mark.slow), pytest.param("fsdp2", marks=pytest.mark.slow)],
)
def test_resume_reproduces_the_uninterrupted_run_exactly(backend, tiny_model_dir, sft_data, tmp_path):
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    prefix, extra = _launch(backend, tmp_path)
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    _run([*prefix, *_cli_args(tiny_model_dir, sft_data, full, extra)])
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, f"checkpoint-{SAVE_AT}"), os.path.join(resumed, f"checkpoint-{SAVE_AT}"))
    log_resumed = _run([*prefix, *_cli_args(tiny_model_dir, sft_data, resumed, [*extra, "--resume_from_checkpoint", "true"])])

    # the backend really ran (no silent fallback to DDP) and saved its own state
    for out in (full, resumed):
        with open(os.path.join(out, "run_manifest.json")) as fh:
            assert json.load(fh)["distributed_type"] == _DISTRIBUTED_TYPE[backend]
    assert f"resumed from {os.path.join(resumed, f'checkpoint-{SAVE_AT}')} at step {SAVE_AT}" in log_resumed
    for ckpt in (os.path.join(full, f"checkpoint-{SAVE_AT}"), os.path.join(resumed, f"checkpoint-{STEPS}")):
        names = set(os.listdir(ckpt))
        for rel in _BACKEND_FILES[backend]:
            assert os.path.exists(os.path.join(ckpt, rel)), f"{backend}: {rel} missing in {sorted(names)}"
        assert {"model.safetensors", "config.json", "trainer_state.json", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt"} <= names
        # nothing accelerate would unpickle without weights_only (custom objects) or in a try/except (RNG)
        assert not [n for n in names if n.endswith(".pkl")], sorted(names)

    expected, got = _losses(full), _losses(resumed)
    assert sorted(expected) == list(range(1, STEPS + 1)) and sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    for step in got:
        assert got[step] == expected[step], f"{backend} step {step}: resumed {got[step]!r} != uninterrupted {expected[step]!r}"
    a, b = _weights(os.path.join(full, f"checkpoint-{STEPS}")), _weights(os.path.join(resumed, f"checkpoint-{STEPS}"))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])][:5]

    # the final checkpoint (full weights, also when they were sharded) and the final model load with plain transformers
    for path in (os.path.join(resumed, f"checkpoint-{STEPS}"), resumed):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert not [n for n in os.listdir(resumed) if n.startswith("tmp-")]
    print(f"{backend}: {time.perf_counter() - started:.1f} s")
