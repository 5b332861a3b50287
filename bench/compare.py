"""Compare two benchmark results files: ``python -m bench.compare BEFORE.json AFTER.json [--strict]``.

Both files are what ``python -m bench`` writes (``bench/results/latest.json``, or ``--out``). For every workload
measured in both (matched by name, e.g. ``sft-tiny``) it prints, per framework, the step time, the whole ``train()``
time, the memory added by training and the memory above the floor (gradients + optimizer state) before and after;
then posttrain's ratios to the bare loop and to TRL before and after.

A **regression** is posttrain's ratio to the bare loop (steady-state step, or whole ``train()``) rising by more
than the runs' own repeat-to-repeat spread: each results file records, per workload, the ratio of medians and its
min-max over the interleaved rounds (``ratio_step_time_vs_bare_min/_max``: round i of posttrain over round i of
the bare loop, which ran right after it); the spread is the wider of the two runs' max - min. The ratio to the
bare loop is used because both sides of it ran on the same machine at the same time, so machine drift between the
two files cancels. A run of one round records no spread: a rise there is shown as unconfirmed, not flagged.

Exit status 0, or 1 with ``--strict`` when a regression is flagged.
"""

from __future__ import annotations

import argparse
import json
import sys

FRAMEWORKS = ("posttrain", "trl", "bare")
#: (results key, label, number format) of the per-framework rows
MEASURES = (
    ("step_s", "step s", "{:.4f}"),
    ("train_s", "train() s", "{:.2f}"),
    ("rss_added_by_training_mb", "memory added MB", "{:.0f}"),
    ("memory_above_floor_mb", "above floor MB", "{:.0f}"),
)
#: (ratio key, label, whether a rise is flagged as a regression)
RATIOS = (
    ("ratio_step_time_vs_bare", "step posttrain/bare", True),
    ("ratio_train_time_vs_bare", "train() posttrain/bare", True),
    ("ratio_step_time_vs_trl", "step posttrain/TRL", False),
    ("ratio_train_time_vs_trl", "train() posttrain/TRL", False),
    ("ratio_rss_added_vs_trl", "memory added posttrain/TRL", False),
    ("ratio_above_floor_vs_trl", "above floor posttrain/TRL", False),
)


def load(path: str) -> dict:
    """Read a results file of ``python -m bench``.

    Args:
        path: The JSON file.

    Returns:
        The report dict.

    Raises:
        SystemExit: the file is missing, not JSON, or holds no ``results`` list (one line naming the file).
    """
    try:
        with open(path) as fh:
            report = json.load(fh)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"bench.compare: cannot read {path}: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("results"), list):
        raise SystemExit(f"bench.compare: {path} is not a results file of `python -m bench` (no 'results' list)")
    return report


def _fmt(x, spec: str) -> str:
    return "n/a" if x is None else spec.format(x)


def _change(before, after) -> str:
    if before is None or after is None or not before:
        return ""
    return f"{100 * (after / before - 1):+.1f}%"


def _rounds(entry: dict) -> int:
    """The interleaved rounds behind posttrain's ratios to the bare loop (both frameworks' successful runs)."""
    counts = [entry.get(f"{fw}_repeats_ok") for fw in ("posttrain", "bare")]
    return min((c for c in counts if c is not None), default=0)


def spread(entry: dict, key: str) -> float | None:
    """The repeat-to-repeat spread (max - min over the paired rounds) of one ratio of a workload.

    Args:
        entry: One workload of a results file.
        key: The ratio, e.g. ``"ratio_step_time_vs_bare"`` (the file holds ``key + "_min"`` / ``"_max"``).

    Returns:
        ``max - min``, or None when the file has no min-max for it.
    """
    lo, hi = entry.get(f"{key}_min"), entry.get(f"{key}_max")
    return None if lo is None or hi is None else hi - lo


def verdict(before: dict, after: dict, key: str) -> tuple[str, bool]:
    """Judge one ratio of posttrain to the bare loop between two runs of a workload.

    Args:
        before: The workload's entry in the BEFORE file.
        after: The same workload's entry in the AFTER file.
        key: The ratio key (``"ratio_step_time_vs_bare"`` or ``"ratio_train_time_vs_bare"``).

    Returns:
        ``(text, regression)``: a short verdict and whether it is a regression (the ratio rose by more than the
        wider of the two runs' spreads, both runs having at least two rounds).
    """
    b, a = before.get(key), after.get(key)
    if b is None or a is None:
        return "not measured in both", False
    delta = a - b
    if min(_rounds(before), _rounds(after)) < 2:
        return ("worse, unconfirmed (a run of one round records no spread)" if delta > 0 else "not worse"), False
    spreads = [s for s in (spread(before, key), spread(after, key)) if s is not None]
    if not spreads:
        return "no spread recorded", False
    limit = max(spreads)
    if delta > limit:
        return f"REGRESSION: +{delta:.3f} > spread {limit:.3f}", True
    if delta < -limit:
        return f"better: {delta:+.3f} beyond spread {limit:.3f}", False
    return f"within spread ({delta:+.3f}, spread {limit:.3f})", False


