"""Run TRL's own trainer tests against TRL (baseline) and/or posttrain; write a JSON report.

Usage::

    python -m tests.trl_compat.run [--target trl|posttrain|both] [--trainers sft,dpo,...] [-n N]
                                   [--timeout S] [--write-baseline | --merge-baseline] [-- extra pytest args]

The test files are materialized from a TRL source (``$TRL_SOURCE``, see materialize.py); with
``--target posttrain`` only the ``from trl import XConfig, XTrainer`` line of each file is swapped
for ``from posttrain.methods.<name> import XConfig, XTrainer``. Reports go to
``tests/trl_compat/.cache/report-<target>.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: python tests/trl_compat/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "tests.trl_compat"

from .materialize import CACHE, HERE, NO_SOURCE_MESSAGE, TARGETS, TRAINERS, find_source, materialize  # noqa: E402

BASELINE_FILE = HERE / "trl_baseline.json"
THRESHOLD_FILE = HERE / "threshold.json"
DESELECT_FILE = HERE / "deselect.txt"
OUTCOMES = ("passed", "failed", "error", "skipped", "deselected")


def trainer_of(nodeid: str) -> str | None:
    for name, (rel, *_rest) in TRAINERS.items():
        if nodeid.startswith(rel):
            return name
    return None


def run_pytest(target: str, trainers: list[str], workers: int, timeout: int, extra: list[str], log=print) -> dict:
    """Run ``target``'s pytest roots (see ``materialize.plan_roots``: one per TRL release) and merge their reports."""
    manifest = json.loads((CACHE / "manifest.json").read_text()) if (CACHE / "manifest.json").exists() else {}
    roots = [r for r in manifest.get("roots", []) if r["target"] == target]
    tests, deselected, versions, wall, returncode = {}, {}, {}, 0.0, 0
    for root in roots:
        names = [t for t in root["trainers"] if t in trainers]
        if not names:
            continue
        raw, desel, seconds, code = _run_root(root, names, workers, timeout, extra, log)
        tests.update(raw)
        deselected.update(desel)
        versions.update({t: root["trl_version"] or _installed_trl() for t in names})
        wall, returncode = wall + seconds, max(returncode, code)
    unavailable = {t: why for t, why in manifest.get("unavailable", {}).items() if t in trainers}
    report = build_report(target, [t for t in trainers if t not in unavailable], tests, deselected, wall, returncode)
    for trainer, data in report["trainers"].items():
        data["trl_version"] = versions.get(trainer)
    report["unavailable"] = unavailable
    return report


def _run_root(root: dict, trainers: list[str], workers: int, timeout: int, extra: list[str], log) -> tuple:
    """One pytest invocation on one materialized root; returns (tests, deselected, wall seconds, returncode)."""
    name = root["name"]
    path = CACHE / name
    results_file = CACHE / f"raw-{name}.json"
    for stale in (results_file, Path(str(results_file) + ".deselected.json")):
        stale.unlink(missing_ok=True)
    files = [TRAINERS[t][0] for t in trainers if (path / TRAINERS[t][0]).exists()]
    cmd = [sys.executable, "-m", "pytest", "-c", str(path / "pytest.ini"), "--rootdir", str(path), "-p", "no:cacheprovider"]
    cmd += ["-q", "-rN", "--no-header", "--color=no", f"--timeout={timeout}", "-o", "console_output_style=count"]
    if workers > 1 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers), "--dist", "load"]
    cmd += files + list(extra)
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        HF_HUB_CACHE=str(CACHE / "hub"), HF_HOME=str(CACHE / "hf_home"),
        TOKENIZERS_PARALLELISM="false", TRL_COMPAT_RESULTS=str(results_file), TRL_COMPAT_DESELECT=str(DESELECT_FILE),
    )
    if root.get("trl_path"):  # an older TRL release shadows the installed one
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root["trl_path"], env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.pop("PYTEST_ADDOPTS", None)
    log(f"[{name}] {' '.join(cmd[3:])}")
    start = time.time()
    with open(CACHE / f"pytest-{name}.log", "w") as out:
        proc = subprocess.run(cmd, cwd=path, env=env, stdout=out, stderr=subprocess.STDOUT)
    raw = json.loads(results_file.read_text()) if results_file.exists() else {"tests": {}}
    deselected_file = Path(str(results_file) + ".deselected.json")
    deselected = json.loads(deselected_file.read_text()) if deselected_file.exists() else {}
    return raw["tests"], deselected, time.time() - start, proc.returncode


