"""Training diagnostics: structured events a person or a program can act on, and a run verdict.

Every run registers a :class:`Diagnostics` plugin on the loop's plugin manager. On each logging
step (the ``on_log`` hook) it checks the history of logged metrics and emits :class:`Event`
objects: a stable ``code``, a ``severity`` (``info``, ``warning`` or ``error``), a message, the
evidence (the numbers that triggered it) and an action naming config fields. Events are printed
once per code (then at most every ``repeat_every`` logging steps), appended to
``output_dir/diagnostics.jsonl`` and logged to the run's trackers. Other plugins add their own
checks through the same ``on_log`` hook.

The checks never name a method's metrics: a method's spec declares which of its metrics mean
reward, KL, entropy, ... (``MethodSpec.signals``, roles in :class:`posttrain.SignalRole`), and
the checks read those roles plus the loop's own metrics (``loss``, ``grad_norm``,
``learning_rate``, ``epoch``, ``eval_loss``). Nor do they name a method's settings: an event's
action is the method's own text for its code (``MethodSpec.actions``, naming its config fields),
else the core's :data:`DEFAULT_ACTIONS`, which name only ``TrainingConfig`` fields. Trend checks fit a line to the last
``diagnostics_window`` logged steps and call a trend real only when its slope is
``trend_t`` standard errors away from 0 (the noise estimate is the residual spread).

:func:`diagnose` reads a finished or running run's files (``metrics.jsonl``,
``diagnostics.jsonl``, ``run_manifest.json``) and returns a verdict with evidence and actions
(JSON schema 1, see STABILITY.md and docs/diagnostics.md); ``posttrain diagnose OUTPUT_DIR``
prints it.

Codes (stable; see STABILITY.md and docs/diagnostics.md):
    non_finite_loss        the loss or grad_norm is NaN or infinite
    grad_norm_spike        grad_norm is far above its recent median
    reward_std_collapse    most prompt groups have identical rewards (no learning signal)
    high_clip_ratio        a large fraction of tokens sits outside the PPO clip region
    kl_blowup              the KL to the reference is large and growing
    completions_truncated  most completions hit max_completion_length
    zero_learning_rate     the learning rate is 0 while training (schedule/warm-up mistake)
    memory_headroom        memory use is low: a larger micro-batch with less accumulation fits
    memory_pressure        memory use is near the limit: a smaller micro-batch is safer
    throughput_bound       generation takes most of an online step
    reward_plateau         the reward has not improved over the window
    reward_hacking         the reward rises while KL or completion length run away, or held-out reward falls
    entropy_collapse       policy entropy has fallen toward 0
    length_drift           completion length moves steadily without reward gain
    preference_saturation  preference margins keep growing while held-out accuracy stalls
    eval_divergence        training loss falls while evaluation loss rises (overfitting)
    data_repeated          a small dataset is repeated for many epochs
    divergence_stalled     the divergence to the teacher stopped falling while still far above zero (distillation)
    teacher_mode_collapse  the student's entropy fell far below the teacher's: it sits on one mode of the teacher
    critic_not_learning    the critic's explained variance stays at or below 0 and its loss does not fall (PPO-style methods)
    tool_calls_failing     most tool calls fail (exceptions, unknown tools, bad arguments, timeouts)
    turn_limit_reached     nearly every episode is cut by the tool-calling turn limit
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace

from posttrain._diagnostic_codes import CODES, DEFAULT_THRESHOLDS
from posttrain.hookspecs import hookimpl

__all__ = ["Event", "Diagnostics", "check_metrics", "check_history", "diagnose", "format_report", "trend", "measure_memory",
           "DEFAULT_THRESHOLDS", "CODES", "DEFAULT_ACTIONS", "VERDICTS", "SCHEMA_VERSION", "action_fields"]

#: Version of the JSON that :func:`diagnose` returns (``"schema"``); bumped only on a breaking change.
SCHEMA_VERSION = 1

#: The verdicts of :func:`diagnose`, from the most to the least severe.
VERDICTS = ("diverged", "over-optimizing", "drifting", "collapsing", "plateaued", "improving", "too short to tell")

_SETTINGS = " (`posttrain info <method>` lists this method's settings)."

#: The core's action for each code: it names only fields of :class:`posttrain.TrainingConfig`
#: (in backticks) and says in words what to change in the method, because the core does not know
#: the method's settings. A method's ``MethodSpec.actions`` replaces the text of any code; the
#: memory texts are templates filled with the suggested batch sizes. ``<method>`` becomes the
#: method's name when it is known.
DEFAULT_ACTIONS = {
    "non_finite_loss": "lower `learning_rate`, keep `max_grad_norm` > 0, train in float32 or `bf16=True` (not `fp16=True`), "
                       "and check the data for empty or overlong rows.",
    "grad_norm_spike": "lower `learning_rate` or `max_grad_norm`; look for outlier batches.",
    "reward_std_collapse": "sample more completions per prompt or at a higher temperature, use easier/harder prompts, or give the reward "
                           "function partial credit" + _SETTINGS,
    "high_clip_ratio": "lower `learning_rate`, reuse each rollout for fewer updates, or widen the clip range" + _SETTINGS,
    "kl_blowup": "lower `learning_rate`, strengthen the KL penalty, or check the reward for exploits" + _SETTINGS,
    "completions_truncated": "allow longer completions, or leave truncated completions out of the loss" + _SETTINGS,
    "zero_learning_rate": "check `learning_rate`, `warmup_steps` / `warmup_ratio` and `lr_scheduler_type`.",
    "memory_headroom": "set `per_device_train_batch_size={per_device_train_batch_size}` and "
                       "`gradient_accumulation_steps={gradient_accumulation_steps}`: the same effective batch in fewer, larger micro-batches (faster).",
    "memory_pressure": "set `per_device_train_batch_size={per_device_train_batch_size}` and "
                       "`gradient_accumulation_steps={gradient_accumulation_steps}` (same effective batch), or `gradient_checkpointing=True`.",
    "throughput_bound": "generate with a faster rollout backend (vLLM on a GPU), generate shorter completions, or reuse each generation "
                        "for several updates" + _SETTINGS,
    "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate`, sample more completions per "
                      "prompt, or make the reward give partial credit" + _SETTINGS,
    "reward_hacking": "strengthen the KL penalty, add a length penalty or cap the completion length, check the reward function for "
                      "exploits, and compare with a held-out reward on an eval_dataset" + _SETTINGS,
    "entropy_collapse": "lower `learning_rate`, sample at a higher temperature, add an entropy bonus or strengthen the KL penalty" + _SETTINGS,
    "length_drift": "check the reward for a length bias; use a length-unbiased loss, cap the completion length, or add a length "
                    "penalty" + _SETTINGS,
    "preference_saturation": "stop earlier (`max_steps` / `num_train_epochs`), keep the policy closer to its reference or smooth the "
                             "labels, or add more preference pairs" + _SETTINGS,
    "eval_divergence": "stop at the best evaluation (`load_best_model_at_end=True` with matching `eval_strategy` / `save_strategy`), "
                       "lower `num_train_epochs` or `learning_rate`, or add data.",
    "data_repeated": "add data or lower `num_train_epochs` / `max_steps`; watch eval_loss with an eval_dataset and `eval_strategy='steps'`.",
    "divergence_stalled": "raise `learning_rate` or train longer (`max_steps`); check that student and teacher share the chat template "
                          "and the prompt format, and that the student can represent the teacher (a larger student)" + _SETTINGS,
    "critic_not_learning": "raise the critic's learning rate or train longer (`max_steps`); check the return scale (whiten or scale "
                           "the rewards) and that the critic sees the same tokens as the policy" + _SETTINGS,
    "tool_calls_failing": "read the failing calls' error messages in the logged completions; fix the tools or their docstrings (the "
                          "schema the model reads), allow slow tools more time, or reward well-formed calls" + _SETTINGS,
    "turn_limit_reached": "allow more tool-calling rounds or longer completions, or reward episodes that end with an answer" + _SETTINGS,
    "teacher_mode_collapse": "move the divergence from reverse KL (mode-seeking) toward forward KL or JSD, sample the student at a "
                             "higher temperature, or lower `learning_rate`" + _SETTINGS,
}

_BACKTICKED = re.compile(r"`([^`]+)`")
_FIELD_REF = re.compile(r"^(?P<name>[A-Za-z_]\w*)(?:\s*(?:==|=|>=|<=|>|<)\s*\S.*)?$")


def action_fields(text: str) -> list[str]:
    """Return the config field names an action text names, in order: each backticked ``name``, ``name=value`` or ``name > 0``.

    Action texts write config fields in backticks, so a test can check that every field a
    method's advice names exists in its config (see ``MethodSpec.actions``). A backticked
    command (starting with ``posttrain ``) names no field.

    Args:
        text: An action text, e.g. ``"raise `num_generations` or set `temperature=1.2`."``.

    Returns:
        The field names, e.g. ``["num_generations", "temperature"]``.

    Raises:
        ValueError: a backticked span is neither a field reference nor a ``posttrain`` command.
    """
    names = []
    for span in _BACKTICKED.findall(text):
        span = span.strip()
        if span.startswith("posttrain "):
            continue
        match = _FIELD_REF.match(span)
        if match is None:
            raise ValueError(f"action text backticks {span!r}, which is neither a config field (`name`, `name=value`, `name > 0`) "
                             f"nor a `posttrain ...` command: write a field name first, or drop the backticks. Text: {text!r}")
        names.append(match.group("name"))
    return names

# The pre-1.2 default of check_metrics (TRL's online-RL metric names); the loop never uses it:
# it passes the method's declared signals.
_LEGACY_SIGNALS = {
    "group_reward_zero_std": "frac_reward_zero_std", "reward": "reward", "clip_fraction": "clip_ratio/region_mean", "kl": "kl",
    "truncation": "completions/clipped_ratio",
}
_EVAL_CODES = ("reward_hacking", "preference_saturation", "eval_divergence")
_RECENT = 5  # steps averaged by the level checks (collapse, throughput)


@dataclass(frozen=True)
class Event:
    """One diagnostic finding."""

    code: str  #: stable identifier, e.g. ``"reward_std_collapse"``
    step: int  #: optimizer step at which it was detected
    message: str  #: what is wrong, for people
    evidence: dict = field(default_factory=dict)  #: metric name -> value that triggered it
    action: str = ""  #: what to try, naming config fields (the method's ``MethodSpec.actions`` text, else :data:`DEFAULT_ACTIONS`)
    severity: str = "warning"  #: ``info``, ``warning`` or ``error``

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=_json_number)


def _json_number(value):
    return float(value)


def _num(value):
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _value(metrics: dict, *names: str):
    for name in names:
        value = _num(metrics.get(name))
        if value is not None:
            return value
    return None


def _finite(values) -> list[float]:
    return [v for v in (_num(x) for x in values) if v is not None and math.isfinite(v)]


def trend(values) -> dict | None:
    """Least-squares line through ``values`` (one per logged step): slope, its standard error, t and the noise.

    Returns None with fewer than 3 values. ``noise`` is the residual standard deviation (the
    step-to-step scatter around the line), ``change`` the fitted rise over the window, and ``t``
    the slope in standard errors (0 for a constant series, +-inf for a perfect non-flat line).
    """
    ys = _finite(values)
    n = len(ys)
    if n < 3:
        return None
    x_mean, y_mean = (n - 1) / 2, sum(ys) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    slope = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(ys)) / sxx
    residuals = [y - (y_mean + slope * (i - x_mean)) for i, y in enumerate(ys)]
    noise = math.sqrt(sum(r * r for r in residuals) / (n - 2))
    se = noise / math.sqrt(sxx)
    scale = max(abs(y_mean), 1e-12)
    if se <= 1e-12 * scale:
        t = 0.0 if abs(slope) <= 1e-12 * scale else math.copysign(math.inf, slope)
    else:
        t = slope / se
    return {"slope": slope, "stderr": se, "t": t, "noise": noise, "change": slope * (n - 1), "first": ys[0], "last": ys[-1],
            "mean": y_mean, "n": n}


def _round(value, digits: int = 4):
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    return value


def _trend_evidence(prefix: str, tr: dict) -> dict:
    return {f"{prefix}_slope_per_step": _round(tr["slope"]), f"{prefix}_noise": _round(tr["noise"]), f"{prefix}_t": _round(tr["t"], 3),
            f"{prefix}_change_over_window": _round(tr["change"]), f"{prefix}_window_steps": tr["n"]}


def measure_memory() -> dict | None:
    """Peak memory of this process against what it may use: the accelerator's when torch uses one, else RSS against RAM.

    Returns ``{"device", "peak_bytes", "limit_bytes", "fraction"}`` or None when it cannot be
    measured (no /proc on this OS). On CUDA: ``torch.cuda.max_memory_reserved`` against the
    device's total memory. On CPU: the peak resident set size against the current RSS plus the
    system's available memory (``MemAvailable`` of /proc/meminfo).
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        index = torch.cuda.current_device()
        peak, total = torch.cuda.max_memory_reserved(index), torch.cuda.get_device_properties(index).total_memory
        return {"device": f"cuda:{index}", "peak_bytes": int(peak), "limit_bytes": int(total), "fraction": peak / total}
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: line.split()[1] for line in fh}
        available = int(info["MemAvailable"]) * 1024
    except (ImportError, OSError, KeyError, ValueError, IndexError):
        return None
    limit = rss + available
    return {"device": "cpu", "peak_bytes": int(peak), "limit_bytes": int(limit), "fraction": peak / limit}


