"""Atomic, resumable, Hugging Face-loadable checkpoints.

Layout of ``output_dir/checkpoint-<step>/``::

    model.safetensors, config.json, ...   save_pretrained (a PEFT run: adapter_model.safetensors)
    tokenizer files                       when the trainer has a processing class
    optimizer.pt, scheduler.pt            torch state dicts (loaded with weights_only=True)
    rng_state_<rank>.pt                   python/numpy/torch/cuda RNG of each process
    method_state.pt                       the method's own state (rollout buffers, ...), if any
    trainer_state.json                    step, epoch, data position
    run_manifest.json                     method, versions, resolved config

A checkpoint is written into ``tmp-checkpoint-<step>`` and renamed into place only when every
file is flushed, so a process killed at any moment leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

__all__ = ["find_latest_checkpoint", "list_checkpoints", "save_checkpoint", "load_checkpoint", "CHECKPOINT_PREFIX"]

CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = "tmp-checkpoint-"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str) -> list[str]:
    """Return the complete checkpoints in ``output_dir``, oldest (lowest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir: str) -> str | None:
    """Return the newest complete checkpoint in ``output_dir``, or None when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for fname in files:
            with open(os.path.join(root, fname), "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(loop, method, step: int) -> str | None:
    """Write ``checkpoint-<step>`` atomically and apply ``save_total_limit``; return its path on the main process.

    Every process must call this (it synchronizes); only the main process writes shared files.
    """
    accelerator = loop.accelerator
    args = loop.args
    final_dir = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp_dir = os.path.join(args.output_dir, f"{_TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed save
        os.makedirs(tmp_dir)
    accelerator.wait_for_everyone()

    loop.save_model(tmp_dir)
    if loop.is_deepspeed:
        # ZeRO shards optimizer state across processes: let the engine write its own files.
        loop.model.save_checkpoint(tmp_dir, tag="deepspeed")
    elif accelerator.is_main_process:
        torch.save(loop.optimizer.state_dict(), os.path.join(tmp_dir, "optimizer.pt"))
    if accelerator.is_main_process:
        torch.save(loop.scheduler.state_dict(), os.path.join(tmp_dir, "scheduler.pt"))
        method_state = method.state_dict() if hasattr(method, "state_dict") else None
        if method_state:
            torch.save(method_state, os.path.join(tmp_dir, "method_state.pt"))
        with open(os.path.join(tmp_dir, "trainer_state.json"), "w") as fh:
            json.dump(loop.state.to_dict(), fh, indent=2)
        with open(os.path.join(tmp_dir, "run_manifest.json"), "w") as fh:
            json.dump(loop.manifest, fh, indent=2, default=str)
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rng_state_{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        _fsync_tree(tmp_dir)
        if os.path.exists(final_dir):  # re-saving a step (e.g. after resume): swap, then drop the old one
            old = final_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final_dir, old)
            os.rename(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp_dir, final_dir)  # atomic on POSIX: the checkpoint appears complete or not at all
        _rotate(args.output_dir, args.save_total_limit)
    accelerator.wait_for_everyone()
    return final_dir if accelerator.is_main_process else None


def _rotate(output_dir: str, limit: int | None) -> None:
    if not limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - limit)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(loop, method, checkpoint_dir: str) -> dict:
    """Restore model, optimizer, scheduler, RNG, method state and counters from ``checkpoint_dir``.

    Returns:
        The checkpoint's trainer state dict.

    Raises:
        FileNotFoundError: ``checkpoint_dir`` is not a complete checkpoint.
    """
    state_file = os.path.join(checkpoint_dir, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"resume_from_checkpoint={checkpoint_dir!r} is not a complete checkpoint (no trainer_state.json); "
            "pass a checkpoint-<step> directory or resume_from_checkpoint=true for the latest one."
        )
    loop.load_model_weights(checkpoint_dir)
    if loop.is_deepspeed:
        loop.model.load_checkpoint(checkpoint_dir, tag="deepspeed", load_module_strict=False)
    else:
        loop.optimizer.load_state_dict(torch.load(os.path.join(checkpoint_dir, "optimizer.pt"), map_location="cpu", weights_only=True))
    loop.scheduler.load_state_dict(torch.load(os.path.join(checkpoint_dir, "scheduler.pt"), weights_only=True))
    method_file = os.path.join(checkpoint_dir, "method_state.pt")
    if os.path.isfile(method_file) and hasattr(method, "load_state_dict"):
        method.load_state_dict(torch.load(method_file, map_location="cpu", weights_only=True))
    rng_file = os.path.join(checkpoint_dir, f"rng_state_{loop.accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        _set_rng_state(torch.load(rng_file, weights_only=True))
    with open(state_file) as fh:
        return json.load(fh)
