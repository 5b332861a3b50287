"""Generation options on CPU: ``python -m bench.generation [--vocab 512,151936] [--repeats 5]``.

Times one rollout (``n`` completions of ``max_tokens`` tokens, sampling log-probs included) of the
benchmark models with each way of decoding, in one process, options interleaved per repeat:

* ``hf_generate_scores``: ``model.generate(output_scores=True)`` + ``log_softmax`` of the stacked
  ``(b, L, V)`` scores (the transformers backend before the lean loop).
* ``hf_generate_static``: the same with ``cache_implementation="static"``.
* ``hf_generate_no_scores``: ``model.generate`` without scores (no log-probs: the floor of generate).
* ``lean``: the transformers backend's decode loop (``TransformersBackend``, what posttrain runs).
* ``lean_compiled``: the same loop with the model's forward under ``torch.compile(dynamic=True)`` (inductor's
  CPU backend; the compile itself happens in the warm-up and is reported as ``first_call_s``).
* ``hf_continuous_batching``: transformers' continuous batching (``model.generate_batch``: paged KV cache,
  a scheduler; ``ContinuousBatchingConfig(return_logprobs=True)`` for the sampling log-probs).

Prints medians (min-max) and the peak memory each option adds (``torch.profiler``-free: RSS
high-water via ``resource`` is process-wide, so the added memory is measured as the bytes of the
scores each option keeps). Writes ``bench/results/generation.json``; ``python -m bench.report``
renders it into ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "generation.json")


def build(vocab: int, hidden: int, layers: int):
    import torch
    import transformers

    from posttrain.testing.tiny_model import build_tokenizer

    tok = build_tokenizer()
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.generation", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="512,151936")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--options", default="hf_generate_scores,hf_generate_static,hf_generate_no_scores,lean,lean_compiled,hf_continuous_batching")
    p.add_argument("--out", default=OUT)
    a = p.parse_args(argv)
    import torch
    from transformers import GenerationConfig

    from posttrain._rollout import SamplingParams, TransformersBackend  # the backend itself (posttrain exports the engine)
    from posttrain.testing.tiny_model import synthetic_corpus

    torch.set_num_threads(a.threads)
    results = {"settings": vars(a), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "by_vocab": {}}
    for vocab in [int(v) for v in a.vocab.split(",")]:
        model, tok = build(vocab, a.hidden, a.layers)
        text = " ".join(synthetic_corpus(n=200, seed=1))
        ids = tok(text=text)["input_ids"]
        prompts = [ids[i * 7 : i * 7 + a.prompt_len - (i % 3)] for i in range(a.prompts)]  # different lengths: left padding
        backend = TransformersBackend(model, tok)
        sampling = SamplingParams(max_tokens=a.max_tokens, n=a.n, stop_token_ids=(0,))  # stop id 0 is never sampled in practice: full length
        expanded = [q for q in prompts for _ in range(a.n)]
        pad_id = tok.pad_token_id
        width = max(map(len, expanded))
        input_ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in expanded])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(q) for q in expanded])[:, None]).long()

        def hf(static: bool, scores: bool):
            cfg = GenerationConfig(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   pad_token_id=pad_id, eos_token_id=[0], output_scores=scores, return_dict_in_generate=True,
                                   cache_implementation="static" if static else None)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=cfg)
                if scores:
                    gen = out.sequences[:, width:]
                    torch.log_softmax(torch.stack(out.scores, 1).float(), -1).gather(-1, gen[..., None])
            return out.sequences.shape[1] - width

        def continuous_batching():
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            cfg = GenerationConfig(max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                   num_return_sequences=a.n, pad_token_id=pad_id, eos_token_id=[0])
            with torch.no_grad():
                out = model.generate_batch(prompts, generation_config=cfg, continuous_batching_config=ContinuousBatchingConfig(return_logprobs=True),
                                           progress_bar=False)
            assert len(out) == len(expanded) and all(len(o.logprobs) == len(o.generated_tokens) for o in out.values()), "no sampling log-probs"
            return max(len(o.generated_tokens) for o in out.values())

        compiled_backend = None
        if "lean_compiled" in a.options:
            compiled_model = torch.compile(model, dynamic=True)
            compiled_backend = TransformersBackend(model, tok)
            # the bench swaps the model the decode loop calls for its compiled wrapper (weights shared)
            compiled_backend._decode_chunk = lambda _m, *rest, **kw: TransformersBackend._decode_chunk(compiled_backend, compiled_model, *rest, **kw)

        options = {
            "lean_compiled": lambda: max(map(len, compiled_backend.generate(prompts, sampling).completion_ids)),
            "hf_continuous_batching": continuous_batching,
            "hf_generate_scores": lambda: hf(False, True),
            "hf_generate_static": lambda: hf(True, True),
            "hf_generate_no_scores": lambda: hf(False, False),
            "lean": lambda: max(map(len, backend.generate(prompts, sampling).completion_ids)),
        }
        chosen = [o for o in a.options.split(",") if o]
        times = {o: [] for o in chosen}
        first_call = {}
        for o in chosen:  # warm-up (a static cache's allocation, torch.compile's compilation)
            t = time.perf_counter()
            options[o]()
            first_call[o] = time.perf_counter() - t
        for _ in range(a.repeats):
            for o in chosen:
                t = time.perf_counter()
                n_tok = options[o]()
                times[o].append(time.perf_counter() - t)
                assert n_tok == a.max_tokens, (o, n_tok)
        rows = len(expanded)
        entry = {o: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "all_s": v, "first_call_s": first_call[o]}
                 for o, v in times.items()}
        entry["scores_bytes_kept"] = {"hf_generate_scores": 2 * rows * a.max_tokens * vocab * 4, "hf_generate_static": 2 * rows * a.max_tokens * vocab * 4,
                                      "hf_generate_no_scores": 0, "lean": 0, "lean_compiled": 0, "hf_continuous_batching": 0}
        entry["rows"], entry["params"] = rows, sum(p.numel() for p in model.parameters())
        results["by_vocab"][str(vocab)] = entry
        base = entry.get("hf_generate_scores", {}).get("median_s")
        for o in chosen:
            e = entry[o]
            rel = f", {e['median_s'] / base:.2f}x hf_generate_scores" if base else ""
            print(f"vocab {vocab:>6}  {o:<22} {e['median_s']:.3f}s ({e['min_s']:.3f}-{e['max_s']:.3f}){rel}; first call {e['first_call_s']:.2f}s", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {os.path.relpath(a.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
