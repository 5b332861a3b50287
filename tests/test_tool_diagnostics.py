"""The tool-calling diagnostics: most tool calls failing (``tool_calls_failing``) and episodes always cut by the turn
limit (``turn_limit_reached``), and the roles they read (plugin API 1.8)."""

from __future__ import annotations

from posttrain import SIGNAL_ROLES
from posttrain.diagnostics import check_history

SIGNALS = {"tool_call_rate": "tools/call_frequency", "tool_failure_rate": "tools/failure_frequency", "turns_per_episode": "tools/mean_turns",
           "turn_limit_rate": "tools/turn_limit_ratio"}


def _rows(failure, limit, calls=1.5):
    return [{"step": i + 1, "loss": 0.1, "tools/call_frequency": calls, "tools/failure_frequency": f, "tools/mean_turns": 2.0,
             "tools/turn_limit_ratio": t} for i, (f, t) in enumerate(zip(failure, limit))]


def _codes(rows):
    return [e for e in check_history(rows, signals=SIGNALS, window=10) if e.code in ("tool_calls_failing", "turn_limit_reached")]


def test_the_roles_exist():
    assert set(SIGNALS) <= set(SIGNAL_ROLES)


def test_failing_tools_and_exhausted_turns_are_reported():
    (event,) = _codes(_rows([0.2, 0.6, 0.7, 0.8, 0.9, 0.7], [0.0] * 6))
    assert event.code == "tool_calls_failing" and event.severity == "warning" and event.evidence["recent_mean"] >= 0.5
    assert event.evidence["tools/failure_frequency"] == 0.7 and "docstrings" in event.action
    (event,) = _codes(_rows([0.0] * 5, [1.0, 0.9, 1.0, 1.0, 0.95]))
    assert event.code == "turn_limit_reached" and event.evidence["tools/mean_turns"] == 2.0


def test_healthy_or_short_runs_are_not_reported():
    assert _codes(_rows([0.1, 0.3, 0.2, 0.4, 0.2], [0.5, 0.2, 0.8, 0.1, 0.3])) == []
    assert _codes(_rows([1.0, 1.0], [1.0, 1.0])) == []  # two logged steps tell nothing yet
    assert _codes(_rows([1.0] * 5, [0.0] * 5, calls=0.0)) == []  # no calls: a failure rate of nothing
    assert [e for e in check_history(_rows([1.0] * 5, [1.0] * 5), signals={}, window=10) if e.code.startswith(("tool", "turn"))] == []
