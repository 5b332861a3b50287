"""Helpers of the DPO plugin tests: build our trainer and TRL's on copies of the same models, read metrics."""

from __future__ import annotations

import copy
import json
import os
import warnings


def make_ours(tokenizer, policy, tmp_path, dataset, ref=None, name="ours", eval_dataset=None, peft_config=None, **cfg):
    """Build our DPOTrainer on copies of the models (quiet, no checkpoints unless asked, no gradient checkpointing: faster)."""
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    cfg = {"per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "gradient_checkpointing": False, **cfg}
    args = DPOConfig(output_dir=str(tmp_path / name), **cfg)
    return DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref) if ref is not None else None,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def make_trl(tokenizer, policy, tmp_path, dataset, ref=None, name="trl", **cfg):
    """Build TRL 1.16's DPOTrainer on copies of the models (float32, CPU, no trackers)."""
    import trl

    cfg = {"per_device_train_batch_size": 8, **cfg}
    args = trl.DPOConfig(output_dir=str(tmp_path / name), bf16=False, report_to="none", gradient_checkpointing=False, use_cpu=True, disable_tqdm=True, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref) if ref is not None else None,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def loss_on_device(trainer, batch, num_items_in_batch):
    """Return ``trainer.compute_loss`` of a CPU ``batch`` on the training device, where the reference already is (an accelerator when present)."""
    trainer.model.to(trainer.loop.device)
    return trainer.compute_loss(trainer.model, trainer.loop.to_device(batch), num_items_in_batch)


def assert_reference_kept_off_the_accelerator(trainer):
    """With precomputed reference log-probs the reference model waits on the CPU (it only serves datasets given to evaluate()
    later), whatever the training device: on an accelerator it would hold memory for nothing. On a CPU-only machine the
    training device is the CPU too, and the check is vacuous."""
    import torch

    reference = next(trainer.ref_model.parameters()).device
    assert reference == torch.device("cpu"), f"the reference is on {reference} (training device: {trainer.loop.device})"


def relative_norm_difference(actual, expected) -> float:
    """``|actual - expected| / |expected|`` (2-norms): how gradients are compared; entries near zero carry only rounding."""
    return ((actual - expected).norm() / expected.norm()).item()


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]
