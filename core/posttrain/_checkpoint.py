"""Atomic, resumable, Hugging Face-loadable checkpoints on top of ``Accelerator.save_state``.

Layout of ``output_dir/checkpoint-<step>/``::

    model.safetensors, config.json, ...   save_pretrained of the FULL weights (gathered under FSDP /
                                          ZeRO-3; a PEFT run: adapter_model.safetensors), so
                                          ``from_pretrained(checkpoint)`` works
    tokenizer files                       when the trainer has a processing class
    -- written by accelerate's save_state, depending on the backend --
    optimizer.bin                         single process / DDP (``optimizer.pt``: a hard link to it,
                                          the 1.0 name, no extra disk)
    pytorch_model/, latest, zero_to_fp32.py   DeepSpeed: the engine's own checkpoint (ZeRO shards)
    pytorch_model_fsdp_0/, optimizer_0/   FSDP, SHARDED_STATE_DICT: torch.distributed.checkpoint shards
    pytorch_model_fsdp.bin, optimizer.bin FSDP, FULL_STATE_DICT
    -- written by posttrain --
    scheduler.pt                          LR scheduler state dict (the loop does not hand it to accelerate)
    rng_state_<rank>.pt                   python/numpy/torch/cuda RNG of each process
    method_state.pt                       the method's own state (rollout buffers, ...), if any
    trainer_state.json                    the loop's counters (the file that marks a checkpoint complete)
    run_manifest.json                     method, versions, resolved config

A checkpoint is written into ``tmp-checkpoint-<step>`` and renamed into place only when every
file is flushed, so a process killed at any moment leaves the previous checkpoint loadable.

Everything posttrain loads itself goes through ``torch.load(..., weights_only=True)``, and so do
accelerate's optimizer/scheduler files here (``load_kwargs={"weights_only": True}``). What is
left to the backends: DeepSpeed's engine reads its own files with ``weights_only=False``
(``deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py``: they hold non-tensor objects
such as the loss scaler), and torch.distributed.checkpoint reads its ``.metadata`` with
``pickle.load`` (``torch/distributed/checkpoint/filesystem.py``, ``read_metadata``); before
accelerate loads a DCP folder we read that file with a restricted unpickler first and refuse it
when it refers to anything but DCP's metadata classes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from posttrain._errors import CheckpointError, CheckpointNotFoundError

__all__ = ["existing_run", "describe_run", "remove_run", "read_manifest", "find_latest_checkpoint", "list_checkpoints", "save_checkpoint", "load_checkpoint", "CHECKPOINT_PREFIX"]

CHECKPOINT_PREFIX = "checkpoint-"
_TMP_PREFIX = "tmp-checkpoint-"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_DS_TAG = "pytorch_model"  # accelerate's ckpt_id for the first DeepSpeed engine (accelerate.utils.MODEL_NAME)
_LEGACY_DS_TAG = "deepspeed"  # 1.0 checkpoints: engine.save_checkpoint(dir, tag="deepspeed")


def producer_state_file(checkpoint_dir: str, rank: int) -> str:
    """The file of process ``rank``'s rollout-producer state in ``checkpoint_dir`` (one per process)."""
    return os.path.join(checkpoint_dir, f"producer_state_{rank}.pt")


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


#: Files a run writes into its output_dir besides checkpoints and the final model.
RUN_FILES = ("run_manifest.json", "metrics.jsonl", "diagnostics.jsonl")


