"""SFT of a vision-language model, side by side: ``python -m bench.vision [--sizes tiny,real] [--repeats 2]``.

Issue 23 asks that the chunked log-probs and the memory goals hold with image inputs, the vision tower's activations
included. One workload: SFT of an Idefics3 model (SmolVLM's architecture) built in-process with a vision tower of
2 layers x 128 wide on 64 x 64 images (64 patches -> 16 image tokens per image) and a language model of 4 layers x 256,
on conversational prompt-completion rows with one image each (``posttrain.testing.tiny_vlm.colour_rows``, longer
answers), at two output-layer sizes: ``tiny`` (the tiny tokenizer's 515 tokens) and ``real`` (151,936 rows, Qwen's).

Four runs per round, each in a fresh process (``python -m bench.vision --worker ...``), interleaved for ``--repeats``
rounds so machine noise hits all alike:

* ``posttrain``: ``posttrain.methods.sft`` with its defaults (the loss from the hidden states and the LM head,
  ``logprob_chunk_size=256``: no ``(B, T, V)`` logits);
* ``posttrain-unchunked``: the same with ``logprob_chunk_size=0`` (the model's own logits);
* ``trl``: TRL's ``SFTTrainer`` (same model files, rows, batch, optimizer, completion-only loss);
* ``bare``: a plain PyTorch loop over the same batches (processor in the loop, full logits, cross-entropy).

Measured per run: the median step time after warm-up and the memory training adds on top of the loaded model and
data (peak RSS minus the RSS before training). Writes ``bench/results/vision.json``; ``section()`` renders it
into ``docs/benchmarks.md`` (``python -m bench.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "vision.json")
SIZES = {"tiny": None, "real": 151936}
FRAMEWORKS = ("posttrain", "posttrain-unchunked", "trl", "bare")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.vision", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,real")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_model_dir(directory: str, vocab: int | None) -> str:
    """An Idefics3 of bench size (vision 2 x 128 on 64 x 64 images; text 4 x 256) and its processor, saved to ``directory``."""
    import torch
    import transformers
    from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

    from posttrain.testing.tiny_vlm import build_vlm_processor

    base = build_vlm_processor("idefics3")
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64}, max_image_size={"longest_edge": 64})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=base.tokenizer, image_seq_len=16, chat_template=base.chat_template)
    tok = processor.tokenizer
    config = transformers.Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": vocab or len(tok), "hidden_size": 256, "intermediate_size": 512,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": None, "tie_word_embeddings": True},
        vision_config={"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        scale_factor=2, image_token_id=processor.image_token_id, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.Idefics3ForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def rows(n: int) -> list[dict]:
    """Colour rows with 64 x 64 images and an answer of about 40 tokens."""
    from posttrain.testing.tiny_vlm import colour_rows

    out = []
    for row in colour_rows(n, size=64, seed=0):
        colour = row["completion"][0]["content"]
        text = f"the image is {colour}. " + " ".join([f"it is {colour} all over"] * 4)
        out.append({"prompt": row["prompt"], "completion": [{"role": "assistant", "content": text}], "images": row["images"]})
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

    torch.set_num_threads(a.threads)
    processor = AutoProcessor.from_pretrained(a.model_dir)
    model = AutoModelForImageTextToText.from_pretrained(a.model_dir, dtype=torch.float32)
    total = a.warmup + a.steps
    data = rows(total * a.batch_size)
    ends: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    common = dict(output_dir=tempfile.mkdtemp(prefix="bench-vision-"), max_steps=total, per_device_train_batch_size=a.batch_size,
                  learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", seed=0, max_length=None,
                  gradient_checkpointing=False, dataloader_num_workers=0)
    rss0 = None
    if a.worker.startswith("posttrain"):
        from posttrain.methods.sft import SFTConfig, SFTTrainer

        extra = {"logprob_chunk_size": 0} if a.worker == "posttrain-unchunked" else {}
        trainer = SFTTrainer(model=model, args=SFTConfig(**common, **extra), train_dataset=Dataset.from_list(data), processing_class=processor,
                             callbacks=[Stamp()])
        rss0 = _rss_mb()
        trainer.train()
    elif a.worker == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, use_cpu=True, bf16=False), train_dataset=Dataset.from_list(data),
                             processing_class=processor, callbacks=[Stamp()])
        rss0 = _rss_mb()
        trainer.train()
    else:  # bare: the processor in the loop, full logits, cross-entropy over the completion
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        tok = processor.tokenizer
        rss0 = _rss_mb()
        for step in range(total):
            batch_rows = data[step * a.batch_size : (step + 1) * a.batch_size]
            prompts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in batch_rows]
            answers = [r["completion"][0]["content"] + tok.eos_token for r in batch_rows]
            enc = processor(text=[p + c for p, c in zip(prompts, answers)], images=[r["images"] for r in batch_rows], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            labels = enc["input_ids"].clone()
            for i, p in enumerate(prompts):
                n_prompt = len(processor(text=[p], images=[batch_rows[i]["images"]], add_special_tokens=False)["input_ids"][0])
                pad_left = int((enc["attention_mask"][i] == 0).sum()) if tok.padding_side == "left" else 0
                labels[i, : pad_left + n_prompt] = -100
            labels[enc["attention_mask"] == 0] = -100
            out = model(**enc)
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    steps = [b - a_ for a_, b in zip(ends[a.warmup - 1 : -1], ends[a.warmup :])] if a.warmup >= 1 else []
    return {"step_times_s": steps, "peak_rss_mb": peak, "rss_added_by_training_mb": peak - (rss0 or peak)}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        result = _worker(a)
        with open(a.json_out, "w") as fh:
            json.dump(result, fh)
        return 0
    started = time.time()
    tmp = tempfile.mkdtemp(prefix="posttrain-bench-vision-")
    frameworks = [f for f in a.frameworks.split(",") if f]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results, notes = [], []
    for size in [s for s in a.sizes.split(",") if s]:
        model_dir = build_model_dir(os.path.join(tmp, f"model-{size}"), SIZES[size])
        runs: dict[str, list[dict]] = {f: [] for f in frameworks}
        for rep in range(a.repeats):
            for f in frameworks:
                out = os.path.join(tmp, f"{size}-{f}-{rep}.json")
                cmd = [sys.executable, "-m", "bench.vision", "--worker", f, "--model-dir", model_dir, "--json-out", out,
                       "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--warmup", str(a.warmup), "--threads", str(a.threads)]
                t0 = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0 or not os.path.isfile(out):
                    tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
                    runs[f].append({"error": f"exit {proc.returncode}: {tail}"})
                    print(f"[bench] {size} {f} #{rep + 1}: failed: {tail[:300]}", flush=True)
                    continue
                with open(out) as fh:
                    r = json.load(fh)
                runs[f].append(r)
                print(f"[bench] {size} {f} #{rep + 1}: median step {statistics.median(r['step_times_s']):.3f}s, "
                      f"memory added {r['rss_added_by_training_mb']:.0f} MB (wall {time.time() - t0:.0f}s)", flush=True)
        base = {}
        for f in frameworks:
            ok = [r for r in runs[f] if "error" not in r]
            entry = {"size": size, "vocab_size": SIZES[size] or 515, "framework": f}
            if not ok:
                entry["error"] = runs[f][0]["error"] if runs[f] else "not run"
                notes.append(f"{size} {f}: {entry['error'][:200]}")
            else:
                steps = [t for r in ok for t in r["step_times_s"]]
                entry.update(step_s=statistics.median(steps), step_min_s=min(steps), step_max_s=max(steps),
                             added_mb=statistics.median(r["rss_added_by_training_mb"] for r in ok),
                             added_min_mb=min(r["rss_added_by_training_mb"] for r in ok), added_max_mb=max(r["rss_added_by_training_mb"] for r in ok))
                base[f] = entry
            results.append(entry)
        for entry in results:
            if entry["size"] != size or "error" in entry:
                continue
            for ref in ("trl", "bare"):
                if ref in base and entry["framework"] != ref:
                    entry[f"step_vs_{ref}"] = round(entry["step_s"] / base[ref]["step_s"], 3)
                    entry[f"memory_vs_{ref}"] = round(entry["added_mb"] / max(base[ref]["added_mb"], 1.0), 3)
    from bench.run import machine_info, versions

    report = {"machine": machine_info(), "versions": versions(), "command": "python -m bench.vision " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(a).items() if k not in ("out", "worker", "model_dir", "json_out")}, "results": results,
              "notes": notes, "total_wall_s": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print()
    for e in results:
        if "error" in e:
            print(f"{e['size']:>5} {e['framework']:<20} failed: {e['error'][:100]}")
            continue
        ratios = "  ".join(f"{k} {v}" for k, v in e.items() if k.startswith(("step_vs", "memory_vs")))
        print(f"{e['size']:>5} {e['framework']:<20} step {e['step_s']:.3f}s ({e['step_min_s']:.3f}-{e['step_max_s']:.3f})  "
              f"added {e['added_mb']:.0f} MB ({e['added_min_mb']:.0f}-{e['added_max_mb']:.0f})  {ratios}")
    print(f"\nwrote {os.path.relpath(a.out, ROOT)}; total {report['total_wall_s']:.0f}s")
    return 0


def section(path: str = OUT) -> list[str]:
    """The ``docs/benchmarks.md`` section for ``bench/results/vision.json`` (empty if it is absent)."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        rep = json.load(fh)
    s = rep["settings"]
    out = [
        "## SFT of a vision-language model (Idefics3), posttrain vs TRL vs a bare loop",
        "",
        f"`{rep['command'].strip()}` ({rep.get('date', '?')}): {s['batch_size']} rows per step, one 64 x 64 image each (16 image tokens), "
        f"answers of about 40 tokens, {s['warmup']} warm-up + {s['steps']} measured steps, {s['repeats']} interleaved rounds, "
        f"{s['threads']} thread(s). Memory: peak RSS minus RSS before training (activations of the vision tower included).",
        "",
        "| vocab | framework | step s (min–max) | × TRL | × bare | memory added MB (min–max) | × TRL | × bare |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in rep["results"]:
        if "error" in e:
            out.append(f"| {e['vocab_size']} | {e['framework']} | failed: {e['error'][:100]} | | | | | |")
            continue
        out.append(f"| {e['vocab_size']} | {e['framework']} | {e['step_s']:.3f} ({e['step_min_s']:.3f}–{e['step_max_s']:.3f}) | "
                   f"{e.get('step_vs_trl', '—')} | {e.get('step_vs_bare', '—')} | {e['added_mb']:.0f} ({e['added_min_mb']:.0f}–{e['added_max_mb']:.0f}) | "
                   f"{e.get('memory_vs_trl', '—')} | {e.get('memory_vs_bare', '—')} |")
    return out + [""] + [f"- note: {n}" for n in rep.get("notes", [])] + ([""] if rep.get("notes") else [])


if __name__ == "__main__":
    raise SystemExit(main())
