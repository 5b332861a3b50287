"""Run under 2 processes: prepare a frozen copy of a tiny model with the loop's backend, compare its forward with the
unsharded model's, and write this rank's local parameter bytes to <out>/rank<r>.json.

usage: frozen_sharding.py OUT [DEEPSPEED_CONFIG] [HIDDEN LAYERS DTYPE]
"""

import json
import os
import sys

import torch

from posttrain import TrainingConfig, TrainingLoop
from posttrain.testing.tiny_model import build_model, build_tokenizer


def local_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: this process's partition
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        elif type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor":  # FSDP2: the local shard
            local = p.to_local()
            total += local.numel() * local.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def main() -> None:
    out = sys.argv[1]
    ds_config = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
    hidden, layers = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (32, 2)
    dtype = getattr(torch, sys.argv[5]) if len(sys.argv) > 5 else torch.float64
    from transformers import AutoModelForCausalLM

    # the reference computation: the model saved and reloaded before any distributed backend exists
    directory = os.path.join(out, "model")
    build_model(build_tokenizer(), hidden_size=hidden, num_layers=layers).save_pretrained(directory)
    full = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    args = TrainingConfig(output_dir=out, use_cpu=True, deepspeed=ds_config, per_device_train_batch_size=1, report_to="none")
    loop = TrainingLoop(args, method="sft")
    # a frozen model loaded by name, as a reference / reward model / teacher is (under ZeRO-3, transformers partitions it
    # while loading: zero.Init)
    frozen = loop.prepare_frozen(AutoModelForCausalLM.from_pretrained(directory, dtype=dtype))
    ids = torch.tensor([[5, 17, 3, 9, 44, 2, 8], [1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        got = frozen(input_ids=ids.to(loop.device)).logits.cpu()
        want = full(input_ids=ids).logits
    rank = loop.accelerator.process_index
    record = {"rank": rank, "world": loop.accelerator.num_processes, "type": type(frozen).__name__, "local_bytes": local_bytes(frozen),
              "full_bytes": full_bytes, "max_abs_diff": float((got - want).abs().max()), "logit_scale": float(want.abs().max()),
              "requires_grad": any(p.requires_grad for p in frozen.parameters()), "training": bool(getattr(frozen, "module", frozen).training)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(record, fh)
    loop.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