def read_manifest(directory: str) -> dict:
    """Return ``directory``'s ``run_manifest.json`` (a run's output_dir or a checkpoint), or {} when absent or unreadable."""
    try:
        with open(os.path.join(directory, "run_manifest.json")) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def existing_run(output_dir: str) -> dict | None:
    """Describe the run whose files are in ``output_dir`` (None when there are none).

    A directory holds a run when it has a run manifest, a metrics log or a checkpoint. The result
    has ``method``, ``run_id``, ``started_at``, ``checkpoints`` (paths) and ``files`` (what is there).
    """
    if not os.path.isdir(output_dir):
        return None
    files = [name for name in RUN_FILES if os.path.isfile(os.path.join(output_dir, name))]
    checkpoints = list_checkpoints(output_dir)
    if not files and not checkpoints:
        return None
    manifest = read_manifest(output_dir) or (read_manifest(checkpoints[-1]) if checkpoints else {})
    return {"method": manifest.get("method"), "run_id": manifest.get("run_id"), "started_at": manifest.get("started_at"),
            "checkpoints": checkpoints, "files": files}


def describe_run(run: dict) -> str:
    """One phrase describing :func:`existing_run`'s result, for messages."""
    parts = [f"method {run['method']!r}" if run.get("method") else "an unknown method"]
    if run.get("started_at"):
        parts.append(f"started {run['started_at']}")
    if run["checkpoints"]:
        last = os.path.basename(run["checkpoints"][-1])
        parts.append(f"{len(run['checkpoints'])} checkpoint(s), the newest {last}")
    return ", ".join(parts)


def remove_run(output_dir: str) -> list[str]:
    """Delete the run files and checkpoints in ``output_dir`` (``overwrite_output_dir``); return what was removed."""
    removed = []
    for name in RUN_FILES:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and (_CKPT_RE.match(name) or name.startswith(_TMP_PREFIX)):
            shutil.rmtree(path)
            removed.append(name)
    return removed


