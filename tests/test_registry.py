"""Tests of method discovery, spec loading and statuses (posttrain._registry, tiers 1 and 2)."""

import sys
import warnings

import pytest

import posttrain
from posttrain import MethodSpec
from posttrain._registry import MethodNotFoundError, Registry
from _plugin_fakes import FakeEntryPoint, clean_gate, entry_point_for, make_plugin  # noqa: F401

pytestmark = pytest.mark.usefixtures("clean_gate")


def spec(name="demo", maturity="stable", plugin_api="1.0", **kw):
    return MethodSpec(name=name, maturity=maturity, plugin_api=plugin_api, summary=f"Demo {name}.", trainer="x.trainer:T", config="x.config:C", **kw)


def test_list_methods_is_sorted_by_name_and_reads_spec_fields(make_plugin):
    eps = [entry_point_for(make_plugin("zeta"), "zeta"), entry_point_for(make_plugin("alpha", maturity="experimental", plugin_api="1.0"), "alpha", version="0.2.0")]
    infos = Registry(entry_points=eps).list_methods()
    assert [i.name for i in infos] == ["alpha", "zeta"]
    alpha, zeta = infos
    assert (alpha.status, alpha.maturity, alpha.version, alpha.error) == ("experimental", "experimental", "0.2.0", None)
    assert (zeta.status, zeta.distribution, zeta.plugin_api, zeta.family, zeta.presets) == ("ok", "posttrain-demo", "1.0", "demo", ("fast",))
    assert zeta.summary == "Demo method zeta." and zeta.spec.name == "zeta"


def test_entry_point_import_error_is_status_error_and_others_still_load(make_plugin):
    broken = FakeEntryPoint("broken", "nowhere._spec:SPEC", exc=ModuleNotFoundError("No module named 'nowhere'\n(second line)"))
    good = entry_point_for(make_plugin("good"), "good")
    infos = {i.name: i for i in Registry(entry_points=[broken, good]).list_methods()}
    assert infos["good"].status == "ok"
    assert infos["broken"].status == "error" and infos["broken"].spec is None
    assert infos["broken"].error == "loading spec 'nowhere._spec:SPEC' failed: ModuleNotFoundError: No module named 'nowhere' (second line)"


def test_entry_point_object_that_is_not_a_methodspec_is_status_error():
    info = Registry(entry_points=[FakeEntryPoint("odd", obj={"name": "odd"})]).get_info("odd")
    assert info.status == "error"
    assert "points to a dict, not a posttrain.MethodSpec" in info.error


def test_entry_point_name_different_from_spec_name_is_status_error():
    info = Registry(entry_points=[FakeEntryPoint("dpo", obj=spec("dpo_v2"))]).get_info("dpo")
    assert info.status == "error"
    assert "entry point name 'dpo' differs from MethodSpec.name 'dpo_v2'" in info.error


def test_invalid_spec_is_status_error_naming_the_field(make_plugin):
    package = make_plugin("bad", maturity="beta")
    info = Registry(entry_points=[entry_point_for(package, "bad")]).get_info("bad")
    assert info.status == "error"
    assert "SpecError" in info.error and ".maturity='beta' is invalid" in info.error


@pytest.mark.parametrize(
    ("plugin_api", "fix"),
    [("2.0", "upgrade posttrain to a release with plugin API 2.x"), ("0.9", "install a posttrain-demo release built for API 1.x"), ("1.10", "upgrade posttrain (pip install -U posttrain)")],
)
def test_plugin_api_of_other_major_or_newer_minor_is_incompatible_naming_versions_and_fix(plugin_api, fix):
    info = Registry(entry_points=[FakeEntryPoint("demo", obj=spec(plugin_api=plugin_api))]).get_info("demo")
    assert info.status == "incompatible"
    assert f"built for plugin API {plugin_api}" in info.error and f"(plugin API {posttrain.API_VERSION})" in info.error
    assert fix in info.error
    assert info.spec is not None  # still inspectable by `posttrain info`


def test_plugin_api_of_older_minor_is_ok(monkeypatch):
    monkeypatch.setattr(posttrain, "API_VERSION", "1.3")
    assert Registry(entry_points=[FakeEntryPoint("demo", obj=spec(plugin_api="1.1"))]).get_info("demo").status == "ok"


def test_two_distributions_registering_one_name_is_a_conflict_naming_both():
    eps = [FakeEntryPoint("dpo", obj=spec("dpo"), dist="posttrain-dpo", version="1.2.0"), FakeEntryPoint("dpo", obj=spec("dpo"), dist="acme-dpo", version="0.3.0")]
    info = Registry(entry_points=eps).get_info("dpo")
    assert info.status == "conflict" and info.spec is None and not info.is_loadable
    assert "posttrain-dpo 1.2.0 and acme-dpo 0.3.0" in info.error
    assert "POSTTRAIN_DISABLE_PLUGINS=acme-dpo" in info.error


