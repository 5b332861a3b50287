"""Workload definitions shared by the orchestrator and every worker (light: no torch at import).

A workload is (method, size). The orchestrator builds each model size once, saves it with its
tokenizer to a temp dir, writes the method's dataset there as JSON, and every framework's worker
loads exactly those files with the same hyperparameters.
"""

from __future__ import annotations

import json
import os
import random

METHODS = ("sft", "dpo", "grpo", "rloo")
FRAMEWORKS = ("posttrain", "trl", "bare")
#: name -> (hidden_size, num_layers); intermediate = 2 x hidden, 4 heads, 2 KV heads, vocab 512, tied embeddings.
SIZES = {"tiny": (64, 4), "small": (256, 4)}

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
    elif method in ("grpo", "rloo"):
        for _ in range(rows):
            prompt, np_ = _text_of_tokens(tok, rng, seq_len)
            data.append({"prompt": prompt})
            tokens.append(np_ + completion_len)  # per completion
    else:
        raise ValueError(f"unknown method {method!r}: use one of {METHODS}")
    return data, {"tokens_per_row": sum(tokens) / len(tokens)}


def default_seq_len(method: str) -> int:
    """Prompt+answer tokens for sft/dpo; prompt tokens for grpo/rloo (completions add completion_len)."""
    return {"sft": 128, "dpo": 128, "grpo": 32, "rloo": 32}[method]


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)
