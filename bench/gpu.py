"""GPU path of the benchmark: ``python -m bench --device cuda [--methods ...]``.

A Qwen2-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864; random
weights, the benchmark tokenizer's 512-token vocabulary, so ~0.36B parameters) trained in bf16
mixed precision by posttrain, TRL and the bare loop; GRPO/RLOO roll out with vLLM when it is
importable (posttrain ``rollout_backend="vllm"``, TRL ``use_vllm=True, vllm_mode="colocate"``; the bare loop
always uses ``model.generate``). Reports step time, tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``) and an MFU estimate (6 x params x tokens/s / the GPU's dense
bf16 peak; generation FLOPs are not counted). Without CUDA it prints one line and exits 0.
Results go to ``bench/results/latest_cuda.json`` (the CPU results are left alone).
"""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_CUDA = os.path.join(HERE, "results", "latest_cuda.json")

#: dense bf16 peak FLOP/s by device-name substring (vendor data sheets, without sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def save_qwen2_05b(directory: str) -> str:
    import torch
    import transformers

    from posttrain.testing.tiny_model import build_tokenizer

    tok = build_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1_000_000.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def peak_flops() -> float | None:
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def main(a, argv=None) -> int:
    import torch

    if not torch.cuda.is_available():
        print("[bench] --device cuda: no CUDA device on this machine; GPU benchmark skipped.")
        return 0
    from bench.run import run_all, with_set_defaults

    if a.seq_len is None:
        a.seq_len = 512
    flags = ["--bf16"]
    if importlib.util.find_spec("vllm") is not None:
        flags.append("--vllm")
    else:
        print("[bench] vllm is not importable: GRPO/RLOO roll out with transformers' generate")
    out = a.out if os.path.abspath(a.out) != os.path.abspath(os.path.join(HERE, "results", "latest.json")) else RESULTS_CUDA
    a.no_doc = True
    if a.sizes:
        raise SystemExit("--device cuda: the GPU path runs its own size (qwen2-0.5b); leave --sizes unset")
    a.sizes = "tiny"  # only to take the tiny set's run lengths; the size run is qwen2-0.5b
    sa = with_set_defaults(a, "tiny")
    sa.sizes = "qwen2-0.5b"
    return run_all(a, argv, plans=[("gpu", sa, {"qwen2-0.5b": save_qwen2_05b})], worker_flags=flags, out=out, peak_flops=peak_flops())
