"""Step time of the offline-preference plugins against DPO: ``python -m bench.preference [--methods ...] [--sizes ...]``.

Issue 11 asks the experimental preference families to step within 10% of posttrain's DPO on the same model and
batch (ORPO, CPO and SimPO need no reference model, so they should be cheaper). Every method runs on the same model
files and the same preference rows, each in a fresh ``python -m bench.worker --framework posttrain`` process,
interleaved (DPO ORPO CPO ... DPO ORPO CPO ...) for ``--repeats`` rounds:

* TPO rows carry the gold ``reference`` response as well (here the chosen text: the same tokens), which TPO scores in
  a third sequence per row (its NLL term);
* BCO is unpaired: each preference row becomes a desirable and an undesirable row, and its batch holds twice the rows,
  so one step sees the same prompts and completions as DPO's.

Writes ``bench/results/preference.json`` (rendered into ``docs/benchmarks.md`` by ``python -m bench.report``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench.run import ROOT, _cpu_builder, installed_methods, machine_info, run_worker, versions
from bench.workloads import SIZES, build_data, write_json
from bench.worker import WAVE1

OUT = os.path.join(ROOT, "bench", "results", "preference.json")
GOAL = 1.10  # step time <= 1.1 x DPO's


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.preference", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(WAVE1), help="comma-separated, timed against dpo: " + ",".join(WAVE1))
    p.add_argument("--sizes", default="small,qwen3-32k", help="comma-separated: " + ",".join(SIZES))
    p.add_argument("--batch-size", type=int, default=4, help="preference rows per step (BCO: twice as many unpaired rows)")
    p.add_argument("--seq-len", type=int, default=128, help="prompt + answer tokens of a chosen or a rejected sequence")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT)
    return p.parse_args(argv)


def _rows_for(method: str, pairs: list[dict]) -> list[dict]:
    if method == "tpo":
        return [{**r, "reference": r["chosen"]} for r in pairs]
    if method == "bco":
        return [row for r in pairs for row in ({"prompt": r["prompt"], "completion": r["chosen"], "label": True},
                                              {"prompt": r["prompt"], "completion": r["rejected"], "label": False})]
    return pairs


def main(argv=None) -> int:
    a = parse_args(argv)
    started = time.time()
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in WAVE1:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {','.join(WAVE1)}")
    have = installed_methods()
    notes = []
    for m in list(methods):
        plugin = WAVE1[m][0]
        if plugin not in have:
            notes.append(f"{m}: not measured (plugin {plugin!r} is not installed)")
            print(f"[bench] {notes[-1]}", flush=True)
            methods.remove(m)
    order = ["dpo", *methods]

    from posttrain.testing.tiny_model import build_tokenizer

    tok = build_tokenizer()
    tmp = tempfile.mkdtemp(prefix="posttrain-bench-pref-")
    results = []
    for size in [s for s in a.sizes.split(",") if s]:
        if size not in SIZES:
            raise SystemExit(f"--sizes: unknown size {size!r}; choose from {','.join(SIZES)}")
        model_dir = _cpu_builder(size)(os.path.join(tmp, f"model-{size}"))
        pairs, _ = build_data("dpo", tok, rows=max(64, (a.warmup + a.steps + 2) * a.batch_size), seq_len=a.seq_len, completion_len=0)
        runs: dict[str, list[dict]] = {m: [] for m in order}
        for rep in range(a.repeats):
            for m in order:
                wa = argparse.Namespace(batch_size=a.batch_size * (2 if m == "bco" else 1), completion_len=0, num_generations=1,
                                        steps=a.steps, warmup=a.warmup, threads=a.threads, device="cpu")
                data_path = os.path.join(tmp, f"data-{m}.json")
                write_json(data_path, _rows_for(m, pairs))
                r = run_worker("posttrain", m, model_dir, data_path, wa, a.seq_len, tmp, f"{m}-{size}-{rep}")
                runs[m].append(r)
                status = r["error"] if "error" in r else f"median step {statistics.median(r['step_times_s']):.4f}s"
                print(f"[bench] {m}-{size} #{rep + 1}: {status} (wall {r['wall_s']:.1f}s)", flush=True)
        for m in order:
            ok = [r for r in runs[m] if "error" not in r]
            entry = {"method": m, "size": size, "vocab_size": SIZES[size][2] or len(tok),
                     "rows_per_step": a.batch_size * (2 if m == "bco" else 1)}
            if not ok:
                entry["error"] = runs[m][0]["error"] if runs[m] else "not run"
                notes.append(f"{m}-{size}: failed: {entry['error'][:300]}")
                results.append(entry)
                continue
            steps = [t for r in ok for t in r["step_times_s"]]
            entry.update(step_s=statistics.median(steps), step_min_s=min(steps), step_max_s=max(steps),
                         peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in ok),
                         rss_added_by_training_mb=statistics.median(r["rss_added_by_training_mb"] for r in ok),
                         loadavg=round(statistics.mean(x for r in ok for x in (r["loadavg_start"], r["loadavg_end"])), 2))
            per_round = [(statistics.median(x["step_times_s"]), statistics.median(y["step_times_s"]))
                         for x, y in zip(runs[m], runs["dpo"]) if "error" not in x and "error" not in y]
            if per_round and m != "dpo":
                ratios = [x / y for x, y in per_round]
                dpo = next(e for e in results if e["method"] == "dpo" and e["size"] == size)
                entry.update(ratio_step_vs_dpo=round(entry["step_s"] / dpo["step_s"], 4),
                             ratio_step_vs_dpo_min=round(min(ratios), 4), ratio_step_vs_dpo_max=round(max(ratios), 4))
            results.append(entry)
    report = {"machine": machine_info(), "versions": versions(), "command": "python -m bench.preference " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": {k: v for k, v in vars(a).items() if k != "out"}, "goal_ratio_step_vs_dpo": GOAL, "results": results,
              "notes": notes, "total_wall_s": round(time.time() - started, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_json(a.out, report)
    print()
    for e in results:
        ratio = e.get("ratio_step_vs_dpo")
        extra = "" if ratio is None else f"  x DPO {ratio:.3f} ({e['ratio_step_vs_dpo_min']:.3f}-{e['ratio_step_vs_dpo_max']:.3f})"
        print(f"{e['method']:>6}-{e['size']:<11} " + (e.get("error", "")[:80] or f"step {e['step_s']:.4f}s ({e['step_min_s']:.4f}-{e['step_max_s']:.4f}){extra}"))
    for n in notes:
        print(f"note: {n}")
    print(f"\nwrote {os.path.relpath(a.out, ROOT)}; total {report['total_wall_s']:.0f}s")
    return 0


def section(path: str = OUT) -> list[str]:
    """The ``docs/benchmarks.md`` section for ``bench/results/preference.json`` (empty if it is absent)."""
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        rep = json.load(fh)
    s = rep["settings"]
    goal = rep.get("goal_ratio_step_vs_dpo", GOAL)
    out = [
        "## Offline preference plugins vs DPO (steady-state step)",
        "",
        f"`{rep['command'].strip()}` ({rep.get('date', '?')}): posttrain's experimental preference plugins against posttrain's DPO "
        f"on the same model and rows: {s['batch_size']} preference rows per step (BCO: the same rows unpaired, {2 * s['batch_size']} "
        f"per step; TPO: plus its gold reference), sequences of {s['seq_len']} tokens, {s['warmup']} warm-up + {s['steps']} measured "
        f"steps, {s['repeats']} interleaved rounds, {s['threads']} thread(s). Goal: step ≤ {goal} × DPO's.",
        "",
        "| method | size (vocab) | step s (min–max) | × DPO (min–max over rounds) | memory added MB | peak RSS MB | load |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in rep["results"]:
        if "error" in e:
            out.append(f"| {e['method']} | {e['size']} ({e['vocab_size']}) | failed: {e['error'][:120]} | | | | |")
            continue
        r = e.get("ratio_step_vs_dpo")
        ratio = "—" if r is None else f"{r:.3f} ({e['ratio_step_vs_dpo_min']:.3f}–{e['ratio_step_vs_dpo_max']:.3f}) {'✅' if r <= goal else '❌'}"
        out.append(f"| {e['method']} | {e['size']} ({e['vocab_size']}) | {e['step_s']:.4f} ({e['step_min_s']:.4f}–{e['step_max_s']:.4f}) | {ratio} "
                   f"| {e['rss_added_by_training_mb']:.0f} | {e['peak_rss_mb']:.0f} | {e['loadavg']} |")
    return out + [""] + [f"- note: {n}" for n in rep.get("notes", [])] + ([""] if rep.get("notes") else [])


if __name__ == "__main__":
    raise SystemExit(main())
