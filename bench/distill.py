"""On-policy distillation: posttrain's ``distill`` against TRL's ``DistillationTrainer`` and a bare PyTorch loop.

``python -m bench.distill [--sizes tiny,qwen3-151k] [--steps N] [--repeats R]``

Issue 19 asks ``distill`` for <= 0.8x TRL's ``train()`` time and <= 0.6x the memory TRL adds by training, on the same
student/teacher pair, at a tiny size and at a vocabulary of 151,936. Every run is a fresh process
(``python -m bench.distill --worker FRAMEWORK ...``), the frameworks interleaved (posttrain trl bare posttrain trl bare
...) for ``--repeats`` rounds, all on the same model files, prompts and settings:

* the student and a teacher twice its width (same vocabulary), float32 on CPU, ``--threads`` threads;
* per step ``--batch-size`` prompts of ``--prompt-len`` tokens, one sampled completion of exactly
  ``--completion-len`` tokens each (the end token is suppressed so every framework samples the same number of
  tokens), temperature 1, generalized JSD with ``beta`` 1.0 (reverse KL, TRL's default);
* posttrain and TRL run the same script, with the import swapped (``from posttrain.methods.distill import
  DistillationConfig, DistillationTrainer`` / ``from trl import ...``): ``max_steps=--steps``, no saving, no logging,
  no gradient checkpointing, AdamW, constant learning rate;
* the bare loop samples with ``model.generate``, runs both forwards, takes the full-vocabulary reverse KL and steps
  AdamW: the floor any framework pays for the same work.

Measured per run: the wall time of ``train()`` (the bare loop: of its loop) and the memory training adds: the peak
resident set size during ``train()`` (sampled every 2 ms by a thread) minus the resident set size just before it.
Writes ``bench/results/distill.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.worker import current_rss_mb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results", "distill.json")
FRAMEWORKS = ("posttrain", "trl", "bare")
#: size -> (student hidden, layers, vocabulary (None: the tokenizer's 512), arch); the teacher is twice as wide
SIZES = {"tiny": (64, 4, None, "qwen2"), "qwen3-151k": (256, 4, 151_936, "qwen3")}
GOALS = {"time_vs_trl": 0.8, "memory_vs_trl": 0.6}


class _PeakRSS:
    """Peak resident set size while the context is open (a thread sampling /proc/self/statm every 2 ms)."""

    def __enter__(self):
        self.before, self.peak, self._stop = current_rss_mb(), 0.0, threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, current_rss_mb())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())


def build_models(size: str, directory: str) -> tuple[str, str]:
    import torch
    import transformers

    from posttrain.testing.tiny_model import build_tokenizer

    hidden, layers, vocab, arch = SIZES[size]
    tok = build_tokenizer()
    paths = []
    for name, width, seed in (("student", hidden, 0), ("teacher", 2 * hidden, 1)):
        config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
        extra = {"head_dim": width // 4} if arch == "qwen3" else {}
        config = config_class(vocab_size=vocab or len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        path = os.path.join(directory, f"{name}-{size}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def build_prompts(tok_dir: str, rows: int, prompt_len: int) -> list[dict]:
    import random

    from transformers import AutoTokenizer

    from posttrain.testing.tiny_model import synthetic_corpus

    tok = AutoTokenizer.from_pretrained(tok_dir)
    rng = random.Random(0)
    out = []
    for _ in range(rows):
        text = " ".join(synthetic_corpus(n=max(8, prompt_len // 4), seed=rng.randint(0, 10**6)))
        ids = tok(text, add_special_tokens=False)["input_ids"][:prompt_len]
        out.append({"prompt": tok.decode(ids)})
    return out


def _worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = json.load(open(a.data))
    tok = AutoTokenizer.from_pretrained(a.student)
    result = {"framework": a.worker}
    if a.worker in ("posttrain", "trl"):
        if a.worker == "posttrain":
            from posttrain.methods.distill import DistillationConfig, DistillationTrainer
        else:
            from trl import DistillationConfig, DistillationTrainer
        args = DistillationConfig(
            output_dir=tempfile.mkdtemp(dir=a.tmp, prefix=f"out-{a.worker}-"), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=1, learning_rate=1e-5, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
            max_completion_length=a.completion_len, temperature=1.0, beta=1.0, save_strategy="no", logging_steps=10**6,
            report_to=[], disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0,
            generation_kwargs={"suppress_tokens": [tok.eos_token_id]}, dataloader_num_workers=0,
        )
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(rows),
                                      processing_class=tok)
        with _PeakRSS() as mem:
            start = time.perf_counter()
            trainer.train()
            result["train_s"] = time.perf_counter() - start
    else:
        student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.float32)
        teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32).eval()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.0)
        tok.padding_side = "left"
        with _PeakRSS() as mem:
            start = time.perf_counter()
            for step in range(a.steps):
                batch = tok([r["prompt"] for r in rows[step * a.batch_size:(step + 1) * a.batch_size]], return_tensors="pt", padding=True,
                            add_special_tokens=False)
                with torch.no_grad():
                    student.eval()
                    out = student.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.completion_len,
                                           min_new_tokens=a.completion_len, suppress_tokens=[tok.eos_token_id])
                    student.train()
                mask = torch.cat([batch["attention_mask"], torch.ones_like(out[:, batch["input_ids"].shape[1]:])], 1)
                keep = out.shape[1] - batch["input_ids"].shape[1]
                s_logp = torch.log_softmax(student(input_ids=out, attention_mask=mask, logits_to_keep=keep + 1).logits[:, :-1], -1)
                with torch.no_grad():
                    t_logp = torch.log_softmax(teacher(input_ids=out, attention_mask=mask, logits_to_keep=keep + 1).logits[:, :-1], -1)
                loss = (s_logp.exp() * (s_logp - t_logp)).sum(-1).mean()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            result["train_s"] = time.perf_counter() - start
    result.update(rss_before_mb=mem.before, peak_rss_mb=mem.peak, rss_added_by_training_mb=mem.peak - mem.before)
    return result


def _run(framework: str, student: str, teacher: str, data: str, a, tmp: str) -> dict:
    cmd = [sys.executable, "-m", "bench.distill", "--worker", framework, "--student", student, "--teacher", teacher, "--data", data,
           "--tmp", tmp, "--steps", str(a.steps), "--batch-size", str(a.batch_size), "--completion-len", str(a.completion_len),
           "--threads", str(a.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"framework": framework, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:500], "wall_s": time.time() - started}
    return {**json.loads(lines[-1]), "wall_s": time.time() - started}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.distill", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="tiny,qwen3-151k")
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT)
    # worker mode (one framework, one run)
    p.add_argument("--worker", choices=FRAMEWORKS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--student", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a)), flush=True)
        return 0
    from bench.run import machine_info, versions

    started = time.time()
    frameworks = [f for f in a.frameworks.split(",") if f]
    tmp = tempfile.mkdtemp(prefix="posttrain-bench-distill-")
    results, notes = [], []
    for size in [s for s in a.sizes.split(",") if s]:
        student, teacher = build_models(size, tmp)
        data = os.path.join(tmp, f"prompts-{size}.json")
        with open(data, "w") as fh:
            json.dump(build_prompts(student, a.steps * a.batch_size + 8, a.prompt_len), fh)
        runs = {f: [] for f in frameworks}
        for rep in range(a.repeats):
            for f in frameworks:
                r = _run(f, student, teacher, data, a, tmp)
                runs[f].append(r)
                status = r.get("error") or f"train {r['train_s']:.2f}s, +{r['rss_added_by_training_mb']:.0f} MB"
                print(f"[bench.distill] {size} {f} #{rep + 1}: {status}", flush=True)
        for f in frameworks:
            ok = [r for r in runs[f] if "error" not in r]
            entry = {"size": size, "framework": f, "vocab_size": SIZES[size][2] or 512, "student_hidden": SIZES[size][0],
                     "teacher_hidden": 2 * SIZES[size][0]}
            if not ok:
                entry["error"] = runs[f][0].get("error")
                notes.append(f"{size} {f}: {entry['error']}")
            else:
                entry.update(train_s=statistics.median(r["train_s"] for r in ok), train_s_all=[round(r["train_s"], 3) for r in ok],
                             rss_added_by_training_mb=statistics.median(r["rss_added_by_training_mb"] for r in ok),
                             peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok))
            results.append(entry)
        by = {e["framework"]: e for e in results if e["size"] == size and "error" not in e}
        for f in ("posttrain", "bare"):
            if f in by and "trl" in by:
                by[f]["time_vs_trl"] = round(by[f]["train_s"] / by["trl"]["train_s"], 3)
                by[f]["memory_vs_trl"] = round(by[f]["rss_added_by_training_mb"] / max(by["trl"]["rss_added_by_training_mb"], 1e-9), 3)
    report = {"machine": machine_info(), "versions": versions(), "command": "python -m bench.distill " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(a).items() if k in ("sizes", "frameworks", "steps", "batch_size", "prompt_len", "completion_len",
                                                                       "repeats", "threads")},
              "goals": GOALS, "results": results, "notes": notes, "total_wall_s": round(time.time() - started, 1),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=2)
    for e in results:
        print(json.dumps({k: e.get(k) for k in ("size", "framework", "train_s", "rss_added_by_training_mb", "time_vs_trl", "memory_vs_trl", "error")}))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