def build_report(target, trainers, tests: dict, deselected: dict, wall: float, returncode: int) -> dict:
    per = {t: {k: [] for k in OUTCOMES} | {"failures": {}, "deselect_reasons": {}, "skip_reasons": {}} for t in trainers}
    for nodeid, entry in sorted(tests.items()):
        trainer = trainer_of(nodeid)
        if trainer not in per:
            continue
        outcome = entry.get("outcome") or "error"
        if outcome == "collection_error":
            outcome = "error"
        per[trainer][outcome].append(nodeid)
        if outcome in ("failed", "error"):
            per[trainer]["failures"][nodeid] = {
                "exc_type": entry.get("exc_type"), "message": entry.get("exc_msg"), "phase": entry.get("phase", "collect"),
            }
        elif outcome == "skipped" and entry.get("reason"):
            per[trainer]["skip_reasons"][nodeid] = entry["reason"]
    for nodeid, reason in sorted(deselected.items()):
        trainer = trainer_of(nodeid)
        if trainer in per:
            per[trainer]["deselected"].append(nodeid)
            per[trainer]["deselect_reasons"][nodeid] = reason
    manifest = json.loads((CACHE / "manifest.json").read_text()) if (CACHE / "manifest.json").exists() else {}
    return {
        "target": target,
        "trl_source": manifest.get("source"),
        "trl_installed": _installed_trl(),
        "wall_s": round(wall, 1),
        "pytest_returncode": returncode,
        "trainers": per,
    }


def _installed_trl() -> str | None:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:
        return None


def load_baseline() -> dict[str, list[str]] | None:
    if not BASELINE_FILE.exists():
        return None
    return json.loads(BASELINE_FILE.read_text())["passed"]


