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


def _bench(module: str):
    import importlib

    sys.path.insert(0, ROOT)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(ROOT)


def test_posttrain_worker_records_the_memory_floor_and_the_code_it_imported(tiny_model_dir, tiny_tokenizer, tmp_path):
    import posttrain
    import torch
    from transformers import AutoModelForCausalLM

    workloads = _bench("bench.workloads")
    rows, _ = workloads.build_data("sft", tiny_tokenizer, rows=8, seq_len=16, completion_len=4)
    data, out = str(tmp_path / "data.json"), str(tmp_path / "out.json")
    workloads.write_json(data, rows)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench.worker", "--framework", "posttrain", "--method", "sft", "--model-dir", tiny_model_dir,
           "--data", data, "--json-out", out, "--batch-size", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as fh:
        result = json.load(fh)
    # the floor from the model's own parameters: fp32 gradients (4 bytes each), AdamW's two fp32 moments, and one
    # step counter per parameter tensor (a 0-d tensor of 4 or 8 bytes, by torch version and default dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    detail = result["memory_floor_detail"]
    assert detail["gradients_mb"] == n * 4 / 2**20  # float32 gradients: 4 bytes each (a power-of-two division: exact)
    assert 2 * n * 4 / 2**20 <= detail["optimizer_state_mb"] <= (2 * n * 4 + 8 * len(params)) / 2**20
    assert result["memory_floor_mb"] == detail["gradients_mb"] + detail["optimizer_state_mb"] > 0
    assert result["memory_floor_mb"] <= result["peak_rss_mb"]
    assert result["memory_above_floor_mb"] == result["rss_added_by_training_mb"] - result["memory_floor_mb"]
    assert result["memory_above_floor_basis"] == "rss_added_by_training_mb"
    assert os.path.samefile(result["posttrain_file"], posttrain.__file__)
    assert result["plugin_file"].endswith(os.path.join("posttrain_sft", "trainer.py"))