def _range(entry: dict, key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "n/a"
    lo, hi = entry.get(f"{key}_min"), entry.get(f"{key}_max")
    return f"{value:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else f"{value:.3f}"


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]


def compare(before: dict, after: dict) -> tuple[list[str], list[str]]:
    """Compare two results files.

    Args:
        before: The BEFORE report (as :func:`load` returns it).
        after: The AFTER report.

    Returns:
        ``(lines, regressions)``: the text to print, and one line per flagged regression (``"workload: ratio ..."``).
    """
    lines, regressions = [], []
    for label, rep in (("BEFORE", before), ("AFTER", after)):
        m = rep.get("machine", {})
        lines.append(f"{label}: {rep.get('command', '?')} ({rep.get('date', '?')}); {m.get('cpu', '?')}, "
                     f"{rep.get('settings', {}).get('threads', '?')} threads; posttrain imported from {rep.get('posttrain_file') or 'not recorded'}")
    if before.get("machine", {}).get("cpu") != after.get("machine", {}).get("cpu"):
        lines.append("note: the two runs were measured on different CPUs; compare the ratios, not the seconds")
    by_name = {r["name"]: r for r in before["results"]}
    after_names = [r["name"] for r in after["results"]]
    for a in after["results"]:
        b = by_name.get(a["name"])
        if b is None:
            continue
        lines += ["", f"{a['name']} (vocab {a.get('vocab_size', '?')}, set {a.get('set', '?')}; rounds before {_rounds(b)}, after {_rounds(a)})"]
        rows = [("framework", *(f"{label} before -> after" for _, label, _ in MEASURES))]
        for fw in FRAMEWORKS:
            if b.get(f"{fw}_step_s") is None and a.get(f"{fw}_step_s") is None:
                continue
            cells = []
            for key, _, spec in MEASURES:
                x, y = b.get(f"{fw}_{key}"), a.get(f"{fw}_{key}")
                cells.append(f"{_fmt(x, spec)} -> {_fmt(y, spec)} {_change(x, y)}".rstrip())
            rows.append((fw, *cells))
        lines += _table(rows)
        rows = [("ratio", "before (min-max)", "after (min-max)", "verdict")]
        for key, label, judged in RATIOS:
            if b.get(key) is None and a.get(key) is None:
                continue
            text = ""
            if judged:
                text, bad = verdict(b, a, key)
                if bad:
                    regressions.append(f"{a['name']}: {label} {b[key]:.3f} -> {a[key]:.3f} ({text})")
            rows.append((label, _range(b, key), _range(a, key), text))
        lines += _table(rows)
        for key in ("posttrain_file", "plugin_file"):
            if b.get(key) or a.get(key):
                lines.append(f"  {key}: {b.get(key) or 'not recorded'} -> {a.get(key) or 'not recorded'}"
                             + (" (the same code?)" if b.get(key) == a.get(key) else ""))
    only_before = [n for n in by_name if n not in after_names]
    only_after = [n for n in after_names if n not in by_name]
    if only_before or only_after:
        lines.append("")
    if only_before:
        lines.append(f"only in BEFORE: {', '.join(only_before)}")
    if only_after:
        lines.append(f"only in AFTER: {', '.join(only_after)}")
    lines.append("")
    if regressions:
        lines.append(f"{len(regressions)} regression(s) of posttrain's ratio to the bare loop beyond the runs' spread:")
        lines += [f"  {r}" for r in regressions]
    else:
        lines.append("no regression of posttrain's ratio to the bare loop beyond the runs' spread")
    return lines, regressions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    p.add_argument("before", help="results file of the earlier code (python -m bench --out ...)")
    p.add_argument("after", help="results file of the later code")
    p.add_argument("--strict", action="store_true", help="exit 1 when a regression is flagged")
    a = p.parse_args(argv)
    before, after = load(a.before), load(a.after)
    if not {r["name"] for r in before["results"]} & {r["name"] for r in after["results"]}:
        raise SystemExit(f"bench.compare: {a.before} and {a.after} share no workload; run the same --set/--methods/--sizes on both")
    lines, regressions = compare(before, after)
    print("\n".join(lines))
    return 1 if a.strict and regressions else 0


if __name__ == "__main__":
    sys.exit(main())
