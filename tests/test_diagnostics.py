"""Tests of the structured training diagnostics (posttrain.diagnostics)."""

import io
import json
import math
import os
import re
import subprocess
import sys

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
    assert "more completions per prompt" in event.action and "num_generations" not in event.action  # the core's advice names no method field
    (event,) = check_metrics(7, {"loss": 0.1, "frac_reward_zero_std": 0.95}, actions={"reward_std_collapse": "raise `num_generations`."})
    assert event.action == "raise `num_generations`."  # the method's own advice (MethodSpec.actions)


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


# -- advice from the method, not from GRPO (plugin API 1.5: MethodSpec.actions) ------------------------------------


def _core_fields():
    from posttrain import TrainingConfig, config_fields

    return {f["name"] for f in config_fields(TrainingConfig)}


def _installed_specs_with_configs():
    """(spec, its config's field names) for every installed method whose spec loads."""
    import importlib

    from posttrain import Registry, config_fields

    out = []
    for info in Registry().list_methods():
        if info.spec is None or not info.spec.config:
            continue
        module, cls = info.spec.config.split(":")
        out.append((info.spec, {f["name"] for f in config_fields(getattr(importlib.import_module(module), cls))}))
    return out


def _method_only_fields():
    """Snake_case fields some installed method's config has and TrainingConfig has not (num_generations, label_smoothing, ...)."""
    core = _core_fields()
    return {name for _, fields in _installed_specs_with_configs() for name in fields - core if "_" in name}


def test_spec_actions_are_validated_by_code_and_optional():
    from posttrain import MethodSpec, SpecError
    from posttrain.diagnostics import CODES

    base = dict(name="m", maturity="stable", plugin_api="1.5", summary="x", trainer="a.b:C", config="a.b:D")
    assert MethodSpec(**base).actions == {}  # optional: specs written before plugin API 1.5 load unchanged
    spec = MethodSpec(**base, actions={"kl_blowup": "raise `beta`."})
    assert spec.actions == {"kl_blowup": "raise `beta`."}
    with pytest.raises(SpecError, match="actions has unknown code 'kl_blowout': use one of non_finite_loss, ") as excinfo:
        MethodSpec(**base, actions={"kl_blowout": "raise `beta`."})
    assert "\n" not in str(excinfo.value) and all(code in str(excinfo.value) for code in CODES)
    with pytest.raises(SpecError, match=r"actions\['kl_blowup'\]=''"):
        MethodSpec(**base, actions={"kl_blowup": ""})
    with pytest.raises(SpecError, match="actions is a list"):
        MethodSpec(**base, actions=["kl_blowup"])


def test_action_fields_reads_backticked_field_references_and_refuses_anything_else():
    from posttrain.diagnostics import action_fields

    text = "raise `num_generations`, set `mask_truncated_completions=True`, keep `max_grad_norm` > 0 or `epsilon > 0.1` (`posttrain info grpo`)."
    assert action_fields(text) == ["num_generations", "mask_truncated_completions", "max_grad_norm", "epsilon"]
    assert action_fields("no fields here.") == []
    with pytest.raises(ValueError, match="'a larger batch'"):
        action_fields("use `a larger batch`.")


def test_core_default_actions_name_only_training_config_fields():
    from posttrain.diagnostics import CODES, DEFAULT_ACTIONS, action_fields

    assert set(DEFAULT_ACTIONS) == set(CODES)
    core, method_only = _core_fields(), _method_only_fields()
    assert {"num_generations", "mask_truncated_completions", "max_completion_length", "label_smoothing"} <= method_only  # the check has teeth
    for code, text in DEFAULT_ACTIONS.items():
        assert set(action_fields(text)) <= core, (code, text)
        words = set(re.findall(r"[A-Za-z_]\w*", text))
        assert not words & method_only, (code, sorted(words & method_only))
        assert "dr_grpo" not in text and "vllm_" not in text and "use_vllm" not in text, (code, text)


def test_every_installed_methods_actions_name_fields_of_its_own_config():
    from posttrain.diagnostics import action_fields

    checked = 0
    for spec, fields in _installed_specs_with_configs():
        for code, text in spec.actions.items():
            named = action_fields(text)
            assert named, f"{spec.name}: actions[{code!r}] names no config field in backticks: {text!r}"
            assert set(named) <= fields, f"{spec.name}: actions[{code!r}] names {sorted(set(named) - fields)}, which {spec.config} lacks"
            checked += 1
    assert checked >= 1  # at least one installed plugin declares actions (grpo, rloo, dpo, ... in this repository)


_ONLINE_SIGNALS = {"reward": "reward", "group_reward_zero_std": "frac_reward_zero_std", "entropy": "entropy", "completion_length": "len",
                   "truncation": "clipped", "clip_fraction": "clip", "kl": "kl"}


def _troubled_rows(n=10):
    """Rows that fire reward_std_collapse, entropy_collapse, length_drift, completions_truncated and high_clip_ratio at the last step."""
    return [{"step": i, "loss": 0.1, "reward": 0.5 + 0.01 * (-1) ** i, "frac_reward_zero_std": 1.0, "entropy": 2.0 if i == 1 else 0.01,
             "len": 10 + 2 * i, "clipped": 0.9, "clip": 0.5, "kl": 0.01} for i in range(1, n + 1)]