def test_memory_floor_counts_each_trainable_parameter_once_and_every_optimizer_state_tensor():
    import torch

    memory_floor = _bench("bench.worker").memory_floor
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # tied: one parameter, one gradient
    frozen = torch.nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = torch.nn.ModuleDict({"emb": emb, "head": head, "frozen": frozen})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(ValueError, match="state is empty"):
        memory_floor([model], [opt])
    head(frozen(emb(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    floor = memory_floor([model, emb], [opt])  # emb listed twice: still counted once
    step_bytes = opt.state[emb.weight]["step"].element_size()
    assert floor["gradients_mb"] == 40 * 4 / 2**20
    assert floor["optimizer_state_mb"] == (2 * 40 * 4 + step_bytes) / 2**20
    assert floor["total_mb"] == pytest.approx(floor["gradients_mb"] + floor["optimizer_state_mb"], rel=1e-12)
    with pytest.raises(ValueError, match="requires_grad"):
        memory_floor([frozen], [opt])


def _results(tag: str, workloads: dict, posttrain_file: str) -> dict:
    """A results file of `python -m bench` holding only what bench.compare reads."""
    results = []
    for name, (pt_step, bare_step, lo, hi, rounds, added, above) in workloads.items():
        results.append({
            "name": name, "set": "tiny", "vocab_size": 512, "posttrain_file": posttrain_file,
            "posttrain_step_s": pt_step, "bare_step_s": bare_step, "trl_step_s": 2 * bare_step,
            "posttrain_repeats_ok": rounds, "bare_repeats_ok": rounds, "trl_repeats_ok": rounds,
            "posttrain_rss_added_by_training_mb": added, "posttrain_memory_above_floor_mb": above,
            "ratio_step_time_vs_bare": pt_step / bare_step, "ratio_step_time_vs_bare_min": lo, "ratio_step_time_vs_bare_max": hi,
            "ratio_step_time_vs_trl": pt_step / (2 * bare_step),
        })
    return {"machine": {"cpu": "x"}, "command": f"python -m bench --set tiny ({tag})", "date": tag, "settings": {"threads": 1},
            "posttrain_file": posttrain_file, "results": results}


def test_compare_flags_a_ratio_to_bare_rising_beyond_the_runs_spread(tmp_path, capsys):
    compare = _bench("bench.compare")
    before = _results("before", {
        "sft-tiny": (0.100, 0.100, 0.98, 1.03, 3, 40.0, 38.0),    # ratio 1.00, spread 0.05
        "dpo-tiny": (0.200, 0.200, 0.90, 1.10, 3, 80.0, 70.0),    # ratio 1.00, spread 0.20
        "kto-tiny": (0.150, 0.150, 1.00, 1.00, 1, 50.0, 45.0),    # one round: no spread
        "grpo-tiny": (0.300, 0.300, 0.99, 1.01, 3, 60.0, 55.0),   # not in AFTER
    }, "/old/core/posttrain/__init__.py")
    after = _results("after", {
        "sft-tiny": (0.110, 0.100, 1.08, 1.12, 3, 30.0, 28.0),    # +0.10 > 0.05: a regression
        "dpo-tiny": (0.220, 0.200, 0.95, 1.20, 3, 80.0, 70.0),    # +0.10 < 0.25: within the spread
        "kto-tiny": (0.180, 0.150, 1.20, 1.20, 1, 50.0, 45.0),    # worse, but unconfirmed
    }, "/new/core/posttrain/__init__.py")
    b, a = tmp_path / "before.json", tmp_path / "after.json"
    b.write_text(json.dumps(before))
    a.write_text(json.dumps(after))
    assert compare.main([str(b), str(a)]) == 0
    text = capsys.readouterr().out
    assert compare.main([str(b), str(a), "--strict"]) == 1
    capsys.readouterr()
    lines, regressions = compare.compare(before, after)
    assert regressions == ["sft-tiny: step posttrain/bare 1.000 -> 1.100 (REGRESSION: +0.100 > spread 0.050)"]
    assert "\n".join(lines) == text.rstrip("\n")
    section = text.split("\nsft-tiny ")[1].split("\ndpo-tiny ")[0]
    assert "0.1000 -> 0.1100 +10.0%" in section and "40 -> 30 -25.0%" in section and "38 -> 28" in section
    trl_row = next(x for x in section.splitlines() if x.strip().startswith("step posttrain/TRL")).split()
    assert trl_row[2:] == ["0.500", "0.550"]  # shown, not judged (the goal against TRL is not a regression test)
    assert "within spread (+0.100, spread 0.250)" in text
    assert "worse, unconfirmed" in text.split("\nkto-tiny ")[1]
    assert "only in BEFORE: grpo-tiny" in text
    assert "/old/core/posttrain/__init__.py" in text and "/new/core/posttrain/__init__.py" in text
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_results("x", {"sft-small": (0.1, 0.1, 1.0, 1.0, 2, 1.0, 1.0)}, "")))
    with pytest.raises(SystemExit, match="share no workload"):
        compare.main([str(b), str(other)])


def test_report_shows_the_memory_floor_and_the_excess_over_it():
    report = _bench("bench.report")
    row = {"name": "sft-qwen3-151k", "vocab_size": 151936, "posttrain_memory_floor_mb": 465.2, "trl_memory_floor_mb": 465.2,
           "bare_memory_floor_mb": 465.2, "posttrain_rss_added_by_training_mb": 900.0, "trl_rss_added_by_training_mb": 1400.0,
           "bare_rss_added_by_training_mb": 700.0, "posttrain_memory_above_floor_mb": 434.8, "trl_memory_above_floor_mb": 934.8,
           "bare_memory_above_floor_mb": 234.8, "ratio_above_floor_vs_trl": 0.4651, "ratio_above_floor_vs_trl_min": 0.45,
           "ratio_above_floor_vs_trl_max": 0.48}
    lines = report._memory_floor_section({"results": [row]})
    line = next(x for x in lines if x.startswith("| sft-qwen3-151k"))
    assert line == "| sft-qwen3-151k | 151936 | 465.2 | 900 / 1400 / 700 | 435 / 935 / 235 | 0.47 (0.45–0.48) | n/a |"
    assert report._memory_floor_section({"results": [{"name": "old-format"}]}) == []
