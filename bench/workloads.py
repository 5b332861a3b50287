"""Workload definitions shared by the orchestrator and every worker (light: no torch at import).

A workload is (method, size). The orchestrator builds each model size once, saves it with its
tokenizer to a temp dir, writes the method's dataset there as JSON, and every framework's worker
loads exactly those files with the same hyperparameters.
"""

from __future__ import annotations

import json
import os
import random

METHODS = ("sft", "dpo", "kto", "grpo", "rloo")
FRAMEWORKS = ("posttrain", "trl", "bare")
#: name -> (hidden_size, num_layers, vocab_size or None for the tokenizer's 512, arch); intermediate = 2 x hidden,
#: 4 heads, 2 KV heads, tied embeddings. The real-vocabulary sizes keep the 512-token benchmark tokenizer (the data
#: uses its ids) but have an output layer of 151,936 (Qwen2/Qwen3's) or 32,000 (Llama-2/Mistral's) rows: the logits,
#: softmax, sampling and the lm_head matmul cost what they cost with the real tokenizer.
SIZES = {
    "tiny": (64, 4, None, "qwen2"),
    "small": (256, 4, None, "qwen2"),
    "qwen3-151k": (256, 4, 151_936, "qwen3"),
    "qwen3-32k": (256, 4, 32_000, "qwen3"),
}

#: Workload sets: ``python -m bench --set tiny|real|all`` (``make bench`` runs ``all``). Each set brings its
#: sizes and run lengths (a command-line flag overrides them); ``seq_len`` is per method (see default_seq_len).
SETS = {
    "tiny": dict(sizes=("tiny", "small"), steps=20, warmup=3, repeats=3, completion_len=32,
                 seq_len={"sft": 128, "dpo": 128, "kto": 128, "grpo": 32, "rloo": 32}),
    # sequences of 256-512 tokens: SFT rows of 512; DPO prompt 128 + answers 128 (chosen and rejected rows of 256);
    # KTO prompt 128 + completion 128; GRPO/RLOO prompt 192 + 64 sampled tokens
    "real": dict(sizes=("qwen3-151k", "qwen3-32k"), steps=5, warmup=1, repeats=2, completion_len=64,
                 seq_len={"sft": 512, "dpo": 256, "kto": 256, "grpo": 192, "rloo": 192}),
}

#: Hyperparameters every framework uses (CPU, fp32, no eval/saving, rare logging).
COMMON = dict(
    learning_rate=1e-5,
    max_grad_norm=1.0,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    seed=0,
    gradient_accumulation_steps=1,
)
DPO_BETA = 0.1
KTO_BETA = 0.1
GRPO_BETA = 0.0  # TRL's and posttrain's default: no reference model
RLOO_BETA = 0.05  # TRL's default: reference model + KL in the reward


def reward_num_words(completions, **kwargs) -> list[float]:
    """The benchmark's single reward function: number of whitespace words (cheap, deterministic)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(len(text.split())))
    return out


def _text_of_tokens(tok, rng: random.Random, n: int) -> tuple[str, int]:
    """Return a string of about ``n`` tokens (and its exact token count)."""
    from posttrain.testing.tiny_model import synthetic_corpus

    lines = synthetic_corpus(n=max(8, n // 4), seed=rng.randint(0, 10**6))
    text = " ".join(lines)
    ids = tok(text=text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        text = text + " " + text
        ids = tok(text=text, add_special_tokens=False)["input_ids"]
    text = tok.decode(ids[:n])
    return text, len(tok(text=text, add_special_tokens=False)["input_ids"])


def build_data(method: str, tok, *, rows: int, seq_len: int, completion_len: int, seed: int = 0) -> tuple[list[dict], dict]:
    """Return ``(rows, info)``; ``info["tokens_per_row"]`` is the mean real tokens one row costs per step."""
    rng = random.Random(seed)
    data, tokens = [], []
    eos = tok.eos_token
    if method == "sft":
        # every row is longer than seq_len, so all three ways truncate to exactly seq_len tokens (no padding)
        for _ in range(rows):
            text, _n = _text_of_tokens(tok, rng, seq_len + 16)
            data.append({"text": text})
            tokens.append(seq_len)
    elif method == "dpo":
        half = seq_len // 2
        for _ in range(rows):
            prompt, np_ = _text_of_tokens(tok, rng, half)
            chosen, nc = _text_of_tokens(tok, rng, half - 1)
            rejected, nr = _text_of_tokens(tok, rng, half - 1)
            data.append({"prompt": prompt, "chosen": chosen + eos, "rejected": rejected + eos})
            tokens.append(2 * np_ + nc + nr + 2)
    elif method == "kto":
        # unpaired rows, desirable and undesirable alternating; the trainers add a KL row per row (a mismatched completion)
        half = seq_len // 2
        for i in range(rows):
            prompt, np_ = _text_of_tokens(tok, rng, half)
            completion, nc = _text_of_tokens(tok, rng, half - 1)
            data.append({"prompt": prompt, "completion": completion + eos, "label": i % 2 == 0})
            tokens.append(2 * (np_ + nc + 1))
    elif method in ("grpo", "rloo"):
        for _ in range(rows):
            prompt, np_ = _text_of_tokens(tok, rng, seq_len)
            data.append({"prompt": prompt})
            tokens.append(np_ + completion_len)  # per completion
    else:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    return data, {"tokens_per_row": sum(tokens) / len(tokens)}


def default_seq_len(method: str, workload_set: str = "tiny") -> int:
    """Prompt+answer tokens for sft/dpo/kto; prompt tokens for grpo/rloo (completions add completion_len)."""
    return SETS[workload_set]["seq_len"][method]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