def pass_rates(report: dict, baseline: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """trainer -> (passing on posttrain among the baseline's passes, baseline passes).

    A baseline id deselected in ``report`` (deselect.txt gained a rule since the baseline was measured) is out of
    scope and not counted."""
    rates = {}
    for trainer, data in report["trainers"].items():
        base = set(baseline.get(trainer, [])) - set(data["deselected"])
        rates[trainer] = (len(base & set(data["passed"])), len(base))
    return rates


def print_table(report: dict, baseline=None, log=print) -> None:
    rates = pass_rates(report, baseline) if baseline is not None and report["target"] == "posttrain" else None
    head = f"{'trainer':14} {'trl':>7} {'collected':>9} {'passed':>7} {'failed':>7} {'error':>6} {'skipped':>8} {'desel.':>7}"
    if rates is not None:
        head += f" {'vs TRL baseline':>18}"
    log(f"\n== {report['target']}  (wall {report['wall_s']:.0f} s)")
    log(head)
    totals = Counter()
    for trainer, data in report["trainers"].items():
        counts = {k: len(data[k]) for k in OUTCOMES}
        collected = sum(counts[k] for k in ("passed", "failed", "error", "skipped"))
        totals.update(counts)
        totals["collected"] += collected
        line = f"{trainer:14} {data.get('trl_version') or '':>7} {collected:>9} {counts['passed']:>7} {counts['failed']:>7} {counts['error']:>6} {counts['skipped']:>8} {counts['deselected']:>7}"
        if rates is not None:
            ok, base = rates[trainer]
            line += f" {ok:>5}/{base:<5} {100 * ok / base if base else 0:5.1f}%"
        log(line)
    line = f"{'total':14} {'':>7} {totals['collected']:>9} {totals['passed']:>7} {totals['failed']:>7} {totals['error']:>6} {totals['skipped']:>8} {totals['deselected']:>7}"
    if rates is not None:
        ok, base = sum(r[0] for r in rates.values()), sum(r[1] for r in rates.values())
        line += f" {ok:>5}/{base:<5} {100 * ok / base if base else 0:5.1f}%"
    log(line)
    top = Counter()
    for data in report["trainers"].values():
        for info in data["failures"].values():
            top[f"{info['exc_type']}: {(info['message'] or '')[:110]}"] += 1
    if top:
        log("most frequent failures:")
        for text, n in top.most_common(8):
            log(f"  {n:5}  {text}")


def write_baseline(report: dict, merge: bool = False) -> None:
    """Store TRL's passing ids (and the TRL release they ran on) for the trainers in ``report``; trainers not
    run keep their stored ids. ``merge``: add the passing ids to the stored ones instead of replacing them (for a
    run restricted with ``-k`` / node ids, e.g. the vision-language tests)."""
    stored = json.loads(BASELINE_FILE.read_text()) if BASELINE_FILE.exists() else {}
    passed = dict(stored.get("passed", {}))
    versions = {t: stored.get("trl_version", {}).get(t, stored.get("trl_installed")) for t in passed}
    passed.update({t: sorted(set(d["passed"]) | (set(passed.get(t, [])) if merge else set())) for t, d in report["trainers"].items()})
    versions.update({t: d.get("trl_version") or report["trl_installed"] for t, d in report["trainers"].items()})
    data = {
        "about": "Test ids of TRL's own trainer tests that pass against trl on this machine (measured by "
        "`python -m tests.trl_compat.run --target trl --write-baseline`): the installed trl, or for the trainers it "
        "no longer ships the last TRL release that did (trl_version; materialize.BASELINE_TRL).",
        "trl_installed": report["trl_installed"],
        "trl_source": report["trl_source"],
        "trl_version": {t: versions[t] for t in TRAINERS if t in passed},
        "passed": {t: passed[t] for t in TRAINERS if t in passed},
    }
    BASELINE_FILE.write_text(json.dumps(data, indent=1) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.trl_compat.run", description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "both"], default="both")
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="comma-separated subset of " + ",".join(TRAINERS))
    parser.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers (1: no xdist)")
    parser.add_argument("--timeout", type=int, default=300, help="per-test timeout in seconds")
    parser.add_argument("--write-baseline", action="store_true", help="store TRL's passing ids in trl_baseline.json")
    parser.add_argument("--merge-baseline", action="store_true",
                        help="add TRL's passing ids to trl_baseline.json, keeping the stored ones (use with a -k / node filter)")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    unknown = set(trainers) - set(TRAINERS)
    if unknown:
        parser.error(f"unknown trainers: {', '.join(sorted(unknown))}")
    source = find_source()
    if source is None:
        print(NO_SOURCE_MESSAGE)
        return 0
    targets = list(TARGETS) if args.target == "both" else [args.target]
    materialize(source, targets=targets, trainers=trainers)
    baseline = load_baseline()
    for target in targets:
        report = run_pytest(target, trainers, args.workers, args.timeout, args.pytest_args)
        for trainer, why in report["unavailable"].items():
            print(f"{trainer}: skipped on {target}: {why}")
        (CACHE / f"report-{target}.json").write_text(json.dumps(report, indent=1))
        if target == "trl" and (args.write_baseline or args.merge_baseline):
            write_baseline(report, merge=args.merge_baseline)
            baseline = load_baseline()
        print_table(report, baseline)
        print(f"report: {CACHE / f'report-{target}.json'}  logs: {CACHE}/pytest-{target}*.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
