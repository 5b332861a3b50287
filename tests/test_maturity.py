"""Tests of the maturity gate: activation, every opt-in route, POSTTRAIN_STABLE_ONLY, ensure_activated."""

import sys
import warnings

import pytest

from posttrain import MethodSpec
from posttrain._registry import (
    ExperimentalMethodWarning,
    MethodNotAllowedError,
    MethodNotFoundError,
    Registry,
    activate,
    default_registry,
    ensure_activated,
    get_activation,
    temporary_method,
)
from _plugin_fakes import FakeEntryPoint, clean_gate, entry_point_for, make_plugin  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_gate")


@pytest.fixture
def experimental(make_plugin):
    """An experimental plugin visible in the default registry; returns its package name."""
    package = make_plugin("orpo", maturity="experimental")
    __import__(f"{package}._spec")
    with temporary_method(sys.modules[f"{package}._spec"].SPEC, distribution="posttrain-orpo", version="0.3.0"):
        yield package


@pytest.fixture
def stable(make_plugin):
    package = make_plugin("sft")
    __import__(f"{package}._spec")
    with temporary_method(sys.modules[f"{package}._spec"].SPEC, distribution="posttrain-sft", version="1.0.0"):
        yield package


def test_stable_method_activates_with_its_classes_and_allowed_via_stable(stable):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stable methods never warn
        record = activate("sft")
    assert record.allowed_via == "stable"
    assert record.trainer_cls.__name__ == "DemoTrainer" and record.config_cls.__name__ == "DemoConfig"
    assert record.info.distribution == "posttrain-sft" and get_activation("sft") is record
    assert record.to_manifest() == {"method": "sft", "distribution": "posttrain-sft", "version": "1.0.0", "maturity": "stable", "plugin_api": "1.0", "allowed_via": "stable"}


def test_experimental_method_without_opt_in_is_refused_naming_every_opt_in(experimental):
    with pytest.raises(MethodNotAllowedError) as excinfo:
        activate("orpo")
    message = str(excinfo.value)
    assert "'orpo' (posttrain-orpo 0.3.0) is experimental" in message
    for route in ("--allow-experimental orpo", "POSTTRAIN_ALLOW_EXPERIMENTAL=orpo", "allow_experimental=True", "from posttrain.experimental.orpo import ..."):
        assert route in message


def test_experimental_refusal_happens_before_the_trainer_module_is_imported(experimental):
    with pytest.raises(MethodNotAllowedError):
        activate("orpo")
    assert f"{experimental}.trainer" not in sys.modules
    assert f"{experimental}.config" not in sys.modules


def test_allow_experimental_argument_opts_in_and_warns(experimental):
    with pytest.warns(ExperimentalMethodWarning, match=r"'orpo' \(posttrain-orpo 0.3.0\) is experimental \(allowed via python allow_experimental=True\)"):
        record = activate("orpo", allow_experimental=True)
    assert record.allowed_via == "python allow_experimental=True"


def test_cli_opt_in_is_recorded_as_the_cli_flag(experimental):
    with pytest.warns(ExperimentalMethodWarning):
        assert activate("orpo", allow_experimental=True, via="cli").allowed_via == "cli --allow-experimental"


@pytest.mark.parametrize("value", ["orpo", "dpo, orpo", "all"])
def test_env_allow_experimental_naming_the_method_or_all_opts_in(experimental, monkeypatch, value):
    monkeypatch.setenv("POSTTRAIN_ALLOW_EXPERIMENTAL", value)
    with pytest.warns(ExperimentalMethodWarning):
        assert activate("orpo").allowed_via == "env POSTTRAIN_ALLOW_EXPERIMENTAL"


def test_env_allow_experimental_naming_another_method_does_not_opt_in(experimental, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_ALLOW_EXPERIMENTAL", "kto")
    with pytest.raises(MethodNotAllowedError):
        activate("orpo")


@pytest.mark.parametrize("route", ["argument", "env", "cli"])
def test_stable_only_refuses_experimental_methods_even_when_opted_in(experimental, monkeypatch, route):
    monkeypatch.setenv("POSTTRAIN_STABLE_ONLY", "1")
    monkeypatch.setenv("POSTTRAIN_ALLOW_EXPERIMENTAL", "orpo" if route == "env" else "")
    with pytest.raises(MethodNotAllowedError, match="POSTTRAIN_STABLE_ONLY is set"):
        activate("orpo", allow_experimental=route != "env", via="cli" if route == "cli" else "python")


def test_stable_only_still_allows_stable_methods(stable, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_STABLE_ONLY", "1")
    assert activate("sft").allowed_via == "stable"


def test_experimental_warning_is_emitted_once_per_process_per_method(experimental):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        activate("orpo", allow_experimental=True)
        activate("orpo", allow_experimental=True, via="cli")
        ensure_activated("orpo")
    assert len([w for w in caught if issubclass(w.category, ExperimentalMethodWarning)]) == 1


def test_ensure_activated_returns_the_existing_record(stable):
    record = activate("sft")
    assert ensure_activated("sft") is record


def test_constructing_an_experimental_trainer_directly_without_opt_in_is_refused(experimental):
    trainer_module = __import__(f"{experimental}.trainer", fromlist=["DemoTrainer"])
    with pytest.raises(MethodNotAllowedError, match="--allow-experimental orpo"):
        trainer_module.DemoTrainer()
    with pytest.warns(ExperimentalMethodWarning):
        trainer = trainer_module.DemoTrainer(allow_experimental=True)
    assert trainer.activation.allowed_via == "python allow_experimental=True"


@pytest.mark.parametrize(("version", "plugin_api", "status"), [("0.2.0", "1.0", "error"), ("1.0.0", "2.0", "incompatible")])
def test_activating_a_method_that_is_not_loadable_raises_with_its_status(version, plugin_api, status):
    spec = MethodSpec(name="demo", maturity="stable", plugin_api=plugin_api, summary="x", trainer="a:B", config="a:C")
    registry = Registry(entry_points=[FakeEntryPoint("demo", obj=spec, version=version)])
    with pytest.raises(MethodNotAllowedError, match=f"cannot be used: status {status}"):
        registry.activate("demo", allow_experimental=True)


def test_activating_an_unknown_method_raises_method_not_found():
    with pytest.raises(MethodNotFoundError):
        ensure_activated("nope")


def test_activation_with_a_missing_trainer_module_raises_import_error_naming_the_plugin(make_plugin):
    package = make_plugin("ghost", trainer_module="missing")
    registry = Registry(entry_points=[entry_point_for(package, "ghost", dist="posttrain-ghost")])
    with pytest.raises(ImportError, match=rf"'ghost' \(posttrain-ghost 1.0.0\): cannot import its trainer '{package}.missing:DemoTrainer'"):
        registry.activate("ghost")


def test_unknown_via_is_a_programming_error(stable):
    with pytest.raises(ValueError, match="via='web' is invalid"):
        activate("sft", via="web")


def test_temporary_method_is_visible_only_inside_its_block(make_plugin):
    spec = MethodSpec(name="temp", maturity="stable", plugin_api="1.0", summary="x", trainer="a:B", config="a:C")
    with temporary_method(spec) as info:
        assert info.distribution == "test-dist" and default_registry().get_info("temp").status == "ok"
    with pytest.raises(MethodNotFoundError):
        default_registry().get_info("temp")


def test_default_registry_is_built_once_per_process():
    assert default_registry() is default_registry()
