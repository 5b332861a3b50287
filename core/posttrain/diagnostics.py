"""Training diagnostics: structured events a person or a program can act on.

Every run registers a :class:`Diagnostics` plugin on the loop's plugin manager. On each logging
step (the ``on_log`` hook) it checks the logged metrics and emits :class:`Event` objects: a
stable ``code``, a message, the evidence (the metric values that triggered it) and a suggested
action. Events are printed once per code (then at most every ``repeat_every`` logging steps) and
appended to ``output_dir/diagnostics.jsonl`` for programs and agents. Other plugins can add
their own checks through the same ``on_log`` hook.

Codes (stable; see STABILITY.md):
    non_finite_loss        the loss or grad_norm is NaN or infinite
    grad_norm_spike        grad_norm is far above its recent median
    reward_std_collapse    most prompt groups have identical rewards (no learning signal)
    high_clip_ratio        a large fraction of tokens sits outside the PPO clip region
    kl_blowup              the KL to the reference is large and growing
    completions_truncated  most completions hit max_completion_length
    zero_learning_rate     the learning rate is 0 while training (schedule/warm-up mistake)
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import deque
from dataclasses import asdict, dataclass, field

from posttrain.hookspecs import hookimpl

__all__ = ["Event", "Diagnostics", "check_metrics"]


@dataclass(frozen=True)
class Event:
    """One diagnostic finding."""

    code: str  #: stable identifier, e.g. ``"reward_std_collapse"``
    step: int  #: optimizer step at which it was detected
    message: str  #: what is wrong, for people
    evidence: dict = field(default_factory=dict)  #: metric name -> value that triggered it
    action: str = ""  #: what to try

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def _value(metrics: dict, *names: str):
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def check_metrics(step: int, metrics: dict, grad_norm_history=(), kl_history=()) -> list[Event]:
    """Return the events that ``metrics`` (one logging step) triggers; pure, for reuse and tests.

    Args:
        step: The optimizer step.
        metrics: The logged metrics (name -> float).
        grad_norm_history: Recent grad_norm values (for spike detection).
        kl_history: Recent KL values (for growth detection).
    """
    events = []
    loss, grad_norm = _value(metrics, "loss"), _value(metrics, "grad_norm")
    bad = {k: v for k, v in (("loss", loss), ("grad_norm", grad_norm)) if v is not None and not math.isfinite(v)}
    if bad:
        events.append(Event("non_finite_loss", step, "the loss or gradient norm is not finite; the update is corrupt.", bad,
                            "lower learning_rate, keep max_grad_norm > 0, train in float32 or bf16 (not fp16), and check the data for empty or overlong rows."))
    if grad_norm is not None and math.isfinite(grad_norm) and len(grad_norm_history) >= 5:
        median = statistics.median(grad_norm_history)
        if median > 0 and grad_norm > 10 * median:
            events.append(Event("grad_norm_spike", step, f"grad_norm {grad_norm:.3g} is {grad_norm / median:.0f}x its recent median {median:.3g}.",
                                {"grad_norm": grad_norm, "recent_median": median}, "lower learning_rate or max_grad_norm; look for outlier batches."))
    zero_std = _value(metrics, "frac_reward_zero_std")
    if zero_std is not None and zero_std >= 0.9:
        events.append(Event("reward_std_collapse", step, f"{zero_std:.0%} of prompt groups got identical rewards, so their advantages are 0 and they teach nothing.",
                            {"frac_reward_zero_std": zero_std, "reward": _value(metrics, "reward")},
                            "raise num_generations or temperature, use easier/harder prompts, or give the reward function partial credit."))
    clip = _value(metrics, "clip_ratio/region_mean")
    if clip is not None and clip >= 0.3:
        events.append(Event("high_clip_ratio", step, f"{clip:.0%} of tokens are clipped: the policy moves too far per rollout.",
                            {"clip_ratio/region_mean": clip}, "lower learning_rate or num_iterations, or raise epsilon."))
    kl = _value(metrics, "kl")
    if kl is not None and math.isfinite(kl) and kl > 1.0 and kl_history and kl > 2 * max(kl_history):
        events.append(Event("kl_blowup", step, f"KL to the reference jumped to {kl:.3g} (recent max {max(kl_history):.3g}).",
                            {"kl": kl, "recent_max": max(kl_history)}, "raise beta, lower learning_rate, or check the reward for exploits."))
    truncated = _value(metrics, "completions/clipped_ratio", "clipped_ratio")
    if truncated is not None and truncated >= 0.5:
        events.append(Event("completions_truncated", step, f"{truncated:.0%} of completions hit max_completion_length.",
                            {"completions/clipped_ratio": truncated}, "raise max_completion_length, or set mask_truncated_completions=True."))
    lr = _value(metrics, "learning_rate")
    if lr is not None and lr == 0.0 and step > 1:
        events.append(Event("zero_learning_rate", step, "the learning rate is 0: the model is not being updated.", {"learning_rate": lr},
                            "check learning_rate, warmup_steps/warmup_ratio and lr_scheduler_type."))
    return events


class Diagnostics:
    """The built-in diagnostics plugin: checks each logging step's metrics and reports events.

    Args:
        output_dir: Where ``diagnostics.jsonl`` is written (main process only).
        is_main_process: Only the main process prints and writes.
        repeat_every: Print an already-reported code again at most every N logging steps.
        stream: Where events are printed (default stderr).
    """

    def __init__(self, output_dir: str, *, is_main_process: bool = True, repeat_every: int = 50, stream=None) -> None:
        self.output_dir = output_dir
        self.is_main_process = is_main_process
        self.repeat_every = repeat_every
        self.stream = stream
        self.events: list[Event] = []
        self._grad_norms: deque = deque(maxlen=20)
        self._kls: deque = deque(maxlen=20)
        self._last_printed: dict[str, int] = {}
        self._calls = 0

    @hookimpl
    def on_log(self, step, metrics):
        """Check the logged metrics, then record and report the events they trigger."""
        if "loss" not in metrics:  # evaluation logs are not training signals
            return
        self._calls += 1
        events = check_metrics(step, metrics, tuple(self._grad_norms), tuple(self._kls))
        grad_norm, kl = _value(metrics, "grad_norm"), _value(metrics, "kl")
        if grad_norm is not None and math.isfinite(grad_norm):
            self._grad_norms.append(grad_norm)
        if kl is not None and math.isfinite(kl):
            self._kls.append(kl)
        for event in events:
            self.events.append(event)
            if not self.is_main_process:
                continue
            with open(os.path.join(self.output_dir, "diagnostics.jsonl"), "a") as fh:
                fh.write(event.to_json() + "\n")
            last = self._last_printed.get(event.code)
            if last is None or self._calls - last >= self.repeat_every:
                self._last_printed[event.code] = self._calls
                print(f"[posttrain diagnostic] step {step} {event.code}: {event.message} Try: {event.action}", file=self.stream or sys.stderr)
