"""The distillation diagnostics: a divergence to the teacher that stopped falling, a student collapsing onto a teacher mode,
and the verdict of a distillation run judged by its divergence (lower is better)."""

from __future__ import annotations

import json
import math
import os

from posttrain.diagnostics import check_history, diagnose

SIGNALS = {"teacher_divergence": "loss", "entropy": "entropy", "teacher_entropy": "teacher_entropy"}


def _rows(divergences, entropies=None, teacher_entropies=None):
    rows = []
    for i, d in enumerate(divergences):
        row = {"step": i + 1, "loss": d}
        if entropies is not None:
            row["entropy"] = entropies[i]
        if teacher_entropies is not None:
            row["teacher_entropy"] = teacher_entropies[i]
        rows.append(row)
    return rows


def _codes(rows, window=20):
    return {e.code for e in check_history(rows, signals=SIGNALS, window=window)}


def test_a_falling_divergence_triggers_nothing():
    rows = _rows([2.0 * math.exp(-0.1 * i) + 0.01 * (-1) ** i for i in range(30)], [1.0] * 30, [1.2] * 30)
    assert _codes(rows) == set()


def test_a_divergence_that_stopped_falling_far_above_zero_is_stalled():
    flat = [1.5 + 0.02 * (-1) ** i for i in range(20)]
    rows = _rows([2.0, 1.8, 1.6] + flat)
    events = [e for e in check_history(rows, signals=SIGNALS, window=20) if e.code == "divergence_stalled"]
    assert len(events) == 1 and events[0].severity == "warning"
    assert events[0].evidence["first"] == 2.0 and 0.7 < events[0].evidence["recent_mean"] / 2.0 < 0.8
    # converged near zero (below half of its first value) is not stalled, it is done
    assert "divergence_stalled" not in _codes(_rows([2.0, 1.0, 0.5] + [0.2 + 0.01 * (-1) ** i for i in range(20)]))
    # fewer logged steps than the window: no trend, no event
    assert "divergence_stalled" not in _codes(_rows([2.0] + flat[:5]))


def test_a_student_far_less_entropic_than_the_teacher_collapses_onto_a_mode():
    rows = _rows([1.0] * 5, [0.2] * 5, [1.0] * 5)
    events = [e for e in check_history(rows, signals=SIGNALS, window=20) if e.code == "teacher_mode_collapse"]
    assert len(events) == 1 and events[0].evidence["ratio"] == 0.2
    assert "teacher_mode_collapse" not in _codes(_rows([1.0] * 5, [0.8] * 5, [1.0] * 5))
    assert "teacher_mode_collapse" not in _codes(_rows([1.0] * 5, [0.2] * 5))  # the method does not log the teacher's entropy


def _write(out, rows):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "run_manifest.json"), "w") as fh:
        json.dump({"method": "distill", "max_steps": len(rows), "signals": SIGNALS, "config": {"diagnostics_window": 20}}, fh)


def test_a_distillation_run_is_judged_by_its_divergence(tmp_path):
    _write(tmp_path / "good", _rows([2.0 * math.exp(-0.1 * i) + 0.01 * (-1) ** i for i in range(30)]))
    report = diagnose(str(tmp_path / "good"))
    assert report["objective"] == "loss" and report["verdict"] == "improving", report
    _write(tmp_path / "stuck", _rows([2.0, 1.8, 1.6] + [1.5 + 0.02 * (-1) ** i for i in range(27)]))
    report = diagnose(str(tmp_path / "stuck"))
    assert report["verdict"] == "plateaued" and any(e["code"] == "divergence_stalled" for e in report["events"]), report
    _write(tmp_path / "mode", _rows([2.0 * math.exp(-0.1 * i) for i in range(30)], [0.1] * 30, [1.0] * 30))
    report = diagnose(str(tmp_path / "mode"))
    assert report["verdict"] == "collapsing" and "teacher_mode_collapse" in report["reason"], report
