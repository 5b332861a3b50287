"""A picture of a run: its curves grouped by signal role, every diagnostic event marked, the verdict on top.

``posttrain diagnose OUTPUT_DIR --plot [FILE.png]`` calls :func:`plot_run`. It reads the same files
as :func:`posttrain.diagnostics.diagnose` (``metrics.jsonl``, ``diagnostics.jsonl``,
``run_manifest.json``) and needs matplotlib (``pip install 'posttrain[plot]'``).
"""

from __future__ import annotations

import os
import textwrap

from posttrain.config import ConfigError

__all__ = ["plot_run", "PANELS"]

#: Panel title -> the signal roles drawn in it (a method's metric names come from its spec's signals).
PANELS = {
    "reward": ("reward", "group_reward_zero_std"),
    "preference": ("preference_margin", "preference_accuracy"),
    "KL to the reference": ("kl", "teacher_divergence"),
    "entropy and clipping": ("entropy", "clip_fraction"),
    "completions": ("completion_length", "truncation"),
    "token accuracy": ("token_accuracy",),
}

_SEVERITY_COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}


def _series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    from posttrain.diagnostics import _num

    xs, ys = [], []
    for row in rows:
        step, value = _num(row.get("step")), _num(row.get(name))
        if step is not None and value is not None:
            xs.append(step)
            ys.append(value)
    return xs, ys


def plot_run(output_dir: str, path: str | None = None) -> str:
    """Write a PNG of the run in ``output_dir`` and return its path (default ``OUTPUT_DIR/diagnose.png``).

    Panels: the loss (training, and evaluation when logged), then one panel per group of signal
    roles the method declares (reward, preference, KL, entropy, completions, token accuracy), and
    the gradient norm. Each diagnostic event is a vertical line at the step it first fired, coloured
    by severity and labelled with its code; the title carries the verdict and its reason.

    Raises:
        FileNotFoundError: ``output_dir`` has no ``metrics.jsonl``.
        ConfigError: matplotlib is not installed.
    """
    from posttrain.diagnostics import _is_eval_row, _read_jsonl, _signals_of, _split_runs, diagnose

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("posttrain diagnose --plot needs matplotlib: pip install 'posttrain[plot]' (or matplotlib).") from None
    report = diagnose(output_dir)
    runs = _split_runs(_read_jsonl(os.path.join(output_dir, "metrics.jsonl")))
    rows = runs[-1] if runs else []
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if _is_eval_row(r)]
    try:
        import json

        with open(os.path.join(output_dir, "run_manifest.json")) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError):
        manifest = {"method": report.get("method")}  # _signals_of then asks the installed plugin's spec
    manifest_signals = _signals_of(manifest)

    panels: list[tuple[str, list[tuple[str, str]]]] = [("loss", [("loss", "loss")])]
    for title, roles in PANELS.items():
        names = [(role, manifest_signals[role]) for role in roles if manifest_signals.get(role)]
        names = [(role, name) for role, name in names if _series(train, name)[0] or _series(evals, f"eval_{name}")[0]]
        if names:
            panels.append((title, names))
    if _series(train, "grad_norm")[0]:
        panels.append(("gradient norm", [("grad_norm", "grad_norm")]))

    cols = 2 if len(panels) > 1 else 1
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 3.0 * nrows + 0.9), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    events = report["events"]
    for ax, (title, names) in zip(axes.flat, panels):
        twin = None
        for index, (role, name) in enumerate(names):
            target = ax
            if index == 1:  # a second role has its own scale (e.g. a fraction next to a mean)
                twin = ax.twinx()
                target = twin
            color = f"C{index}"
            xs, ys = _series(train, name)
            if xs:
                target.plot(xs, ys, color=color, marker="." if len(xs) < 60 else None, label=name)
            xs, ys = _series(evals, f"eval_{name}")
            if xs:
                target.plot(xs, ys, color=color, linestyle="--", marker="o", label=f"eval_{name}")
            target.set_ylabel(name if role == name else f"{name} ({role})", color=color if twin is not None else "black", fontsize=8)
        for event in sorted(events, key=lambda e: {"error": 0, "warning": 1}.get(e["severity"], 2), reverse=True):  # the most severe on top
            ax.axvline(event["first_step"], color=_SEVERITY_COLORS.get(event["severity"], "grey"), linestyle=":", linewidth=1.2)
        handles = [h for a in (ax, twin) if a is not None for h in a.get_legend_handles_labels()[0]]
        if len(handles) > 1:
            ax.legend(handles=handles, fontsize=7, loc="best")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.grid(alpha=0.3)
    top = axes.flat[0]
    ymax = top.get_ylim()[1]
    by_step: dict = {}
    for event in events:  # one label per step: the codes that fired there, in the most severe one's colour
        by_step.setdefault(event["first_step"], []).append(event)
    order = {"error": 0, "warning": 1, "info": 2}
    for step, fired in sorted(by_step.items()):
        fired.sort(key=lambda e: order.get(e["severity"], 1))
        top.annotate(", ".join(e["code"] for e in fired), (step, ymax), rotation=90, fontsize=7, va="top", ha="right",
                     color=_SEVERITY_COLORS.get(fired[0]["severity"], "grey"))
    state = "finished" if report["finished"] else f"step {report['last_step']}" + (f" of {report['max_steps']}" if report["max_steps"] else "")
    title = f"{report['method'] or 'run'} ({state}): {report['verdict'].upper()} - {report['reason']}"
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(110 * cols / 2) or 60)), fontsize=10)
    fig.tight_layout()
    path = path or os.path.join(output_dir, "diagnose.png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
