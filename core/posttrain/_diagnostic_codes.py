"""The diagnostic codes and the default thresholds (light: imports no posttrain module).

:mod:`posttrain.config` validates ``diagnostics_thresholds`` against :data:`DEFAULT_THRESHOLDS`
and :mod:`posttrain._spec` validates ``MethodSpec.actions`` against :data:`CODES`; both import
them from here, so neither pulls in :mod:`posttrain.diagnostics` (nor, through it, the registry).
:mod:`posttrain.diagnostics` re-exports both under the same public names.
"""

from __future__ import annotations

__all__ = ["CODES", "DEFAULT_THRESHOLDS"]

#: Every code :mod:`posttrain.diagnostics` emits, with its severity (*contract*: a code is never renamed).
CODES = {
    "non_finite_loss": "error", "grad_norm_spike": "warning", "reward_std_collapse": "warning", "high_clip_ratio": "warning",
    "kl_blowup": "warning", "completions_truncated": "warning", "zero_learning_rate": "warning", "memory_headroom": "info",
    "memory_pressure": "warning", "throughput_bound": "info", "reward_plateau": "warning", "reward_hacking": "warning",
    "entropy_collapse": "warning", "length_drift": "warning", "preference_saturation": "warning", "eval_divergence": "warning",
    "data_repeated": "info", "divergence_stalled": "warning", "teacher_mode_collapse": "warning",
    "critic_not_learning": "warning", "tool_calls_failing": "warning", "turn_limit_reached": "warning",
}

#: Thresholds of the checks; override any of them with ``TrainingConfig.diagnostics_thresholds``.
DEFAULT_THRESHOLDS = {
    "trend_t": 2.0,  # |slope| / its standard error above which a trend counts as real
    "grad_norm_spike": 10.0,  # grad_norm / recent median
    "reward_std_collapse": 0.9,  # mean fraction of zero-std groups over the last few steps
    "high_clip_ratio": 0.3,  # fraction of clipped tokens
    "kl_blowup": 1.0,  # KL (nats/token) above which a doubling is reported
    "completions_truncated": 0.5,  # fraction of truncated completions
    "memory_headroom": 0.5,  # peak memory / available below which a larger micro-batch is suggested
    "memory_pressure": 0.9,  # peak memory / available above which a smaller micro-batch is suggested
    "throughput_bound": 0.6,  # fraction of step time spent generating
    "entropy_collapse": 0.1,  # entropy / the run's first entropy below which entropy has collapsed
    "length_drift": 0.3,  # relative change of completion length over the window
    "reward_hacking_kl": 1.0,  # KL (nats/token) a rising reward may not drive the policy past
    "preference_saturation": 0.15,  # train accuracy - held-out accuracy above which accuracy has stalled
    "eval_divergence": 0.02,  # relative rise of eval loss above its best value
    "data_repeated_epochs": 4.0,  # epochs over a small dataset before data_repeated is reported
    "data_repeated_rows": 1000.0,  # datasets smaller than this many rows count as small
    "divergence_stalled": 0.5,  # recent divergence / the run's first above which a divergence that stopped falling is reported
    "teacher_mode_collapse": 0.5,  # student entropy / teacher entropy below which the student sits on a mode of the teacher
    "critic_not_learning": 0.0,  # recent mean explained variance at or below which the critic predicts nothing of the return
    "tool_calls_failing": 0.5,  # recent mean fraction of tool calls that failed (exception, unknown tool, bad arguments, timeout)
    "turn_limit_reached": 0.9,  # recent mean fraction of episodes cut by the tool-calling turn limit
}
