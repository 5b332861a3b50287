"""Smoke test of the benchmark harness: the bare worker runs the tiny SFT workload and writes the documented JSON.

Timing is not tested (that is `make bench`); this only keeps the harness from rotting.
"""

import json
import os
import subprocess
import sys

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
