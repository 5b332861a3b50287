"""Smoke test of the benchmark harness: the bare worker runs the tiny SFT workload and writes the documented JSON.

Timing is not tested (that is `make bench`); this only keeps the harness from rotting.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_worker_sft_writes_the_result_schema(tiny_model_dir, tiny_tokenizer, tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from bench.workloads import build_data, write_json
    finally:
        sys.path.remove(ROOT)
    rows, info = build_data("sft", tiny_tokenizer, rows=8, seq_len=16, completion_len=4)
    assert info["tokens_per_row"] == 16
    data, out = str(tmp_path / "data.json"), str(tmp_path / "out.json")
    write_json(data, rows)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.worker", "--framework", "bare", "--method", "sft", "--model-dir", tiny_model_dir,
           "--data", data, "--json-out", out, "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as fh:
        result = json.load(fh)
    assert result["framework"] == "bare" and result["method"] == "sft"
    assert len(result["step_times_s"]) == 2 and all(t > 0 for t in result["step_times_s"])
    assert len(result["step_cpu_times_s"]) == 2
    for key in ("time_to_first_step_s", "peak_rss_mb", "loss", "loadavg_start", "loadavg_end"):
        assert isinstance(result[key], float), key
    assert result["peak_rss_mb"] > 50 and result["time_to_first_step_s"] > 0
    assert result["threads"] == 1


def test_bare_worker_kto_reports_whole_run_time_and_memory_added(tiny_model_dir, tiny_tokenizer, tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from bench.workloads import build_data, write_json
    finally:
        sys.path.remove(ROOT)
    rows, info = build_data("kto", tiny_tokenizer, rows=8, seq_len=16, completion_len=4)
    assert {"prompt", "completion", "label"} <= set(rows[0]) and {r["label"] for r in rows} == {True, False}
    data, out = str(tmp_path / "data.json"), str(tmp_path / "out.json")
    write_json(data, rows)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.worker", "--framework", "bare", "--method", "kto", "--model-dir", tiny_model_dir,
           "--data", data, "--json-out", out, "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as fh:
        result = json.load(fh)
    assert result["train_s"] >= sum(result["step_times_s"]) > 0
    assert 0 < result["train_to_first_step_s"] < result["train_s"] and result["last_step_to_train_end_s"] >= 0
    assert 0 < result["rss_before_train_mb"] <= result["peak_rss_mb"]
    assert result["rss_added_by_training_mb"] == result["peak_rss_mb"] - result["rss_before_train_mb"]


def test_set_defaults_and_whole_run_table():
    sys.path.insert(0, ROOT)
    try:
        from bench.report import _whole_run_section
        from bench.run import GOALS, parse_args, with_set_defaults
    finally:
        sys.path.remove(ROOT)
    a = parse_args(["--set", "real", "--steps", "7"])
    sa = with_set_defaults(a, "real")
    assert sa.sizes == "qwen3-151k,qwen3-32k" and sa.steps == 7 and sa.warmup == 1 and sa.repeats == 2
    row = {"name": "sft-qwen3-151k", "set": "real", "vocab_size": 151936, "ratio_train_time_vs_trl": 0.7, "ratio_train_time_vs_trl_min": 0.6,
           "ratio_train_time_vs_trl_max": 0.9, "ratio_rss_added_vs_trl": 0.6, "ratio_rss_added_vs_trl_min": 0.5, "ratio_rss_added_vs_trl_max": 0.7,
           "posttrain_train_s": 1.0, "trl_train_s": 1.43}
    table = "\n".join(_whole_run_section({"results": [row]}, GOALS))
    line = next(x for x in table.splitlines() if x.startswith("| sft-qwen3-151k"))
    assert "0.70 (0.60–0.90) ✅ (≤ 0.8)" in line and "0.60 (0.50–0.70) ❌ (≤ 0.5)" in line and "1.00 / 1.43 / n/a" in line


def test_report_merge_joins_disjoint_runs_and_refuses_overlaps(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from bench.report import merge
    finally:
        sys.path.remove(ROOT)

    def report(set_name, names, threads, wall):
        return {"machine": {"cpu": "x"}, "versions": {}, "command": f"python -m bench --set {set_name}", "settings": {"threads": threads},
                "set_settings": {set_name: {"steps": 1}}, "results": [{"name": n, "set": set_name} for n in names],
                "notes": [f"{set_name} note"], "cli": None, "total_wall_s": wall, "date": set_name}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report("real", ["sft-qwen3-151k"], 1, 10.0)))
    b.write_text(json.dumps(report("tiny", ["sft-tiny", "dpo-tiny"], 1, 2.5)))
    merged = merge([str(a), str(b)])
    assert [r["name"] for r in merged["results"]] == ["sft-qwen3-151k", "sft-tiny", "dpo-tiny"]
    assert set(merged["set_settings"]) == {"real", "tiny"} and merged["total_wall_s"] == 12.5
    assert merged["notes"] == ["real note", "tiny note"] and " && " in merged["command"]
    b.write_text(json.dumps(report("tiny", ["sft-qwen3-151k"], 2, 1.0)))
    with pytest.raises(SystemExit, match="sft-qwen3-151k"):
        merge([str(a), str(b)])
