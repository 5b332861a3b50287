"""The critic diagnostic of PPO-style methods: a value model whose explained variance stays at or below 0 while its loss
does not fall (``critic_not_learning``), and the roles ``value_loss`` / ``explained_variance`` it reads."""

from __future__ import annotations

import math

from posttrain import SIGNAL_ROLES
from posttrain.diagnostics import check_history

SIGNALS = {"value_loss": "loss/value_avg", "explained_variance": "val/explained_variance"}


def _rows(value_losses, explained):
    return [{"step": i + 1, "loss/value_avg": v, "val/explained_variance": e} for i, (v, e) in enumerate(zip(value_losses, explained))]


def _events(rows, window=10):
    return [e for e in check_history(rows, signals=SIGNALS, window=window) if e.code == "critic_not_learning"]


def test_the_roles_exist():
    assert {"value_loss", "explained_variance"} <= set(SIGNAL_ROLES)


def test_a_critic_that_predicts_nothing_and_does_not_improve_is_reported():
    rows = _rows([1.0 + 0.05 * (-1) ** i for i in range(12)], [-0.1 + 0.05 * (-1) ** i for i in range(12)])
    events = _events(rows)
    assert len(events) == 1 and events[0].severity == "warning"
    assert events[0].evidence["recent_mean"] <= 0 and "value_loss_t" in events[0].evidence
    assert "`max_steps`" in events[0].action


def test_a_learning_critic_is_not_reported():
    # explained variance rises above 0: the critic predicts part of the return
    assert _events(_rows([1.0 * math.exp(-0.2 * i) for i in range(12)], [min(0.9, 0.1 * i) for i in range(12)])) == []
    # explained variance still <= 0 but the value loss falls steadily: it is learning, too early to warn
    assert _events(_rows([2.0 - 0.1 * i + 0.01 * (-1) ** i for i in range(12)], [-0.2] * 12)) == []


def test_too_few_logged_steps_tell_nothing():
    assert _events(_rows([1.0] * 4, [-0.5] * 4)) == []