def _fsync_tree(path: str) -> None:
    for root, dirs, files in os.walk(path):
        for fname in files:
            with open(os.path.join(root, fname), "rb") as fh:
                os.fsync(fh.fileno())
        for dname in dirs:  # the entries of sub-folders (DeepSpeed / DCP shards) must be durable too
            fd = os.open(os.path.join(root, dname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
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


# ---------------------------------------------------------------------------- accelerate glue
def _backend(accelerator) -> str:
    """``"deepspeed"``, ``"fsdp"`` or ``"plain"`` (single process, DDP: accelerate saves plain state dicts)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "plain"


class _StateHooks:
    """accelerate pre-hooks that keep the prepared models out of ``save_state`` / ``load_state`` on "plain" backends.

    There accelerate would write the wrapped model's state dict as ``model.safetensors`` (DDP keys
    carry a ``module.`` prefix) over the ``save_pretrained`` file at the checkpoint root; the
    loop's ``save_model`` / ``load_model_weights`` own the weights instead. Under DeepSpeed and FSDP
    accelerate passes the hooks empty lists (the engine / FSDP writes the model), so they do
    nothing. They only act inside posttrain's own saves and loads (``active``), never in a
    ``save_state`` a user calls on the same accelerator.
    """

    def __init__(self) -> None:
        self.active = False

    def before_save(self, models, weights, output_dir) -> None:
        if self.active:
            weights.clear()

    def before_load(self, models, input_dir) -> None:
        if self.active:
            models.clear()

    @contextlib.contextmanager
    def activated(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def _state_hooks(accelerator) -> _StateHooks:
    """Register posttrain's hooks on ``accelerator`` once (lazily, at the first save or load)."""
    hooks = getattr(accelerator, "_posttrain_state_hooks", None)
    if hooks is None:
        hooks = _StateHooks()
        accelerator.register_save_state_pre_hook(hooks.before_save)
        accelerator.register_load_state_pre_hook(hooks.before_load)
        accelerator._posttrain_state_hooks = hooks
    return hooks


def _check_project_config(accelerator) -> None:
    if accelerator.project_configuration.automatic_checkpoint_naming:
        # save_state would then ignore our directory and write project_dir/checkpoints/checkpoint_<i>
        raise RuntimeError("posttrain checkpoints need ProjectConfiguration(automatic_checkpoint_naming=False) on the accelerator.")


# Why the loop's counters and the method's state are NOT registered with
# accelerator.register_for_checkpointing: accelerate pickles registered objects to
# custom_checkpoint_<i>.pkl and reads them back with weights_only=False
# (accelerate/checkpointing.py, load_custom_state), i.e. loading a checkpoint would run arbitrary
# pickled code. trainer_state.json (JSON, and what list_checkpoints looks for) and method_state.pt
# (loaded with weights_only=True) keep that state instead. The same holds for the RNG: accelerate
# always writes random_states_<rank>.pkl and reads it in a try/except that swallows every error
# (a bad file silently breaks exact resume); we delete it right after save_state and keep our own
# rng_state_<rank>.pt (tensors and lists, loaded with weights_only=True, errors raise).
# Objects a user registers on the accelerator themselves are still saved and loaded by accelerate.


def save_checkpoint(loop, method, step: int) -> str | None:
    """Write ``checkpoint-<step>`` atomically and apply ``save_total_limit``; return its path on the main process.

    Every process must call this (it synchronizes); only the main process writes shared files.
    """
    accelerator = loop.accelerator
    args = loop.args
    _check_project_config(accelerator)
    hooks = _state_hooks(accelerator)
    backend = _backend(accelerator)
    final_dir = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp_dir = os.path.join(args.output_dir, f"{_TMP_PREFIX}{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed save
        os.makedirs(tmp_dir)
    accelerator.wait_for_everyone()

    loop.save_model(tmp_dir)  # full HF weights at the root (gathered under FSDP / ZeRO-3)
    with hooks.activated():
        # model shards + optimizer (DeepSpeed engine / FSDP DCP or full state / plain optimizer.bin)
        accelerator.save_state(tmp_dir, safe_serialization=True)
    rng_pickle = os.path.join(tmp_dir, f"random_states_{accelerator.process_index}.pkl")
    if os.path.isfile(rng_pickle):
        os.remove(rng_pickle)  # see the note above save_checkpoint: our rng_state_<rank>.pt replaces it
    torch.save(_rng_state(), os.path.join(tmp_dir, f"rng_state_{accelerator.process_index}.pt"))
    producer = getattr(method, "producer", None)
    if producer is not None:  # per process: each rank draws other prompts and holds other rollouts
        torch.save(producer.state_dict(), producer_state_file(tmp_dir, accelerator.process_index))
    if accelerator.is_main_process:
        optimizer_bin = os.path.join(tmp_dir, "optimizer.bin")
        if backend == "plain" and os.path.isfile(optimizer_bin):
            _link_or_copy(optimizer_bin, os.path.join(tmp_dir, "optimizer.pt"))  # the 1.0 name
        torch.save(loop.scheduler.state_dict(), os.path.join(tmp_dir, "scheduler.pt"))
        for name in loop.trainable_model_names:  # trainable auxiliaries: their schedules (optimizers: save_state above)
            torch.save(loop._auxiliaries[name].scheduler.state_dict(), os.path.join(tmp_dir, f"scheduler_{name}.pt"))
        method_state = method.state_dict() if hasattr(method, "state_dict") else None
        if method_state:
            torch.save(method_state, os.path.join(tmp_dir, "method_state.pt"))
        with open(os.path.join(tmp_dir, "trainer_state.json"), "w") as fh:
            json.dump(loop.state.to_dict(), fh, indent=2)
        with open(os.path.join(tmp_dir, "run_manifest.json"), "w") as fh:
            json.dump(loop.manifest, fh, indent=2, default=str)
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
        _rotate(args.output_dir, args.save_total_limit, run_id=loop.manifest.get("run_id"), keep=final_dir)
    accelerator.wait_for_everyone()
    return final_dir if accelerator.is_main_process else None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(src, dst)


def _rotate(output_dir: str, limit: int | None, *, run_id: str | None = None, keep: str | None = None) -> None:
    """Apply ``save_total_limit`` to the checkpoints of run ``run_id`` only, oldest first, never ``keep``.

    A checkpoint another run wrote (another ``run_id`` in its manifest, or none) is never deleted:
    rotation cannot lose anything but the writing run's own older checkpoints.
    """
    if not limit:
        return
    own = [path for path in list_checkpoints(output_dir) if read_manifest(path).get("run_id") == run_id and run_id]
    for path in own[: max(0, len(own) - limit)]:
        if keep is None or os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)


def _is_legacy_layout(checkpoint_dir: str) -> bool:
    """True for a posttrain 1.0 checkpoint (our own optimizer.pt / deepspeed/ tag, no accelerate state)."""
    names = set(os.listdir(checkpoint_dir))
    accelerate_files = {"optimizer.bin", _DS_TAG} | {n for n in names if n.startswith(("pytorch_model_fsdp", "optimizer_"))}
    return not (names & accelerate_files) and ("optimizer.pt" in names or _LEGACY_DS_TAG in names)


def _dcp_global_allowed(module: str, name: str) -> bool:
    """What a genuine torch.distributed.checkpoint ``.metadata`` pickle refers to (torch 2.4 - 2.13)."""
    import inspect

    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner"):
        import importlib

        return inspect.isclass(getattr(importlib.import_module(module), name, None))  # dataclasses and enums
    if module == "torch.distributed.checkpoint.filesystem":
        return name == "_StorageInfo"
    if module == "torch":
        return name in ("Size", "memory_format") or isinstance(getattr(torch, name, None), torch.dtype)
    return (module, name) in {("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                              ("pathlib", "PureWindowsPath"), ("builtins", "set"), ("builtins", "frozenset")}


def _verify_dcp_metadata(checkpoint_dir: str) -> None:
    """Refuse DCP folders whose ``.metadata`` (torch later reads it with plain ``pickle.load``) holds more than DCP metadata.

    A restricted unpickler (the pattern of the ``pickle`` docs, "Restricting Globals") reads it
    first; torch's own weights-only unpickler cannot: it knows only protocol 2 and DCP writes 4.
    """
    import pickle

    class _Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if _dcp_global_allowed(module, name):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

        def persistent_load(self, pid):
            raise pickle.UnpicklingError("persistent ids are not allowed")

    for root, _, files in os.walk(checkpoint_dir):
        if ".metadata" not in files:
            continue
        path = os.path.join(root, ".metadata")
        with open(path, "rb") as fh:
            try:
                _Restricted(fh).load()
            except Exception as exc:  # noqa: BLE001 - anything a crafted pickle raises
                raise RuntimeError(
                    f"{path} holds objects that are not torch.distributed.checkpoint metadata; refusing to unpickle it ({exc})"
                ) from exc


def _check_same_method(loop, checkpoint_dir: str) -> None:
    """Refuse a checkpoint whose manifest names another method (its method state and optimizer would not fit)."""
    saved = read_manifest(checkpoint_dir).get("method")  # posttrain 1.0 checkpoints carry no manifest: {}
    current = (getattr(loop, "manifest", None) or {}).get("method") or getattr(loop, "method_name", None)
    if saved and current and saved != current:
        raise CheckpointError(
            f"resume_from_checkpoint={checkpoint_dir!r} was written by method {saved!r}, but this run trains {current!r}: "
            f"resume it with `posttrain train {saved} ...`, or start this run from its weights with "
            f"--model_name_or_path {checkpoint_dir} and no resume_from_checkpoint."
        )


def load_checkpoint(loop, method, checkpoint_dir: str) -> dict:
    """Restore model, optimizer, scheduler, RNG, method state and counters from ``checkpoint_dir``.

    Returns:
        The checkpoint's trainer state dict.

    Raises:
        CheckpointNotFoundError: ``checkpoint_dir`` is not a complete checkpoint (a ``FileNotFoundError``).
        CheckpointError: the checkpoint was written by another method.
    """
    state_file = os.path.join(checkpoint_dir, "trainer_state.json")
    if not os.path.isdir(checkpoint_dir):
        raise CheckpointNotFoundError(
            f"resume_from_checkpoint={checkpoint_dir!r} does not exist: pass a checkpoint-<step> directory of this run, "
            "or resume_from_checkpoint=true for the latest one in output_dir."
        )
    if not os.path.isfile(state_file):
        raise CheckpointNotFoundError(
            f"resume_from_checkpoint={checkpoint_dir!r} is not a complete checkpoint (no trainer_state.json); "
            "pass a checkpoint-<step> directory or resume_from_checkpoint=true for the latest one."
        )
    _check_same_method(loop, checkpoint_dir)
    accelerator = loop.accelerator
    backend = _backend(accelerator)
    if _is_legacy_layout(checkpoint_dir):
        _load_legacy_model_and_optimizer(loop, checkpoint_dir)
    else:
        _check_project_config(accelerator)
        kwargs = {}
        if backend == "plain":
            loop.load_model_weights(checkpoint_dir)  # the hooks keep accelerate from loading a model itself
        elif backend == "deepspeed":
            if not os.path.isdir(os.path.join(checkpoint_dir, _DS_TAG)):
                # the engine would only log a warning and train on from the current weights
                raise CheckpointError(f"{checkpoint_dir!r} has no DeepSpeed state ({_DS_TAG}/): it was not saved under DeepSpeed; resume it without DeepSpeed, or start from its weights with --model_name_or_path {checkpoint_dir}.")
            kwargs["load_module_strict"] = False  # as in 1.0: tied weights may be stored once
        elif backend == "fsdp":
            _verify_dcp_metadata(checkpoint_dir)
        with _state_hooks(accelerator).activated():
            accelerator.load_state(checkpoint_dir, load_kwargs={"weights_only": True}, **kwargs)
    loop.scheduler.load_state_dict(torch.load(os.path.join(checkpoint_dir, "scheduler.pt"), weights_only=True))
    for name in loop.trainable_model_names:
        path = os.path.join(checkpoint_dir, f"scheduler_{name}.pt")
        if not os.path.isfile(path):
            raise CheckpointError(f"{checkpoint_dir!r} has no state of the trainable model {name!r} (scheduler_{name}.pt): it was saved by a run without it.")
        loop._auxiliaries[name].scheduler.load_state_dict(torch.load(path, weights_only=True))
    method_file = os.path.join(checkpoint_dir, "method_state.pt")
    if os.path.isfile(method_file) and hasattr(method, "load_state_dict"):
        method.load_state_dict(torch.load(method_file, map_location="cpu", weights_only=True))
    producer = getattr(method, "producer", None)
    producer_file = producer_state_file(checkpoint_dir, accelerator.process_index)
    if producer is not None and os.path.isfile(producer_file):
        try:
            producer.load_state_dict(torch.load(producer_file, map_location="cpu", weights_only=True))
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint_dir}: {exc}") from None
    rng_file = os.path.join(checkpoint_dir, f"rng_state_{accelerator.process_index}.pt")
    if os.path.isfile(rng_file):  # last: nothing above may draw from the restored generators
        _set_rng_state(torch.load(rng_file, weights_only=True))
    with open(state_file) as fh:
        return json.load(fh)


def _load_legacy_model_and_optimizer(loop, checkpoint_dir: str) -> None:
    """Model and optimizer of a posttrain 1.0 checkpoint (saved before accelerate's save_state was used)."""
    loop.load_model_weights(checkpoint_dir)
    if loop.is_deepspeed:
        loop.model.load_checkpoint(checkpoint_dir, tag=_LEGACY_DS_TAG, load_module_strict=False)
    else:
        loop.optimizer.load_state_dict(torch.load(os.path.join(checkpoint_dir, "optimizer.pt"), map_location="cpu", weights_only=True))