def _gb(n: int) -> float:
    return round(n / 2**30, 2)


def _memory_events(step: int, memory: dict | None, context: dict, th: dict) -> list[Event]:
    if not memory:
        return []
    bs, ga = int(context.get("per_device_train_batch_size") or 0), int(context.get("gradient_accumulation_steps") or 1)
    fraction = memory["fraction"]
    evidence = {"device": memory["device"], "peak_gb": _gb(memory["peak_bytes"]), "limit_gb": _gb(memory["limit_bytes"]),
                "fraction_used": _round(fraction, 3), "per_device_train_batch_size": bs, "gradient_accumulation_steps": ga}
    if fraction >= th["memory_pressure"] and bs > 1:
        new_bs, new_ga = (bs // 2, ga * 2) if bs % 2 == 0 else (1, ga * bs)
        return [Event("memory_pressure", step, f"peak memory is {fraction:.0%} of what this process may use ({evidence['peak_gb']} of {evidence['limit_gb']} GB on {memory['device']}).",
                      {**evidence, "suggested_per_device_train_batch_size": new_bs, "suggested_gradient_accumulation_steps": new_ga},
                      DEFAULT_ACTIONS["memory_pressure"].format(per_device_train_batch_size=new_bs, gradient_accumulation_steps=new_ga),
                      CODES["memory_pressure"])]
    if fraction < th["memory_headroom"] and ga > 1 and bs >= 1:
        # Assume memory grows at most linearly with the micro-batch; keep the effective batch (bs * ga).
        k = 1
        while ga % (k * 2) == 0 and fraction * k * 2 <= th["memory_pressure"] * 0.9:
            k *= 2
        if k > 1:
            return [Event("memory_headroom", step, f"peak memory is only {fraction:.0%} of what this process may use ({evidence['peak_gb']} of {evidence['limit_gb']} GB on {memory['device']}).",
                          {**evidence, "suggested_per_device_train_batch_size": bs * k, "suggested_gradient_accumulation_steps": ga // k},
                          DEFAULT_ACTIONS["memory_headroom"].format(per_device_train_batch_size=bs * k, gradient_accumulation_steps=ga // k),
                          CODES["memory_headroom"])]
    return []


def check_history(train_rows, eval_rows=(), *, signals=None, thresholds=None, window: int = 20, context=None, memory=None,
                  first_entropy=None, actions=None, method=None) -> list[Event]:
    """Return the events the latest training row triggers, given the rows before it; pure, used online and offline.

    Args:
        train_rows: Logged training rows (``metrics.jsonl`` rows with ``loss``), oldest first; the
            last one is the step being checked.
        eval_rows: Logged evaluation rows (``eval_*`` keys) up to now, oldest first.
        signals: The method's ``{role: metric_name}`` (``MethodSpec.signals``).
        thresholds: Overrides of :data:`DEFAULT_THRESHOLDS`.
        window: Logged steps a trend check looks back over.
        context: Run facts: ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
            ``train_rows`` (dataset size), ``max_steps``.
        memory: A :func:`measure_memory` result to check, or None.
        first_entropy: The run's first logged entropy (default: the oldest row's).
        actions: The method's ``{code: action}`` (``MethodSpec.actions``); each replaces the
            core's :data:`DEFAULT_ACTIONS` text of its code.
        method: The method's name, put into the core texts' ``posttrain info <method>`` hint.

    Returns:
        The events, in the order the checks ran (empty without training rows).
    """
    rows = list(train_rows)
    if not rows:
        return []
    signals, context = dict(signals or {}), dict(context or {})
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    now = rows[-1]
    step = int(now.get("step", len(rows)))
    recent = rows[-window:]

    def metric(role):
        return signals.get(role)

    def latest(role):
        name = metric(role)
        return _value(now, name) if name else None

    def series(role_or_name, rows_=recent, *, raw=False):
        name = role_or_name if raw else metric(role_or_name)
        return _finite(r.get(name) for r in rows_) if name else []

    def trend_of(role, *, raw=False):
        values = series(role, raw=raw)
        return trend(values) if len(values) >= window else None

    events: list[Event] = []
    add = events.append
    t_min = th["trend_t"]

    # -- single-step checks (the seven of posttrain 1.1) ----------------------------------------
    loss, grad_norm = _value(now, "loss"), _value(now, "grad_norm")
    bad = {k: v for k, v in (("loss", loss), ("grad_norm", grad_norm)) if v is not None and not math.isfinite(v)}
    if bad:
        add(Event("non_finite_loss", step, "the loss or gradient norm is not finite; the update is corrupt.", bad,
                  DEFAULT_ACTIONS["non_finite_loss"],
                  CODES["non_finite_loss"]))
    history = _finite(r.get("grad_norm") for r in rows[:-1][-20:])
    if grad_norm is not None and math.isfinite(grad_norm) and len(history) >= 5:
        median = statistics.median(history)
        if median > 0 and grad_norm > th["grad_norm_spike"] * median:
            add(Event("grad_norm_spike", step, f"grad_norm {grad_norm:.3g} is {grad_norm / median:.0f}x its recent median {median:.3g}.",
                      {"grad_norm": grad_norm, "recent_median": median}, DEFAULT_ACTIONS["grad_norm_spike"],
                      CODES["grad_norm_spike"]))
    reward_trend = trend_of("reward")
    reward_rising = reward_trend is not None and reward_trend["t"] > t_min
    # a distillation method's progress: its divergence to the teacher falls significantly
    divergence_trend = trend_of("teacher_divergence")
    divergence_falling = divergence_trend is not None and divergence_trend["t"] < -t_min
    progress_trend = reward_trend if metric("reward") else divergence_trend
    progressing = reward_rising or divergence_falling
    # While the reward still rises (or the divergence to the teacher still falls) significantly, a more deterministic
    # policy and identical group rewards are learning converging on what is rewarded, not a collapse: info, not warning.
    converged = progressing
    zero_std = series("group_reward_zero_std", rows[-_RECENT:])
    if zero_std and latest("group_reward_zero_std") is not None and sum(zero_std) / len(zero_std) >= th["reward_std_collapse"]:
        mean_zero = sum(zero_std) / len(zero_std)
        add(Event("reward_std_collapse", step, f"{mean_zero:.0%} of prompt groups got identical rewards over the last {len(zero_std)} logged steps, so their advantages are 0 and they teach nothing.",
                  {metric("group_reward_zero_std"): latest("group_reward_zero_std"), "recent_mean": _round(mean_zero), "reward": latest("reward")},
                  DEFAULT_ACTIONS["reward_std_collapse"],
                  "info" if converged else CODES["reward_std_collapse"]))
    clip = latest("clip_fraction")
    if clip is not None and clip >= th["high_clip_ratio"]:
        clips = series("clip_fraction")
        share = sum(c >= th["high_clip_ratio"] for c in clips) / len(clips)
        add(Event("high_clip_ratio", step, f"{clip:.0%} of tokens are clipped: the policy moves too far per rollout (clip ratio out of range in {share:.0%} of the last {len(clips)} logged updates).",
                  {metric("clip_fraction"): clip, "share_of_recent_updates": _round(share), "recent_updates": len(clips)},
                  DEFAULT_ACTIONS["high_clip_ratio"], CODES["high_clip_ratio"]))
    kl = latest("kl")
    kl_history = series("kl", rows[:-1][-20:])
    if kl is not None and math.isfinite(kl) and kl > th["kl_blowup"] and kl_history and kl > 2 * max(kl_history):
        add(Event("kl_blowup", step, f"KL to the reference jumped to {kl:.3g} (recent max {max(kl_history):.3g}).",
                  {metric("kl"): kl, "recent_max": max(kl_history)}, DEFAULT_ACTIONS["kl_blowup"],
                  CODES["kl_blowup"]))
    truncated = latest("truncation")
    if truncated is not None and truncated >= th["completions_truncated"]:
        # A warning only when it may hold learning back: the reward is known not to rise (or the method has none).
        # While the reward rises, or before a full window tells, it is info.
        objective = metric("reward") or metric("teacher_divergence")
        stalled = progress_trend is not None and not progressing
        severity = CODES["completions_truncated"] if stalled or not objective else "info"
        what = "the reward still rises" if metric("reward") else "the divergence to the teacher still falls"
        note = f" ({what})." if progressing else ("." if stalled or not objective else " (too early to tell whether it hurts learning).")
        add(Event("completions_truncated", step, f"{truncated:.0%} of completions hit max_completion_length" + note,
                  {metric("truncation"): truncated, "reward_rising": reward_rising}, DEFAULT_ACTIONS["completions_truncated"],
                  severity))
    lr = _value(now, "learning_rate")
    if lr is not None and lr == 0.0 and step > 1:
        add(Event("zero_learning_rate", step, "the learning rate is 0: the model is not being updated.", {"learning_rate": lr},
                  DEFAULT_ACTIONS["zero_learning_rate"], CODES["zero_learning_rate"]))

    # -- resources ---------------------------------------------------------------------------
    events.extend(_memory_events(step, memory, context, th))
    gen = series("generation_time_fraction", rows[-_RECENT:])
    if len(gen) >= 3 and sum(gen) / len(gen) >= th["throughput_bound"]:
        share = sum(gen) / len(gen)
        add(Event("throughput_bound", step, f"generation takes {share:.0%} of each training step (mean of the last {len(gen)} logged steps).",
                  {metric("generation_time_fraction"): _round(share, 3), "steps_per_second": _value(now, "steps_per_second")},
                  DEFAULT_ACTIONS["throughput_bound"],
                  CODES["throughput_bound"]))

    # -- trends over the window ----------------------------------------------------------------
    if reward_trend is not None and abs(reward_trend["t"]) < t_min:
        add(Event("reward_plateau", step, f"the reward has not improved over the last {reward_trend['n']} logged steps "
                  f"(slope {reward_trend['slope']:.3g}/step against noise {reward_trend['noise']:.3g}, t={reward_trend['t']:.2f}).",
                  {metric("reward"): latest("reward"), **_trend_evidence("reward", reward_trend)},
                  DEFAULT_ACTIONS["reward_plateau"],
                  CODES["reward_plateau"]))
    if reward_rising:
        reasons, evidence = [], {metric("reward"): latest("reward"), **_trend_evidence("reward", reward_trend)}
        kl_trend = trend_of("kl")
        if kl_trend is not None and kl_trend["t"] > t_min and kl_trend["last"] > th["reward_hacking_kl"]:
            reasons.append(f"KL to the reference rose to {kl_trend['last']:.3g}")
            evidence.update(_trend_evidence("kl", kl_trend))
        length_trend = trend_of("completion_length")
        if length_trend is not None and length_trend["t"] > t_min and length_trend["first"] > 0 and length_trend["change"] / length_trend["first"] > th["length_drift"]:
            reasons.append(f"completion length grew {length_trend['change'] / length_trend['first']:.0%}")
            evidence.update(_trend_evidence("completion_length", length_trend))
        eval_rewards = series("eval_" + metric("reward"), list(eval_rows), raw=True) if metric("reward") else []
        if len(eval_rewards) >= 2 and eval_rewards[-1] < max(eval_rewards[:-1]) - max(reward_trend["noise"], 1e-9):
            reasons.append(f"held-out reward fell from {max(eval_rewards[:-1]):.3g} to {eval_rewards[-1]:.3g}")
            evidence.update({"eval_reward_best": max(eval_rewards[:-1]), "eval_reward_last": eval_rewards[-1]})
        if reasons:
            add(Event("reward_hacking", step, "the training reward rises while " + " and ".join(reasons) + ": the policy may be exploiting the reward.",
                      evidence, DEFAULT_ACTIONS["reward_hacking"],
                      CODES["reward_hacking"]))
    entropy = latest("entropy")
    if entropy is not None:
        first = first_entropy if first_entropy is not None else (series("entropy", rows) or [None])[0]
        recent_entropy = series("entropy", rows[-_RECENT:])
        level = sum(recent_entropy) / len(recent_entropy)
        if first and first > 0 and len(rows) >= 3 and level < th["entropy_collapse"] * first:
            add(Event("entropy_collapse", step, f"policy entropy fell to {level:.3g} from {first:.3g} at the start: the policy is becoming deterministic and stops exploring.",
                      {metric("entropy"): entropy, "recent_mean": _round(level), "first": _round(first), "ratio": _round(level / first, 3)},
                      DEFAULT_ACTIONS["entropy_collapse"],
                      "info" if converged else CODES["entropy_collapse"]))
    length_trend = trend_of("completion_length")
    if length_trend is not None and not progressing and length_trend["first"] > 0:
        relative = length_trend["change"] / length_trend["first"]
        if abs(length_trend["t"]) > t_min and abs(relative) > th["length_drift"]:
            direction = "grew" if relative > 0 else "shrank"
            add(Event("length_drift", step, f"completion length {direction} {abs(relative):.0%} over the last {length_trend['n']} logged steps without a reward gain.",
                      {metric("completion_length"): latest("completion_length"), "relative_change": _round(relative, 3), **_trend_evidence("completion_length", length_trend),
                       **({"reward_t": _round(reward_trend["t"], 3)} if reward_trend else {})},
                      DEFAULT_ACTIONS["length_drift"],
                      CODES["length_drift"]))
    if divergence_trend is not None:
        first = (series("teacher_divergence", rows) or [None])[0]
        level = sum(series("teacher_divergence", rows[-_RECENT:])) / max(len(series("teacher_divergence", rows[-_RECENT:])), 1)
        if first and first > 0 and divergence_trend["t"] > -t_min and level > th["divergence_stalled"] * first:
            add(Event("divergence_stalled", step, f"the divergence to the teacher stopped falling at {level:.3g} ({level / first:.0%} of its first value "
                      f"{first:.3g}; slope {divergence_trend['slope']:.3g}/step against noise {divergence_trend['noise']:.3g} over the last "
                      f"{divergence_trend['n']} logged steps).",
                      {metric("teacher_divergence"): latest("teacher_divergence"), "recent_mean": _round(level), "first": _round(first),
                       **_trend_evidence("teacher_divergence", divergence_trend)},
                      DEFAULT_ACTIONS["divergence_stalled"], CODES["divergence_stalled"]))
    student_entropy, teacher_entropy = series("entropy", rows[-_RECENT:]), series("teacher_entropy", rows[-_RECENT:])
    if student_entropy and teacher_entropy and len(rows) >= 3:
        s_level, t_level = sum(student_entropy) / len(student_entropy), sum(teacher_entropy) / len(teacher_entropy)
        if t_level > 0 and s_level < th["teacher_mode_collapse"] * t_level:
            add(Event("teacher_mode_collapse", step, f"the student's entropy ({s_level:.3g} nats/token) is {s_level / t_level:.0%} of the teacher's "
                      f"({t_level:.3g}) on the student's completions: the student is collapsing onto one mode of the teacher.",
                      {metric("entropy"): latest("entropy"), metric("teacher_entropy"): latest("teacher_entropy"),
                       "ratio": _round(s_level / t_level, 3)},
                      DEFAULT_ACTIONS["teacher_mode_collapse"], CODES["teacher_mode_collapse"]))
    explained = series("explained_variance", rows[-_RECENT:])
    value_loss_trend = trend_of("value_loss")
    if len(explained) >= 3 and trend_of("explained_variance") is not None:
        ev_level = sum(explained) / len(explained)
        value_loss_falls = value_loss_trend is not None and value_loss_trend["t"] < -t_min
        if ev_level <= th["critic_not_learning"] and not value_loss_falls:
            how = (f"its loss is flat (slope {value_loss_trend['slope']:.3g}/step against noise {value_loss_trend['noise']:.3g})"
                   if value_loss_trend is not None else "no falling value loss is logged")
            add(Event("critic_not_learning", step, f"the critic's explained variance is {ev_level:.3g} (mean of the last {len(explained)} logged steps) "
                      f"and {how}: its values predict nothing of the returns, so the advantages are mostly noise.",
                      {metric("explained_variance"): latest("explained_variance"), "recent_mean": _round(ev_level),
                       **(_trend_evidence("value_loss", value_loss_trend) if value_loss_trend is not None else {})},
                      DEFAULT_ACTIONS["critic_not_learning"], CODES["critic_not_learning"]))
    failures = series("tool_failure_rate", rows[-_RECENT:])
    call_rates = series("tool_call_rate", rows[-_RECENT:])
    if len(failures) >= 3 and (not call_rates or sum(call_rates) > 0) and sum(failures) / len(failures) >= th["tool_calls_failing"]:
        level = sum(failures) / len(failures)
        add(Event("tool_calls_failing", step, f"{level:.0%} of tool calls failed over the last {len(failures)} logged steps: the model learns from "
                  "error messages instead of tool results.",
                  {metric("tool_failure_rate"): latest("tool_failure_rate"), "recent_mean": _round(level),
                   **({metric("tool_call_rate"): latest("tool_call_rate")} if call_rates else {})},
                  DEFAULT_ACTIONS["tool_calls_failing"], CODES["tool_calls_failing"]))
    limited = series("turn_limit_rate", rows[-_RECENT:])
    if len(limited) >= 3 and sum(limited) / len(limited) >= th["turn_limit_reached"]:
        level = sum(limited) / len(limited)
        add(Event("turn_limit_reached", step, f"{level:.0%} of episodes were cut by the tool-calling turn limit over the last {len(limited)} logged steps: "
                  "they never reach an answer, so the reward sees unfinished work.",
                  {metric("turn_limit_rate"): latest("turn_limit_rate"), "recent_mean": _round(level),
                   **({metric("turns_per_episode"): latest("turns_per_episode")} if metric("turns_per_episode") else {})},
                  DEFAULT_ACTIONS["turn_limit_reached"], CODES["turn_limit_reached"]))
    accuracy_name = metric("preference_accuracy")
    margin_trend = trend_of("preference_margin")
    eval_accuracy = series("eval_" + accuracy_name, list(eval_rows), raw=True) if accuracy_name else []
    if margin_trend is not None and margin_trend["t"] > t_min and eval_accuracy:
        train_accuracy = series("preference_accuracy", rows[-_RECENT:])
        train_level = sum(train_accuracy) / len(train_accuracy) if train_accuracy else None
        stalled = len(eval_accuracy) < 2 or eval_accuracy[-1] <= max(eval_accuracy[:-1]) + 0.01
        if train_level is not None and train_level - eval_accuracy[-1] > th["preference_saturation"] and stalled:
            add(Event("preference_saturation", step, f"the preference margin keeps growing ({margin_trend['slope']:.3g}/step) and training accuracy is {train_level:.0%}, "
                      f"but held-out accuracy stalls at {eval_accuracy[-1]:.0%}: the model memorizes the training pairs.",
                      {"train_accuracy": _round(train_level), "eval_accuracy": eval_accuracy[-1], **_trend_evidence("margin", margin_trend)},
                      DEFAULT_ACTIONS["preference_saturation"], CODES["preference_saturation"]))
    eval_losses = _finite(r.get("eval_loss") for r in eval_rows)
    if len(eval_losses) >= 3:
        best = min(eval_losses)
        best_at = eval_losses.index(best)
        rising = eval_losses[-1] > best + th["eval_divergence"] * max(abs(best), 1e-9) and eval_losses[-1] >= eval_losses[-2] and best_at < len(eval_losses) - 1
        loss_trend = trend(series("loss", rows[-max(window, 3):], raw=True))
        if rising and loss_trend is not None and loss_trend["t"] < -t_min:
            add(Event("eval_divergence", step, f"training loss falls ({loss_trend['slope']:.3g}/step) while evaluation loss rose from its best {best:.4g} to {eval_losses[-1]:.4g}: the model overfits.",
                      {"eval_loss_best": best, "eval_loss_last": eval_losses[-1], "evaluations": len(eval_losses), **_trend_evidence("loss", loss_trend)},
                      DEFAULT_ACTIONS["eval_divergence"],
                      CODES["eval_divergence"]))
    epoch, dataset_rows = _value(now, "epoch"), _num(context.get("train_rows"))
    if epoch is not None and dataset_rows is not None and epoch >= th["data_repeated_epochs"] and dataset_rows < th["data_repeated_rows"]:
        add(Event("data_repeated", step, f"the {int(dataset_rows)}-row dataset has been repeated {epoch:.1f} times: the model may memorize it.",
                  {"epoch": _round(epoch), "train_rows": int(dataset_rows)},
                  DEFAULT_ACTIONS["data_repeated"], CODES["data_repeated"]))
    return _with_actions(events, actions, method)


def _with_actions(events: list[Event], actions, method) -> list[Event]:
    """The events with the method's declared action texts, and ``<method>`` filled in the core's."""
    actions = dict(actions or {})
    out = []
    for event in events:
        text = actions.get(event.code) or event.action
        if method:
            text = text.replace("posttrain info <method>", f"posttrain info {method}")
        out.append(event if text == event.action else replace(event, action=text))
    return out


def check_metrics(step: int, metrics: dict, grad_norm_history=(), kl_history=(), *, signals=None, thresholds=None, actions=None) -> list[Event]:
    """Return the events that ``metrics`` (one logging step) triggers; pure, for reuse and tests.

    The single-step form of :func:`check_history` (no trends): the history is the given
    grad_norm and KL values. ``signals`` defaults to TRL's online-RL metric names (the
    behaviour of posttrain 1.1); pass a method's ``MethodSpec.signals`` otherwise, and its
    ``MethodSpec.actions`` as ``actions`` for its own advice (default: :data:`DEFAULT_ACTIONS`).
    """
    signals = _LEGACY_SIGNALS if signals is None else signals
    kl_name = signals.get("kl", "kl")
    past = [{"step": step - 1, "grad_norm": g} for g in grad_norm_history] + [{"step": step - 1, kl_name: k} for k in kl_history]
    return check_history(past + [{"step": step, **metrics}], signals=signals, thresholds=thresholds, window=10**9, actions=actions)


def _is_eval_row(metrics: dict) -> bool:
    return "loss" not in metrics and any(k.startswith("eval_") for k in metrics)


class Diagnostics:
    """The built-in diagnostics plugin: checks the logged history at each logging step and reports events.

    Args:
        output_dir: Where ``diagnostics.jsonl`` is written (main process only).
        is_main_process: Only the main process prints, writes and logs to trackers.
        repeat_every: Print an already-reported code again at most every N logging steps (and
            measure memory every N logging steps).
        stream: Where events are printed (default stderr).
        signals: The method's ``{role: metric_name}`` (``MethodSpec.signals``).
        window: Logged steps a trend check looks back over (``diagnostics_window``).
        thresholds: Overrides of :data:`DEFAULT_THRESHOLDS` (``diagnostics_thresholds``).
        actions: The method's ``{code: action}`` (``MethodSpec.actions``), replacing the core's
            :data:`DEFAULT_ACTIONS` text of those codes (plugin API 1.5).
        method: The method's name, for the core texts' ``posttrain info <method>`` hint.
    """

    def __init__(self, output_dir: str, *, is_main_process: bool = True, repeat_every: int = 50, stream=None, signals=None, window: int = 20,
                 thresholds=None, actions=None, method=None) -> None:
        self.output_dir = output_dir
        self.is_main_process = is_main_process
        self.repeat_every = repeat_every
        self.stream = stream
        self.signals = dict(signals or {})
        #: the method's declared action texts by code (recorded in run_manifest.json as ``actions``)
        self.actions = dict(actions or {})
        self.method = method
        self.window = window
        self.thresholds = dict(thresholds or {})
        #: run facts the loop fills in at the start of training (batch sizes, dataset rows, ...)
        self.context: dict = {}
        #: ``tracker_log(values, step)`` while the run's trackers are started (set by the loop), else None
        self.tracker_log = None
        self.events: list[Event] = []
        self._rows: deque = deque(maxlen=max(4 * window, 100))
        self._eval_rows: list = []
        self._first_entropy = None
        self._last_printed: dict[str, int] = {}
        self._calls = 0

    @hookimpl
    def on_log(self, step, metrics):
        """Check the logged history, then record and report the events the latest row triggers."""
        if _is_eval_row(metrics):
            self._eval_rows.append({"step": step, **metrics})
            if not self._rows:
                return
            events = [e for e in self._check(step) if e.code in _EVAL_CODES]
        elif "loss" in metrics:
            self._calls += 1
            self._rows.append({"step": step, **metrics})
            entropy_name = self.signals.get("entropy")
            if self._first_entropy is None and entropy_name and _num(metrics.get(entropy_name)) is not None:
                self._first_entropy = float(metrics[entropy_name])
            measure = self._calls == 1 or self._calls % self.repeat_every == 0
            events = self._check(step, memory=measure_memory() if measure else None)
        else:
            return
        for event in events:
            self._report(event)

    def _check(self, step, memory=None) -> list[Event]:
        return check_history(self._rows, self._eval_rows, signals=self.signals, thresholds=self.thresholds, window=self.window,
                             context=self.context, memory=memory, first_entropy=self._first_entropy, actions=self.actions, method=self.method)

    def _report(self, event: Event) -> None:
        self.events.append(event)
        if not self.is_main_process:
            return
        with open(os.path.join(self.output_dir, "diagnostics.jsonl"), "a") as fh:
            fh.write(event.to_json() + "\n")
        if self.tracker_log is not None:
            level = {"info": 1.0, "warning": 2.0, "error": 3.0}.get(event.severity, 2.0)
            self.tracker_log({f"diagnostics/{event.code}": level, f"diagnostics/{event.code}/message": f"{event.message} Try: {event.action}"}, event.step)
        last = self._last_printed.get(event.code)
        if last is None or self._calls - last >= self.repeat_every:
            self._last_printed[event.code] = self._calls
            print(f"[posttrain diagnostic] step {event.step} {event.severity} {event.code}: {event.message} Try: {event.action}", file=self.stream or sys.stderr)


# ---------------------------------------------------------------------------------------------- offline
def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.isfile(path):
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line being written by a running run
                        continue
    return rows


def _spec_mapping(manifest: dict, key: str) -> dict:
    """The manifest's ``key`` mapping (``signals``, ``actions``), else the installed plugin's spec's (older manifests)."""
    if isinstance(manifest.get(key), dict):
        return manifest[key]
    method = manifest.get("method")
    if not method:
        return {}
    try:  # older manifests: ask the installed plugin's spec
        from posttrain._registry import Registry

        spec = Registry().get_info(method).spec
        return dict(getattr(spec, key, {}) or {})
    except Exception:
        return {}


def _signals_of(manifest: dict) -> dict:
    return _spec_mapping(manifest, "signals")


def _actions_of(manifest: dict) -> dict:
    return _spec_mapping(manifest, "actions")


def diagnose(output_dir: str) -> dict:
    """Read a run's ``metrics.jsonl``, ``diagnostics.jsonl`` and ``run_manifest.json`` and return its verdict (JSON schema 1).

    The trend checks are replayed over the logged rows (so a run logged before these checks
    existed is judged too), merged with the events the run recorded (memory, ...). The signals
    and the method's action texts come from the manifest (``signals``, ``actions``), or, for a
    manifest written before it recorded them, from the installed plugin's spec. Returns a dict:
    ``schema``, ``output_dir``, ``method``, ``verdict`` (one of :data:`VERDICTS`), ``reason``,
    ``steps_logged``, ``last_step``, ``max_steps``, ``finished``, ``evidence`` (numbers), ``events``
    (one entry per code: ``code``, ``severity``, ``count``, ``first_step``, ``last_step``,
    ``message``, ``evidence``, ``action``) and ``actions`` (the top three, most severe first).

    Raises:
        FileNotFoundError: ``output_dir`` has no ``metrics.jsonl``.
    """
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise FileNotFoundError(f"{output_dir!r} has no metrics.jsonl: give the output_dir of a posttrain run (one that logged at least one step).")
    manifest = {}
    manifest_path = os.path.join(output_dir, "run_manifest.json")
    if os.path.isfile(manifest_path):
        with open(manifest_path) as fh:
            manifest = json.load(fh)
    config = manifest.get("config") or {}
    signals, actions, method = _signals_of(manifest), _actions_of(manifest), manifest.get("method")
    window = int(config.get("diagnostics_window") or 20)
    thresholds = {**DEFAULT_THRESHOLDS, **(config.get("diagnostics_thresholds") or {})}
    context = {"per_device_train_batch_size": config.get("per_device_train_batch_size"),
               "gradient_accumulation_steps": config.get("gradient_accumulation_steps"), "train_rows": manifest.get("train_rows")}

    rows = _read_jsonl(metrics_path)
    runs = _split_runs(rows)
    rows = runs[-1] if runs else []
    note = None
    if len(runs) > 1:  # several runs appended to one file (posttrain < 1.4 allowed a fresh run into a used output_dir)
        note = (f"metrics.jsonl holds {len(runs)} runs written into the same output_dir; only the last one "
                f"(from step {rows[0].get('step', '?')}) is judged. Give each run its own output_dir.")
    train_rows, eval_rows, events = [], [], []
    first_entropy = None
    entropy_name = signals.get("entropy")
    for row in rows:
        if _is_eval_row(row):
            eval_rows.append(row)
            if train_rows:
                events += [e for e in check_history(train_rows, eval_rows, signals=signals, thresholds=thresholds, window=window, context=context,
                                                    first_entropy=first_entropy, actions=actions, method=method) if e.code in _EVAL_CODES]
        elif "loss" in row:
            train_rows.append(row)
            if first_entropy is None and entropy_name and _num(row.get(entropy_name)) is not None:
                first_entropy = float(row[entropy_name])
            events += check_history(train_rows[-4 * window:], eval_rows, signals=signals, thresholds=thresholds, window=window, context=context,
                                    first_entropy=first_entropy, actions=actions, method=method)
    replayed = {e.code for e in events}
    for recorded in [] if note else _read_jsonl(os.path.join(output_dir, "diagnostics.jsonl")):  # one run's events only
        code = recorded.get("code")
        if code and code not in replayed:  # only what replay cannot recompute (memory, third-party checks)
            events.append(Event(code, int(recorded.get("step", 0)), recorded.get("message", ""), recorded.get("evidence") or {},
                                recorded.get("action", ""), recorded.get("severity", CODES.get(code, "warning"))))

    last_step = int(train_rows[-1]["step"]) if train_rows else 0
    max_steps = manifest.get("max_steps")
    recent_from = int(train_rows[-window]["step"]) if len(train_rows) >= window else (int(train_rows[0]["step"]) if train_rows else 0)
    by_code: dict[str, dict] = {}
    for e in events:
        entry = by_code.setdefault(e.code, {"code": e.code, "severity": e.severity, "count": 0, "first_step": e.step})
        entry.update(count=entry["count"] + 1, last_step=e.step, message=e.message, evidence=e.evidence, action=e.action,
                     severity=e.severity if entry["severity"] != "error" else "error")  # the latest occurrence's, errors stay
    active = {c for c, entry in by_code.items() if entry["last_step"] >= recent_from and entry["severity"] != "info"}

    evidence = {"train_rows_logged": len(train_rows), "eval_rows_logged": len(eval_rows), "window": window}
    objective_name, sign = None, 1.0
    for role in ("reward", "preference_accuracy", "preference_margin", "token_accuracy"):
        if signals.get(role) and _finite(r.get(signals[role]) for r in train_rows):
            objective_name = signals[role]
            break
    if objective_name is None and signals.get("teacher_divergence") and _finite(r.get(signals["teacher_divergence"]) for r in train_rows):
        objective_name, sign = signals["teacher_divergence"], -1.0  # distillation: the divergence to the teacher falls
    if objective_name is None:
        objective_name, sign = "loss", -1.0
    values = _finite(r.get(objective_name) for r in train_rows)
    whole = trend(values)
    recent = trend(values[-window:])
    for label, tr in (("run", whole), ("recent", recent)):
        if tr is not None:
            evidence.update({f"{objective_name}_{label}_{k}": _round(tr[k], 4) for k in ("first", "last", "slope", "noise", "t")})
    t_min = thresholds["trend_t"]

    def rising(tr):
        return tr is not None and sign * tr["t"] > t_min

    def falling(tr):
        return tr is not None and sign * tr["t"] < -t_min

    losses = _finite(r.get("loss") for r in train_rows)
    loss_trend = trend(losses)
    head, tail = max(1, len(losses) // 5), max(1, len(losses) // 2)  # the first fifth against the second half
    loss_start = sum(losses[:head]) / head if losses else 0.0
    loss_end = sum(losses[-tail:]) / tail if losses else 0.0
    evidence.update({"loss_first_mean": _round(loss_start), "loss_last_mean": _round(loss_end)})
    if "non_finite_loss" in by_code:
        verdict, reason = "diverged", "the loss or gradient norm became non-finite"
    elif len(train_rows) < min(window, 5):
        verdict, reason = "too short to tell", f"only {len(train_rows)} logged training steps (need {min(window, 5)})"
    elif not signals.get("reward") and loss_trend is not None and loss_start > 1e-3 and loss_end > 1.5 * loss_start:
        # (online RL losses carry the KL penalty and may rise in a healthy run: only offline losses count here)
        verdict, reason = "diverged", f"the training loss rose from {loss_start:.4g} (first {head} logged steps) to {loss_end:.4g} (last {tail})"
    # over-optimizing and drifting come before collapsing: a hacked reward saturates, and then the groups'
    # rewards agree and the entropy falls; the cause is what the user must act on
    elif active & {"reward_hacking", "preference_saturation", "eval_divergence"}:
        verdict, reason = "over-optimizing", ", ".join(sorted(active & {"reward_hacking", "preference_saturation", "eval_divergence"}))
    elif active & {"length_drift", "kl_blowup"}:
        verdict, reason = "drifting", ", ".join(sorted(active & {"length_drift", "kl_blowup"}))
    elif active & {"entropy_collapse", "reward_std_collapse", "teacher_mode_collapse"} or (objective_name != "loss" and falling(recent)):
        codes = sorted(active & {"entropy_collapse", "reward_std_collapse", "teacher_mode_collapse"})
        verdict, reason = "collapsing", (", ".join(codes) if codes else f"{objective_name} is falling") + " in the last window"
    elif active & {"reward_plateau", "divergence_stalled"} or (recent is not None and not rising(recent) and not rising(whole)):
        verdict, reason = "plateaued", f"{objective_name} has not improved over the last {min(window, len(values))} logged steps"
    elif rising(whole) or rising(recent):
        verdict, reason = "improving", f"{objective_name} improves (t={sign * (recent or whole)['t']:.2f} over the last window)"
    else:
        verdict, reason = "plateaued", f"no significant trend in {objective_name}"

    order = {"error": 0, "warning": 1, "info": 2}
    entries = sorted(by_code.values(), key=lambda e: (order.get(e["severity"], 1), -e["last_step"]))
    actions = []
    for entry in entries:
        if entry["action"] and entry["action"] not in actions:
            actions.append(f"{entry['code']}: {entry['action']}")
    return {
        "schema": SCHEMA_VERSION,
        "output_dir": os.path.abspath(output_dir),
        "method": manifest.get("method"),
        "verdict": verdict,
        "reason": reason,
        "steps_logged": len(train_rows),
        "last_step": last_step,
        "max_steps": max_steps,
        "finished": bool(max_steps) and last_step >= int(max_steps),
        "objective": objective_name,
        "evidence": evidence,
        "events": entries,
        "actions": actions[:3],
        "note": note,
    }


def _split_runs(rows: list[dict]) -> list[list[dict]]:
    """Split logged rows into runs: a step lower than the one before starts another run (a resumed run truncates its log, so within one run steps never go back)."""
    runs: list[list[dict]] = []
    previous = None
    for row in rows:
        step = _num(row.get("step"))
        if not runs or (step is not None and previous is not None and step < previous):
            runs.append([])
        runs[-1].append(row)
        if step is not None:
            previous = step
    return runs


def format_report(report: dict) -> str:
    """Render a :func:`diagnose` result for people."""
    state = "finished" if report["finished"] else f"step {report['last_step']}" + (f" of {report['max_steps']}" if report["max_steps"] else "")
    lines = [f"{report['output_dir']} ({report['method'] or 'unknown method'}, {state}, {report['steps_logged']} logged steps)",
             f"verdict: {report['verdict'].upper()} - {report['reason']}"]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append("evidence:")
    lines += [f"  {k} = {v}" for k, v in report["evidence"].items()]
    if report["events"]:
        lines.append("diagnostics:")
        for e in report["events"]:
            steps = f"step {e['first_step']}" + (f"-{e['last_step']}" if e["last_step"] != e["first_step"] else "")
            lines.append(f"  [{e['severity']}] {e['code']} x{e['count']} ({steps}): {e['message']}")
    if report["actions"]:
        lines.append("top actions:")
        lines += [f"  {i}. {a}" for i, a in enumerate(report["actions"], 1)]
    return "\n".join(lines)
