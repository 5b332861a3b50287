"""Benchmark orchestrator: ``python -m bench [--set tiny|real|all] [--methods ...] [--sizes ...] ...`` (also ``make bench``).

Workload sets (``bench.workloads.SETS``): ``tiny`` (vocabulary 512, hidden 64 and 256; steady-state steps) and
``real`` (Qwen3-shaped, hidden 256, 4 layers, output layers of 151,936 and 32,000 rows, sequences of 256-512
tokens; whole ``train()`` runs); ``all`` (the default) runs both into one results file.
For every workload (method x model size) it runs posttrain, TRL and a bare PyTorch loop, each in
its own fresh subprocess (``python -m bench.worker``), interleaved A B C A B C for ``--repeats``
rounds so that machine noise hits all three alike. Then it times ``posttrain list`` against
``python -c "import torch"``, prints a table, writes ``bench/results/latest.json`` and renders
``docs/benchmarks.md`` from it (``python -m bench.report``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.workloads import FRAMEWORKS, METHODS, SETS, SIZES, build_data, default_seq_len, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "latest.json")
VERSIONED = ("posttrain", "torch", "transformers", "trl", "accelerate", "datasets", "peft")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--set", default="all", choices=[*SETS, "all"],
                   help="workload set: tiny (vocabulary 512), real (vocabularies 151,936 and 32,000, sequences 256-512), all (both)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ",".join(METHODS))
    p.add_argument("--sizes", default=None, help="comma-separated, overrides the set's sizes: " + ",".join(SIZES))
    p.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (prompts for grpo/rloo; x num-generations completions)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row for sft/dpo/kto, prompt tokens for grpo/rloo (default: the set's, see bench.workloads.SETS)")
    p.add_argument("--completion-len", type=int, default=None, help="sampled tokens per completion (default: the set's)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="measured optimizer steps per run after warm-up (default: the set's, tiny 20, real 5)")
    p.add_argument("--warmup", type=int, default=None, help="default: the set's (tiny 3, real 1)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default: the set's, tiny 3, real 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (and OMP/MKL threads) of every worker")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the GPU path (bench.gpu); skips cleanly without CUDA")
    p.add_argument("--list-runs", type=int, default=7, help="runs of `posttrain list` and `import torch` (0 skips)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--no-doc", action="store_true", help="do not re-render docs/benchmarks.md")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- environment
def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
    }


def versions() -> dict:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    plugins = {}
    for ep in md.entry_points(group="posttrain.methods"):
        dist = ep.dist
        plugins[ep.name] = f"{dist.metadata['Name']} {dist.version}" if dist is not None else "?"
    out["posttrain_plugins"] = dict(sorted(plugins.items()))
    return out


def installed_methods() -> set[str]:
    return {ep.name for ep in md.entry_points(group="posttrain.methods")}


def worker_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TRANSFORMERS_VERBOSITY="error",
        DATASETS_VERBOSITY="error",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        PYTHONWARNINGS="ignore",
        WANDB_DISABLED="true",
    )
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# ---------------------------------------------------------------------- one run
def run_worker(framework: str, method: str, model_dir: str, data_path: str, a, seq_len: int, tmp: str, tag: str, flags=()) -> dict:
    out = os.path.join(tmp, f"{tag}.json")
    cmd = [
        sys.executable, "-m", "bench.worker", "--framework", framework, "--method", method, "--model-dir", model_dir,
        "--data", data_path, "--json-out", out, "--batch-size", str(a.batch_size), "--seq-len", str(seq_len),
        "--completion-len", str(a.completion_len), "--num-generations", str(a.num_generations), "--steps", str(a.steps),
        "--warmup", str(a.warmup), "--threads", str(a.threads), "--device", a.device, *flags,
    ]
    t0 = time.time()
    proc = subprocess.run(cmd + ["--t0", repr(t0)], cwd=ROOT, env=worker_env(a.threads), capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0 or not os.path.isfile(out):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    with open(out) as fh:
        result = json.load(fh)
    result["wall_s"] = wall
    return result


def summarize(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    steps = [t for r in ok for t in r["step_times_s"]]
    return {
        "step_s": statistics.median(steps),
        "step_min_s": min(steps),
        "step_max_s": max(steps),
        "step_median_per_repeat_s": [statistics.median(r["step_times_s"]) for r in ok],
        "step_cpu_s": statistics.median(t for r in ok for t in r["step_cpu_times_s"]),
        "loadavg": round(statistics.mean(x for r in ok for x in (r["loadavg_start"], r["loadavg_end"])), 2),
        "time_to_first_step_s": statistics.median(r["time_to_first_step_s"] for r in ok),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
        "peak_rss_at_last_step_mb": statistics.median(r["peak_rss_at_last_step_mb"] for r in ok),
        "peak_gpu_mem_mb": statistics.median(r["peak_gpu_mem_mb"] for r in ok) if all("peak_gpu_mem_mb" in r for r in ok) else None,
        "loss": statistics.median(r["loss"] for r in ok),
        "memory_floor_mb": statistics.median(r["memory_floor_mb"] for r in ok) if all(r.get("memory_floor_mb") is not None for r in ok) else None,
        "threads": ok[0].get("threads"),
        "repeats_ok": len(ok),
        "measured_steps": len(steps),
    }


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


# ---------------------------------------------------------------------- posttrain list
def time_cli(runs: int) -> dict | None:
    if runs <= 0:
        return None
    exe = os.path.join(os.path.dirname(sys.executable), "posttrain")
    cmds = {
        "posttrain_list": [exe, "list"] if os.path.exists(exe) else [sys.executable, "-m", "posttrain", "list"],
        "import_torch": [sys.executable, "-c", "import torch"],
    }
    env = worker_env(2)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs):  # interleaved, like the training runs
        for key, cmd in cmds.items():
            t = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            times[key].append(time.perf_counter() - t)
            if proc.returncode != 0:
                return {"error": f"{shlex.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_all_s": v for k, v in times.items()})
    out["ratio_list_vs_import_torch"] = _ratio(out["posttrain_list_s"], out["import_torch_s"])
    out["command"] = shlex.join(cmds["posttrain_list"])
    return out


# ---------------------------------------------------------------------- table
def fmt_table(results: list[dict]) -> str:
    head = ("workload", "params", "tok/step", "posttrain step s (min-max)", "TRL step s (min-max)", "bare step s (min-max)",
            "pt/TRL", "pt/bare", "tok/s pt|TRL|bare", "RSS MB pt|TRL|bare", "floor MB", "above floor MB pt|TRL|bare",
            "1st step s pt|TRL|bare")
    rows = [head]

    def cell(r, fw):
        s = r.get(f"{fw}_step_s")
        return "n/a" if s is None else f"{s:.4f} ({r[f'{fw}_step_min_s']:.4f}-{r[f'{fw}_step_max_s']:.4f})"

    def trio(r, key, f):
        return "|".join("n/a" if r.get(f"{fw}_{key}") is None else f.format(r[f"{fw}_{key}"]) for fw in FRAMEWORKS)

    for r in results:
        rows.append((
            r["name"], f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_step']:.0f}", cell(r, "posttrain"), cell(r, "trl"), cell(r, "bare"),
            "n/a" if r.get("ratio_step_time_vs_trl") is None else f"{r['ratio_step_time_vs_trl']:.3f}",
            "n/a" if r.get("ratio_step_time_vs_bare") is None else f"{r['ratio_step_time_vs_bare']:.3f}",
            trio(r, "tokens_per_s", "{:.0f}"), trio(r, "peak_rss_mb", "{:.0f}"),
            next((f"{r[f'{fw}_memory_floor_mb']:.1f}" for fw in FRAMEWORKS if r.get(f"{fw}_memory_floor_mb") is not None), "n/a"),
            trio(r, "memory_above_floor_mb", "{:.0f}"), trio(r, "time_to_first_step_s", "{:.2f}"),
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------- main
def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cuda":
        from bench.gpu import main as gpu_main

        return gpu_main(a, argv)
    plans = []
    for set_name in (list(SETS) if a.set == "all" else [a.set]):
        sa = with_set_defaults(a, set_name)
        plans.append((set_name, sa, {s: _cpu_builder(s) for s in sa.sizes.split(",") if s}))
    return run_all(a, argv, plans=plans, worker_flags=[], out=a.out)


def with_set_defaults(a, set_name: str) -> argparse.Namespace:
    """A copy of the arguments with every flag left unset taken from ``SETS[set_name]``."""
    defaults = SETS[set_name]
    sa = argparse.Namespace(**vars(a))
    sa.set = set_name
    for key in ("steps", "warmup", "repeats", "completion_len"):
        if getattr(sa, key) is None:
            setattr(sa, key, defaults[key])
    if sa.sizes is None:
        sa.sizes = ",".join(defaults["sizes"])
    for s in sa.sizes.split(","):
        if s and s not in SIZES:
            raise SystemExit(f"--sizes: unknown size {s!r}; choose from {','.join(SIZES)}")
    return sa


def _cpu_builder(size: str):
    def build(directory: str) -> str:
        import torch
        import transformers

        from posttrain.testing.tiny_model import build_tokenizer

        hidden, layers, vocab, arch = SIZES[size]
        tok = build_tokenizer()
        config_class = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[arch]
        extra = {"head_dim": hidden // 4} if arch == "qwen3" else {}
        config = config_class(
            vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None, **extra,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
        model.save_pretrained(directory)
        tok.save_pretrained(directory)
        return directory

    return build


def _paired_ratios(num: list[dict], den: list[dict], key: str) -> list[float]:
    """``num[i][key] / den[i][key]`` for the repeats where both ran (repeat i of both ran in the same round)."""
    return [x[key] / y[key] for x, y in zip(num, den) if "error" not in x and "error" not in y and y.get(key)]


def run_all(a, argv, *, plans: list, worker_flags: list[str], out: str, peak_flops: float | None = None) -> int:
    """Run every (method, size) workload of every plan ``(set name, args, size builders)`` on every framework,
    then the CLI timing; write JSON (+ doc)."""
    started = time.time()
    methods = [m for m in a.methods.split(",") if m]
    frameworks = [f for f in a.frameworks.split(",") if f]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from posttrain.testing.tiny_model import build_tokenizer

    have = installed_methods()
    tmp = tempfile.mkdtemp(prefix="posttrain-bench-")
    tok = build_tokenizer()
    results, notes, set_settings = [], [], {}
    for set_name, sa, size_builders in plans:
        set_settings[set_name] = {k: getattr(sa, k) for k in ("sizes", "steps", "warmup", "repeats", "completion_len", "batch_size", "num_generations")}
        set_settings[set_name]["seq_len"] = {m: sa.seq_len or default_seq_len(m, set_name) for m in methods}
        results_of_set, notes_of_set = _run_set(sa, set_name, size_builders, methods, frameworks, have, tok, tmp, worker_flags, peak_flops)
        results += results_of_set
        notes += notes_of_set
    shutil.rmtree(tmp, ignore_errors=True)  # the models (a 151,936-row one is 160 MB), data and worker JSONs
    cli = None
    if a.device == "cpu":
        print("[bench] timing `posttrain list` and `import torch` ...", flush=True)
        cli = time_cli(a.list_runs)
    total = time.time() - started
    report = {
        "machine": machine_info(),
        "versions": versions(),
        "command": " ".join(["python -m bench", shlex.join(argv if argv is not None else sys.argv[1:])]).strip(),
        "settings": {k: v for k, v in vars(a).items() if k not in ("out", "no_doc")},
        "set_settings": set_settings,
        "timing_method": TIMING_METHOD,
        "results": results,
        "cli": cli,
        "notes": notes,
        "goals": GOALS,
        "total_wall_s": round(total, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # the posttrain this process imported (PYTHONPATH in front of the editable installs: an older checkout)
        "posttrain_file": getattr(sys.modules.get("posttrain"), "__file__", None),
    }
    if peak_flops:
        report["peak_flops"] = peak_flops
    write_json(out, report)
    print()
    print(fmt_table(results))
    if cli:
        if "error" in cli:
            print(f"\nposttrain list: {cli['error']}")
        else:
            print(f"\n`posttrain list` {cli['posttrain_list_s']:.3f}s vs `python -c 'import torch'` {cli['import_torch_s']:.3f}s "
                  f"(ratio {cli['ratio_list_vs_import_torch']:.3f}; medians of {a.list_runs})")
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {os.path.relpath(out, ROOT)}; total {total:.0f}s")
    if not a.no_doc and os.path.abspath(out) == os.path.abspath(RESULTS):
        from bench.report import render_to_doc

        print(f"wrote {render_to_doc(out)}")
    return 0


def _run_set(a, set_name, size_builders, methods, frameworks, have, tok, tmp, worker_flags, peak_flops) -> tuple[list[dict], list[str]]:
    """Every (method, size) workload of one set on every framework; return ``(results, notes)``."""
    results, notes = [], []
    for size, builder in size_builders.items():
        model_dir = builder(os.path.join(tmp, f"model-{size}"))
        params = _count_params(model_dir)
        with open(os.path.join(model_dir, "config.json")) as fh:
            config = json.load(fh)
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        for method in methods:
            name = f"{method}-{size}"
            seq_len = a.seq_len or default_seq_len(method, set_name)
            n_rows = max(64, (a.warmup + a.steps + 2) * a.batch_size)
            rows, info = build_data(method, tok, rows=n_rows, seq_len=seq_len, completion_len=a.completion_len)
            data_path = os.path.join(tmp, f"data-{method}.json")
            write_json(data_path, rows)
            per_step_rows = a.batch_size * (a.num_generations if method in ("grpo", "rloo") else 1)
            tokens_per_step = info["tokens_per_row"] * per_step_rows
            fws = list(frameworks)
            if "posttrain" in fws and method not in have:
                notes.append(f"{name}: posttrain not available (no installed plugin provides method {method!r}); TRL and bare still measured")
                print(f"[bench] {notes[-1]}", flush=True)
                fws.remove("posttrain")
            runs: dict[str, list[dict]] = {fw: [] for fw in fws}
            for rep in range(a.repeats):
                for fw in fws:
                    r = run_worker(fw, method, model_dir, data_path, a, seq_len, tmp, f"{name}-{fw}-{rep}", worker_flags)
                    runs[fw].append(r)
                    status = r["error"] if "error" in r else (
                        f"median step {statistics.median(r['step_times_s']):.4f}s, first step {r['time_to_first_step_s']:.2f}s, "
                        f"load {r['loadavg_start']:.1f}"
                    )
                    print(f"[bench] {name} {fw} #{rep + 1}: {status} (wall {r['wall_s']:.1f}s)", flush=True)
            entry = {"name": name, "set": set_name, "method": method, "size": size, "params": params, "hidden_size": hidden,
                     "num_layers": layers, "vocab_size": config["vocab_size"], "steps": a.warmup + a.steps,
                     "seq_len": seq_len, "batch_size": a.batch_size, "tokens_per_step": tokens_per_step}
            if method in ("grpo", "rloo"):
                entry.update(num_generations=a.num_generations, completion_len=a.completion_len)
            for fw in FRAMEWORKS:
                summary = summarize(runs.get(fw, []))
                errors = [r["error"] for r in runs.get(fw, []) if "error" in r]
                if errors:
                    entry[f"{fw}_errors"] = errors
                    notes.append(f"{name}: {fw} failed in {len(errors)} of {a.repeats} runs: {errors[0][:300]}")
                if summary is None:
                    entry[f"{fw}_step_s"] = None
                    continue
                entry[f"{fw}_step_s"] = summary.pop("step_s")
                entry[f"{fw}_tokens_per_s"] = tokens_per_step / entry[f"{fw}_step_s"]
                if peak_flops:
                    # training FLOPs only (6 x params x tokens); generation and reference forwards are not counted
                    entry[f"{fw}_mfu"] = 6 * params * entry[f"{fw}_tokens_per_s"] / peak_flops
                for key, value in summary.items():
                    entry[f"{fw}_{key}"] = value
            entry["ratio_step_time_vs_trl"] = _ratio(entry.get("posttrain_step_s"), entry.get("trl_step_s"))
            entry["ratio_step_time_vs_bare"] = _ratio(entry.get("posttrain_step_s"), entry.get("bare_step_s"))
            entry["ratio_step_cpu_vs_trl"] = _ratio(entry.get("posttrain_step_cpu_s"), entry.get("trl_step_cpu_s"))
            entry["ratio_step_cpu_vs_bare"] = _ratio(entry.get("posttrain_step_cpu_s"), entry.get("bare_step_cpu_s"))
            entry["ratio_peak_rss_vs_trl"] = _ratio(entry.get("posttrain_peak_rss_mb"), entry.get("trl_peak_rss_mb"))
            entry["ratio_time_to_first_step_vs_trl"] = _ratio(entry.get("posttrain_time_to_first_step_s"), entry.get("trl_time_to_first_step_s"))
            if entry.get("posttrain_peak_gpu_mem_mb") is not None:
                entry["ratio_peak_gpu_mem_vs_trl"] = _ratio(entry.get("posttrain_peak_gpu_mem_mb"), entry.get("trl_peak_gpu_mem_mb"))
            for fw in FRAMEWORKS:  # whole train() and memory added, and posttrain's ratios per round (min-max)
                if entry.get(f"{fw}_step_s") is None:
                    continue
                for key in ("train_s", "rss_added_by_training_mb", "memory_above_floor_mb"):
                    values = [r.get(key) for r in runs[fw] if "error" not in r]
                    if None in values:  # memory_above_floor_mb: a worker older than the floor
                        continue
                    entry[f"{fw}_{key}"], entry[f"{fw}_{key}_min"], entry[f"{fw}_{key}_max"] = statistics.median(values), min(values), max(values)
            for key in ("posttrain_file", "plugin_file"):  # which code the posttrain runs imported (before/after checks it)
                files = {r.get(key) for r in runs.get("posttrain", []) if "error" not in r}
                if files:
                    entry[key] = ", ".join(sorted(map(str, files)))
            for other in ("trl", "bare"):
                if entry.get("posttrain_step_s") is None or entry.get(f"{other}_step_s") is None:
                    continue
                for key, short in (("train_s", "train_time"), ("rss_added_by_training_mb", "rss_added"), ("peak_rss_mb", "peak_rss")):
                    paired = _paired_ratios(runs["posttrain"], runs[other], key)
                    entry[f"ratio_{short}_vs_{other}"] = _ratio(entry[f"posttrain_{key}"], entry[f"{other}_{key}"])
                    entry[f"ratio_{short}_vs_{other}_min"] = round(min(paired), 4)
                    entry[f"ratio_{short}_vs_{other}_max"] = round(max(paired), 4)
                # memory added above the floor (gradients + optimizer state): a ratio only where both are above it
                mine, theirs = entry.get("posttrain_memory_above_floor_mb"), entry.get(f"{other}_memory_above_floor_mb")
                if mine is not None and theirs is not None and mine > 0 and theirs > 0:
                    paired = [x["memory_above_floor_mb"] / y["memory_above_floor_mb"] for x, y in zip(runs["posttrain"], runs[other])
                              if "error" not in x and "error" not in y and x["memory_above_floor_mb"] > 0 and y["memory_above_floor_mb"] > 0]
                    entry[f"ratio_above_floor_vs_{other}"] = _ratio(mine, theirs)
                    entry[f"ratio_above_floor_vs_{other}_min"] = round(min(paired), 4) if paired else None
                    entry[f"ratio_above_floor_vs_{other}_max"] = round(max(paired), 4) if paired else None
                steps_paired = [x / y for x, y in
                                zip(entry["posttrain_step_median_per_repeat_s"], entry[f"{other}_step_median_per_repeat_s"])]
                entry[f"ratio_step_time_vs_{other}_min"] = round(min(steps_paired), 4) if steps_paired else None
                entry[f"ratio_step_time_vs_{other}_max"] = round(max(steps_paired), 4) if steps_paired else None
            results.append(entry)
    return results, notes


TIMING_METHOD = {
    "train_time": "the whole trainer.train() call in the worker (posttrain and TRL; the bare loop: its first step's start to its "
    "last step's end), one fresh process per framework x method x repeat; posttrain's includes its final save_pretrained of the "
    "model (TRL's train() saves nothing with save_strategy='no'); ratios are of medians, min-max over the rounds (round i of "
    "posttrain / round i of the other, which ran right after it)",
    "rss_added_by_training": "peak RSS (ru_maxrss) after train() minus the RSS just before train() (/proc/self/statm): what "
    "training adds on top of the loaded model(s), data and imports",
    "memory_floor": "what no framework can avoid for the trained parameters, read from each run's own model and optimizer "
    "after train(): a gradient per trainable parameter (numel x element size) plus every tensor in optimizer.state (AdamW: "
    "exp_avg, exp_avg_sq in the state's dtype, and step); memory above the floor = memory added by training - floor "
    "(GPU runs: peak GPU memory - floor, the weights included)",
    "step_time": "wall time between consecutive optimizer-step ends after warm-up (posttrain: wrapped method.on_step_end; "
    "TRL: TrainerCallback.on_step_end; bare: perf_counter after zero_grad); median over all measured steps of all repeats, "
    "min-max over the same steps",
    "step_cpu_time": "the same intervals in process CPU time (all threads); less sensitive to other processes on a shared machine",
    "time_to_first_step": "parent's time.time() before starting the worker process -> end of the first optimizer step "
    "(interpreter start, imports, model and data loading, trainer setup, first step)",
    "peak_rss": "resource.getrusage(RUSAGE_SELF).ru_maxrss of the worker after training, including posttrain's final "
    "save of the model (median over repeats); peak_rss_at_last_step_mb in the JSON is the same at the last step's end",
    "tokens_per_s": "real (non-pad) tokens one step processes (SFT: the rows; DPO: prompt+chosen and prompt+rejected; "
    "GRPO/RLOO: prompt+completion of every completion, completions counted at full length) / median step time",
    "load": "1-minute load average around each run (mean); above the core count, other processes shared the CPU",
}


GOALS = {
    # per workload set, on the whole-run table (train() time, memory added by training, steady-state step)
    "by_set": {
        "tiny": {"ratio_train_time_vs_trl": 0.9, "ratio_step_time_vs_bare": 1.05},
        "real": {"ratio_train_time_vs_trl": 0.8, "ratio_rss_added_vs_trl": 0.5},  # at the 151,936 vocabulary (qwen3-151k)
    },
    "ratio_step_time_vs_trl": 0.77,
    "ratio_step_time_vs_bare": 1.10,
    "ratio_peak_rss_vs_trl": 1.0,
    "posttrain_list_s": 0.3,
    "ratio_list_vs_import_torch": 0.2,
}


def _count_params(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in os.listdir(model_dir):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, f), "np") as st:
                for k in st.keys():
                    total += math.prod(st.get_slice(k).get_shape())
    return total
