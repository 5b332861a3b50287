"""Tests of the structured training diagnostics (posttrain.diagnostics)."""

import io
import json
import math

import pytest

from posttrain.diagnostics import Diagnostics, check_metrics
from posttrain.testing._toy import TOY_SPEC, ToyConfig, ToyLMTrainer, toy_sequences


def codes(events):
    return [e.code for e in events]


def test_healthy_metrics_trigger_nothing():
    assert check_metrics(5, {"loss": 1.0, "grad_norm": 0.5, "learning_rate": 1e-4, "frac_reward_zero_std": 0.2, "kl": 0.01}, [0.4] * 10, [0.01]) == []


def test_non_finite_loss_is_reported_with_evidence_and_action():
    (event,) = check_metrics(3, {"loss": math.nan, "grad_norm": 1.0})
    assert event.code == "non_finite_loss" and "loss" in event.evidence and "learning_rate" in event.action


def test_reward_std_collapse_names_the_fraction_and_the_fix():
    (event,) = check_metrics(7, {"loss": 0.1, "frac_reward_zero_std": 0.95, "reward": 1.0})
    assert event.code == "reward_std_collapse" and event.evidence["frac_reward_zero_std"] == 0.95
    assert "num_generations" in event.action


def test_grad_norm_spike_needs_history_and_a_large_jump():
    assert check_metrics(9, {"loss": 1.0, "grad_norm": 50.0}, [1.0] * 3) == []  # too little history
    assert codes(check_metrics(9, {"loss": 1.0, "grad_norm": 50.0}, [1.0] * 6)) == ["grad_norm_spike"]


@pytest.mark.parametrize(
    "metrics, code",
    [
        ({"loss": 1.0, "clip_ratio/region_mean": 0.4}, "high_clip_ratio"),
        ({"loss": 1.0, "completions/clipped_ratio": 0.8}, "completions_truncated"),
        ({"loss": 1.0, "learning_rate": 0.0}, "zero_learning_rate"),
    ],
)
def test_each_rule_fires_on_its_metric(metrics, code):
    assert codes(check_metrics(4, metrics)) == [code]


def test_kl_blowup_compares_with_recent_values():
    assert codes(check_metrics(4, {"loss": 1.0, "kl": 5.0}, (), [0.5, 1.0])) == ["kl_blowup"]
    assert check_metrics(4, {"loss": 1.0, "kl": 5.0}, (), [4.0]) == []


def test_plugin_writes_jsonl_and_prints_each_code_once_then_rate_limited(tmp_path):
    stream = io.StringIO()
    diag = Diagnostics(str(tmp_path), repeat_every=3, stream=stream, signals={"group_reward_zero_std": "frac_reward_zero_std"})
    for step in range(1, 6):
        diag.on_log(step=step, metrics={"loss": 1.0, "frac_reward_zero_std": 1.0})
    lines = [json.loads(line) for line in open(tmp_path / "diagnostics.jsonl")]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert {"code", "step", "message", "evidence", "action", "severity"} <= set(lines[0])
    assert stream.getvalue().count("reward_std_collapse") == 2  # at the 1st and the 4th logging step


def test_training_run_records_a_zero_learning_rate_diagnostic(register_method, tiny_model, tiny_tokenizer, tmp_path):
    register_method(TOY_SPEC)
    args = ToyConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=0.0, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4)
    trainer = ToyLMTrainer(model=tiny_model, args=args, train_dataset=toy_sequences(8, vocab=len(tiny_tokenizer)), processing_class=tiny_tokenizer)
    trainer.train()
    assert "zero_learning_rate" in codes(trainer.loop.diagnostics.events)
    assert (tmp_path / "diagnostics.jsonl").exists()


def test_without_declared_signals_the_method_metrics_are_not_read(tmp_path):
    diag = Diagnostics(str(tmp_path))
    diag.on_log(step=1, metrics={"loss": 1.0, "frac_reward_zero_std": 1.0, "clip_ratio/region_mean": 0.9})
    assert diag.events == []


def test_trend_fits_slope_noise_and_t():
    from posttrain.diagnostics import trend

    line = trend([1.0, 2.0, 3.0, 4.0])
    assert line["slope"] == pytest.approx(1.0) and line["noise"] == pytest.approx(0.0, abs=1e-12) and line["t"] == math.inf
    flat = trend([0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    assert abs(flat["t"]) < 2 and flat["noise"] > 0.4  # alternating: no trend, large scatter
    # independent reference: numpy's least squares
    import numpy as np

    ys = [0.3, 0.1, 0.5, 0.4, 0.9, 0.7]
    slope, intercept = np.polyfit(range(6), ys, 1)
    resid = np.array(ys) - (slope * np.arange(6) + intercept)
    se = np.sqrt((resid**2).sum() / 4) / np.sqrt(((np.arange(6) - 2.5) ** 2).sum())
    got = trend(ys)
    assert got["slope"] == pytest.approx(slope) and got["t"] == pytest.approx(slope / se)


def test_spec_signals_are_validated_and_accept_signal_roles():
    from posttrain import MethodSpec, SignalRole, SpecError

    base = dict(name="m", maturity="stable", plugin_api="1.1", summary="x", trainer="a.b:C", config="a.b:D")
    assert MethodSpec(**base, signals={SignalRole.REWARD: "r"}).signals == {"reward": "r"}
    assert MethodSpec(**base).signals == {}  # optional: third-party specs without it still load
    with pytest.raises(SpecError, match="unknown role 'rewardz'"):
        MethodSpec(**base, signals={"rewardz": "r"})


def test_thresholds_are_checked_by_name():
    from posttrain import ConfigError, TrainingConfig

    with pytest.raises(ConfigError, match="Did you mean 'memory_headroom'"):
        TrainingConfig(diagnostics_thresholds={"memory_headrom": 0.1})
    with pytest.raises(ConfigError, match="diagnostics_window=2"):
        TrainingConfig(diagnostics_window=2)