def test_a_method_without_grpo_settings_gets_neutral_advice_naming_only_core_fields():
    from posttrain.diagnostics import action_fields, check_history

    events = check_history(_troubled_rows(), signals=_ONLINE_SIGNALS, window=10, method="sft")
    fired = {e.code for e in events}
    assert {"reward_std_collapse", "entropy_collapse", "length_drift", "completions_truncated", "high_clip_ratio"} <= fired, fired
    core, method_only = _core_fields(), _method_only_fields()
    for event in events:
        assert set(action_fields(event.action)) <= core, (event.code, event.action)
        assert not set(re.findall(r"[A-Za-z_]\w*", event.action)) & method_only, (event.code, event.action)
    by_code = {e.code: e for e in events}
    assert "(`posttrain info sft` lists this method's settings)" in by_code["reward_std_collapse"].action
    unnamed = {e.code: e.action for e in check_history(_troubled_rows(), signals=_ONLINE_SIGNALS, window=10)}
    assert "`posttrain info <method>`" in unnamed["length_drift"]  # no method name known: the placeholder stays


def test_grpo_declared_actions_replace_the_core_advice():
    from posttrain import Registry
    from posttrain.diagnostics import check_history

    spec = Registry().get_info("grpo").spec
    events = check_history(_troubled_rows(), signals=_ONLINE_SIGNALS, window=10, actions=spec.actions, method="grpo")
    by_code = {e.code: e for e in events}
    for code in ("reward_std_collapse", "entropy_collapse", "length_drift", "completions_truncated", "high_clip_ratio"):
        assert by_code[code].action == spec.actions[code], code
    assert "`num_generations`" in by_code["reward_std_collapse"].action and "`loss_type='dr_grpo'`" in by_code["length_drift"].action
    # a code the method does not declare keeps the core's text
    (nan,) = check_history([{"step": 1, "loss": math.nan}], actions=spec.actions, method="grpo")
    assert "non_finite_loss" not in spec.actions and nan.action.startswith("lower `learning_rate`")


def test_diagnostics_plugin_reports_the_methods_action(tmp_path):
    from posttrain.diagnostics import Diagnostics

    stream = io.StringIO()
    diag = Diagnostics(str(tmp_path), stream=stream, signals={"group_reward_zero_std": "frac_reward_zero_std"},
                       actions={"reward_std_collapse": "raise `group_size`."}, method="mine")
    diag.on_log(step=1, metrics={"loss": 1.0, "frac_reward_zero_std": 1.0})
    (line,) = [json.loads(line) for line in open(tmp_path / "diagnostics.jsonl")]
    assert line["action"] == "raise `group_size`." and "Try: raise `group_size`." in stream.getvalue()


def test_training_run_uses_and_records_the_specs_actions(register_method, tiny_model, tiny_tokenizer, tmp_path):
    import dataclasses

    declared = {"zero_learning_rate": "set `learning_rate` > 0 (the toy method's advice)."}
    register_method(dataclasses.replace(TOY_SPEC, plugin_api="1.5", actions=declared))
    args = ToyConfig(output_dir=str(tmp_path), max_steps=3, learning_rate=0.0, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4)
    trainer = ToyLMTrainer(model=tiny_model, args=args, train_dataset=toy_sequences(8, vocab=len(tiny_tokenizer)), processing_class=tiny_tokenizer)
    trainer.train()
    event = next(e for e in trainer.loop.diagnostics.events if e.code == "zero_learning_rate")
    assert event.action == declared["zero_learning_rate"]
    manifest = json.load(open(tmp_path / "run_manifest.json"))
    assert manifest["actions"] == declared and manifest["method"] == "toy_lm"


def _write_run(out, rows, manifest):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(out, "run_manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return str(out)


def test_diagnose_uses_the_actions_the_manifest_records(tmp_path):
    from posttrain.diagnostics import DEFAULT_ACTIONS, diagnose

    recorded = {"length_drift": "shorten `max_new_tokens` (this run's method's own advice)."}
    manifest = {"method": "not_installed_method", "signals": _ONLINE_SIGNALS, "actions": recorded, "config": {"diagnostics_window": 10}, "max_steps": 10}
    report = diagnose(_write_run(tmp_path / "run", _troubled_rows(), manifest))
    events = {e["code"]: e for e in report["events"]}
    assert events["length_drift"]["action"] == recorded["length_drift"]
    # codes the manifest does not declare get the core's text, with the method's name in the hint
    assert events["reward_std_collapse"]["action"] == DEFAULT_ACTIONS["reward_std_collapse"].replace("<method>", "not_installed_method")


def test_diagnose_falls_back_to_the_installed_specs_actions_for_older_manifests(tmp_path):
    from posttrain import Registry
    from posttrain.diagnostics import diagnose

    spec = Registry().get_info("grpo").spec
    manifest = {"method": "grpo", "signals": _ONLINE_SIGNALS, "config": {"diagnostics_window": 10}, "max_steps": 10}  # no "actions" (posttrain < 1.5)
    events = {e["code"]: e for e in diagnose(_write_run(tmp_path / "old", _troubled_rows(), manifest))["events"]}
    assert events["length_drift"]["action"] == spec.actions["length_drift"]


def test_importing_config_imports_neither_diagnostics_nor_the_registry():
    """The former import circle _registry -> config -> diagnostics -> _registry: config takes the codes from a leaf module."""
    code = ("import sys, posttrain.config as c; c.TrainingConfig(diagnostics_thresholds={'memory_headroom': 0.3}); "
            "import posttrain._spec; "
            "print(sorted(m for m in sys.modules if m in ('posttrain.diagnostics', 'posttrain._registry', 'posttrain.hookspecs', 'torch')))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_diagnostic_codes_module_imports_no_posttrain_module():
    import ast

    import posttrain._diagnostic_codes as leaf
    import posttrain.diagnostics as diagnostics

    tree = ast.parse(open(leaf.__file__).read())
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [n])]
    assert not [m for m in imported if m and m.startswith("posttrain")], imported
    assert diagnostics.CODES is leaf.CODES and diagnostics.DEFAULT_THRESHOLDS is leaf.DEFAULT_THRESHOLDS  # same public names, re-exported
