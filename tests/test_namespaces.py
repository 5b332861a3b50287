"""Tests of the import namespaces posttrain.methods.<name> (stable) and posttrain.experimental.<name>."""

import importlib
import sys

import pytest

import posttrain.experimental
import posttrain.methods
from posttrain._registry import ExperimentalMethodWarning, MethodNotAllowedError, WrongNamespaceError, get_activation, temporary_method
from _plugin_fakes import clean_gate, make_plugin  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_gate")


@pytest.fixture
def methods(make_plugin):
    """Register a stable 'demo_stable' and an experimental 'demo_exp' in the default registry."""
    packages = {}
    with temporary_method(_spec_of(make_plugin("demo_stable")), version="1.0.0"), temporary_method(_spec_of(packages.setdefault("demo_exp", make_plugin("demo_exp", maturity="experimental"))), version="0.2.0"):
        yield packages


def _spec_of(package):
    return importlib.import_module(f"{package}._spec").SPEC


def test_stable_method_imports_from_posttrain_methods_with_trainer_config_and_all_names(methods):
    from posttrain.methods.demo_stable import DemoConfig, DemoTrainer, demo_helper

    module = sys.modules["posttrain.methods.demo_stable"]
    assert sorted(module.__all__) == ["DemoConfig", "DemoTrainer", "demo_helper"]
    assert DemoConfig().beta == 0.1 and demo_helper() == "helper"
    assert DemoTrainer().activation.allowed_via == "stable"


def test_stable_method_is_reachable_as_an_attribute_of_the_namespace(methods):
    assert posttrain.methods.demo_stable.DemoTrainer.__name__ == "DemoTrainer"


def test_experimental_method_imported_from_posttrain_methods_names_the_experimental_path(methods):
    with pytest.raises(ImportError) as excinfo:
        from posttrain.methods.demo_exp import DemoTrainer  # noqa: F401
    assert isinstance(excinfo.value, WrongNamespaceError) and isinstance(excinfo.value, MethodNotAllowedError)
    assert "`from posttrain.experimental.demo_exp import ...`" in str(excinfo.value)
    assert get_activation("demo_exp") is None  # nothing was activated or imported


def test_stable_method_imported_from_posttrain_experimental_names_the_methods_path(methods):
    with pytest.raises(ImportError, match=r"`from posttrain.methods.demo_stable import ...`"):
        from posttrain.experimental.demo_stable import DemoTrainer  # noqa: F401


def test_importing_through_posttrain_experimental_is_the_opt_in_and_warns_once(methods):
    with pytest.warns(ExperimentalMethodWarning, match="allowed via import posttrain.experimental"):
        from posttrain.experimental.demo_exp import DemoTrainer
    trainer = DemoTrainer()  # the gate sees the recorded activation
    assert trainer.activation.allowed_via == "import posttrain.experimental"


def test_stable_only_refuses_imports_through_posttrain_experimental(methods, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_STABLE_ONLY", "1")
    with pytest.raises(MethodNotAllowedError, match="POSTTRAIN_STABLE_ONLY"):
        from posttrain.experimental.demo_exp import DemoTrainer  # noqa: F401
    assert "posttrain.experimental.demo_exp" not in sys.modules


def test_importing_the_trainer_module_directly_does_not_bypass_the_gate(methods):
    trainer_module = importlib.import_module(f"{methods['demo_exp']}.trainer")
    with pytest.raises(MethodNotAllowedError, match="is experimental"):
        trainer_module.DemoTrainer()


def test_unknown_method_import_is_module_not_found_with_a_suggestion(methods):
    with pytest.raises(ModuleNotFoundError, match="Did you mean 'demo_stable'"):
        importlib.import_module("posttrain.methods.demo_stabel")
    assert not hasattr(posttrain.methods, "demo_stabel")
