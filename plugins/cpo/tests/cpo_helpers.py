"""Helpers of the CPO plugin tests: build our trainer and TRL 1.16's on copies of the same model, read metrics."""

from __future__ import annotations

import copy
import json
import os
import warnings


def make_ours(tokenizer, policy, tmp_path, dataset, name="ours", eval_dataset=None, **cfg):
    """Build our CPOTrainer on a copy of the model (quiet, no checkpoints unless asked, no gradient checkpointing: faster)."""
    import posttrain

    posttrain.activate("cpo", allow_experimental=True)  # experimental: the opt-in (the gate itself: the conformance suite)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    cfg = {"per_device_train_batch_size": 8, "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "gradient_checkpointing": False, **cfg}
    args = CPOConfig(output_dir=str(tmp_path / name), **cfg)
    return CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer)


def make_trl(tokenizer, policy, tmp_path, dataset, name="trl", **cfg):
    """Build TRL 1.16's experimental CPOTrainer on a copy of the model (float32, CPU, no trackers)."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    cfg = {"per_device_train_batch_size": 8, **cfg}
    args = CPOConfig(output_dir=str(tmp_path / name), bf16=False, report_to="none", gradient_checkpointing=False, use_cpu=True, disable_tqdm=True, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=dataset, processing_class=tokenizer)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_t5(tokenizer, seed=0, dtype=None):
    """A tiny T5 (encoder-decoder) for ``tokenizer``'s vocabulary, decoding from the pad token (as T5 does); seeded weights."""
    import torch
    import transformers

    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                                   decoder_start_token_id=pad_id, pad_token_id=pad_id, eos_token_id=eos_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.T5ForConditionalGeneration(config)
    return model.to(dtype) if dtype is not None else model
