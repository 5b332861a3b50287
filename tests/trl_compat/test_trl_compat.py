"""TRL-compatibility yardstick: TRL's own trainer tests, run against posttrain's trainers.

Materializes TRL's test files from a TRL source (``$TRL_SOURCE``; skipped when none is found),
swaps only ``from trl import XConfig, XTrainer`` for posttrain's, runs them, and compares with the
committed TRL baseline (``trl_baseline.json``: the ids that pass against trl itself). The share of
baseline tests that also pass on posttrain must not fall below ``threshold.json``.
"""

from __future__ import annotations

import json
import os

import pytest

from .materialize import CACHE, NO_SOURCE_MESSAGE, TRAINERS, find_source, materialize
from .run import THRESHOLD_FILE, load_baseline, pass_rates, print_table, run_pytest


@pytest.mark.slow
def test_posttrain_passes_trl_trainer_tests():
    source = find_source()
    if source is None:
        pytest.skip(NO_SOURCE_MESSAGE)
    baseline = load_baseline()
    if baseline is None:
        pytest.skip("no trl_baseline.json: run `python -m tests.trl_compat.run --target trl --write-baseline`")
    trainers = list(TRAINERS)
    materialize(source, targets=["posttrain"], trainers=trainers, log=lambda *a: None)
    workers = int(os.environ.get("TRL_COMPAT_WORKERS", "2"))
    timeout = int(os.environ.get("TRL_COMPAT_TIMEOUT", "300"))
    report = run_pytest("posttrain", trainers, workers, timeout, [], log=lambda *a: None)
    (CACHE / "report-posttrain.json").write_text(json.dumps(report, indent=1))
    print_table(report, baseline)

    rates = pass_rates(report, baseline)
    ok, total = sum(r[0] for r in rates.values()), sum(r[1] for r in rates.values())
    overall = ok / total if total else 0.0
    threshold = json.loads(THRESHOLD_FILE.read_text())
    lines = [f"{t}: {o}/{b} = {o / b if b else 0:.3f} (threshold {threshold['per_trainer'].get(t, 0):.3f})" for t, (o, b) in rates.items()]
    print("\n".join(lines) + f"\noverall: {ok}/{total} = {overall:.3f} (threshold {threshold['overall']:.3f})")

    below = [t for t, (o, b) in rates.items() if b and o / b + 1e-9 < threshold["per_trainer"].get(t, 0.0)]
    assert overall + 1e-9 >= threshold["overall"], f"TRL-compat pass rate {overall:.3f} fell below {threshold['overall']:.3f}"
    assert not below, f"per-trainer TRL-compat pass rate fell below its threshold for: {', '.join(below)}"