def test_one_distribution_seen_twice_is_not_a_conflict():
    eps = [FakeEntryPoint("dpo", obj=spec("dpo")), FakeEntryPoint("dpo", obj=spec("dpo"))]
    assert Registry(entry_points=eps).get_info("dpo").status == "ok"


def test_stable_spec_in_distribution_below_1_0_is_status_error():
    info = Registry(entry_points=[FakeEntryPoint("demo", obj=spec(), version="0.4.1")]).get_info("demo")
    assert info.status == "error"
    assert "maturity 'stable' needs a distribution version >= 1.0, but posttrain-demo is 0.4.1" in info.error
    assert "maturity='experimental'" in info.error


def test_spec_module_importing_a_heavy_module_warns_naming_the_plugin(make_plugin, monkeypatch):
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    package = make_plugin("heavy", spec_prelude="import sys, types; sys.modules.setdefault('vllm', types.ModuleType('vllm'))")
    try:
        with pytest.warns(UserWarning, match=r"plugin 'heavy' \(distribution posttrain-demo\) imported vllm"):
            info = Registry(entry_points=[entry_point_for(package, "heavy")]).get_info("heavy")
    finally:
        sys.modules.pop("vllm", None)
    assert info.status == "ok"  # slow, not broken


def test_light_spec_module_does_not_warn(make_plugin):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Registry(entry_points=[entry_point_for(make_plugin("light"), "light")]).list_methods()


def test_disable_plugins_env_skips_entry_points_before_import(monkeypatch):
    skipped_by_name = FakeEntryPoint("grpo", exc=AssertionError("must not be imported"))
    skipped_by_dist = FakeEntryPoint("orpo", exc=AssertionError("must not be imported"), dist="acme-orpo")
    kept = FakeEntryPoint("demo", obj=spec())
    monkeypatch.setenv("POSTTRAIN_DISABLE_PLUGINS", "grpo, acme-orpo")
    infos = Registry(entry_points=[skipped_by_name, skipped_by_dist, kept]).list_methods()
    assert [i.name for i in infos] == ["demo"]
    assert not skipped_by_name.loaded and not skipped_by_dist.loaded


def test_registry_reads_installed_entry_points_of_the_methods_group(monkeypatch):
    import importlib.metadata

    calls = []

    def fake_entry_points(*, group):
        calls.append(group)
        return [FakeEntryPoint("demo", obj=spec())]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    assert [i.name for i in Registry().list_methods()] == ["demo"]
    assert calls == ["posttrain.methods"]


def test_entry_points_of_another_group_are_ignored():
    other = FakeEntryPoint("demo", obj=spec(), group="posttrain.plugins")
    assert Registry(entry_points=[other]).list_methods() == []


def test_get_info_of_unknown_name_suggests_close_names_and_a_package():
    registry = Registry(entry_points=[FakeEntryPoint("dpo", obj=spec("dpo"))])
    with pytest.raises(MethodNotFoundError) as excinfo:
        registry.get_info("dpp")
    message = str(excinfo.value)
    assert "No posttrain method named 'dpp'. Did you mean 'dpo'?" in message
    assert "pip install posttrain-dpp?" in message


def test_get_info_reads_hyphens_as_underscores():
    registry = Registry(entry_points=[FakeEntryPoint("sft_dropout", obj=spec("sft_dropout"))])
    assert registry.get_info("sft-dropout").name == "sft_dropout"


def test_add_spec_registers_directly_and_remove_spec_undoes_it():
    registry = Registry(entry_points=[])
    info = registry.add_spec(spec("demo", maturity="experimental"), distribution="lab-demo", version="0.1.0")
    assert (info.status, info.distribution, info.version) == ("experimental", "lab-demo", "0.1.0")
    registry.remove_spec("demo", distribution="lab-demo")
    assert registry.list_methods() == []


def test_add_spec_rejects_objects_that_are_not_specs():
    with pytest.raises(TypeError, match="needs a posttrain.MethodSpec, got dict"):
        Registry(entry_points=[]).add_spec({"name": "demo"})


def test_method_info_to_dict_has_the_json_schema_keys():
    info = Registry(entry_points=[FakeEntryPoint("demo", obj=spec(presets={"fast": {"max_steps": 1}}))]).get_info("demo")
    assert list(info.to_dict()) == ["name", "distribution", "version", "maturity", "plugin_api", "status", "summary", "error"]
    assert info.to_dict(presets=True)["presets"] == ["fast"]


def test_registry_names_are_exported_lazily_from_posttrain():
    assert posttrain.Registry is Registry
    assert posttrain.MethodNotFoundError is MethodNotFoundError
