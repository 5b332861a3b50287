"""Conformance: every installed method plugin honours the plugin contract (DESIGN.md §2-4).

These tests run over whatever is installed, so a new plugin is checked the moment it is
installed in the test environment.
"""

import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest

from posttrain import TrainingConfig
from posttrain._registry import Registry
from posttrain._spec import Preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "transformers", "datasets", "accelerate", "peft", "deepspeed", "vllm")
TRL_SHAPED = ("model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks", "peft_config")


def installed_methods():
    return [info for info in Registry().list_methods() if info.distribution.startswith("posttrain-")]


METHODS = installed_methods()
IDS = [m.name for m in METHODS]


def test_every_installed_method_loads_with_status_ok_or_experimental():
    bad = {m.name: (m.status, m.error) for m in METHODS if m.status not in ("ok", "experimental")}
    assert not bad, bad


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_spec_module_imports_no_heavy_library(info):
    module = info.spec.trainer.split(":")[0].rsplit(".", 1)[0] + "._spec"
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} imports {out}"


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_config_module_is_light_and_documents_every_field(info):
    module, cls_name = info.spec.config.split(":")
    code = f"import sys, {module}; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"{module} imports {out}"
    import importlib

    config_cls = getattr(importlib.import_module(module), cls_name)
    assert issubclass(config_cls, TrainingConfig)
    undocumented = [f.name for f in dataclasses.fields(config_cls) if not f.metadata.get("help")]
    assert not undocumented, f"{cls_name} fields without help text: {undocumented}"
    config_cls(output_dir="unused")  # defaults are valid


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_presets_override_only_existing_fields_and_build_valid_configs(info):
    import importlib

    module, cls_name = info.spec.config.split(":")
    config_cls = getattr(importlib.import_module(module), cls_name)
    names = {f.name for f in dataclasses.fields(config_cls)}
    for preset_name, preset in info.spec.presets.items():
        assert isinstance(preset, Preset)
        unknown = set(preset.overrides) - names
        assert not unknown, f"preset {preset_name!r} overrides unknown fields {unknown}"
        config_cls(output_dir="unused", **preset.overrides)
        if info.maturity == "stable":
            assert preset.summary, f"preset {preset_name!r} has no summary"


@pytest.mark.parametrize("info", METHODS, ids=IDS)
def test_trainer_signature_is_trl_shaped(info):
    import importlib

    module, cls_name = info.spec.trainer.split(":")
    trainer_cls = getattr(importlib.import_module(module), cls_name)
    params = inspect.signature(trainer_cls.__init__).parameters
    missing = [p for p in TRL_SHAPED if p not in params]
    assert not missing, f"{cls_name}.__init__ lacks {missing}"
    from posttrain import TrainerSurface

    # TRL's trainer surface, from the core (plugin API 1.1): nothing re-implemented per plugin
    assert issubclass(trainer_cls, TrainerSurface), f"{cls_name} does not mix in posttrain.TrainerSurface"
    for member in ("train", "evaluate", "save_model", "push_to_hub", "add_callback", "state"):
        assert getattr(trainer_cls, member) is getattr(TrainerSurface, member), f"{cls_name}.{member} overrides TrainerSurface's"
    for member in ("collate", "count_items", "compute_loss", "process_dataset"):
        assert callable(getattr(trainer_cls, member, None)), f"{cls_name} lacks the method member {member}"


def test_plugins_declare_the_core_requirement_they_build_on():
    import tomllib

    for folder in sorted(os.listdir(os.path.join(ROOT, "plugins"))):
        with open(os.path.join(ROOT, "plugins", folder, "pyproject.toml"), "rb") as fh:
            deps = tomllib.load(fh)["project"]["dependencies"]
        assert any(d.replace(" ", "").startswith("posttrain>=1.1,<2") for d in deps), f"plugins/{folder} must require posttrain>=1.1,<2 (it uses plugin API 1.1)"


@pytest.mark.parametrize("info", [m for m in METHODS if m.maturity == "stable"], ids=[m.name for m in METHODS if m.maturity == "stable"])
def test_stable_methods_ship_docs_an_example_and_papers(info):
    assert os.path.isfile(os.path.join(ROOT, "docs", "methods", f"{info.name}.md")), f"docs/methods/{info.name}.md missing"
    assert os.path.isfile(os.path.join(ROOT, "examples", f"{info.name}.yaml")), f"examples/{info.name}.yaml missing"
    assert info.spec.papers or info.name == "sft", "a stable method cites its papers"
    major = int(info.version.split(".")[0])
    assert major >= 1


def test_posttrain_list_json_shows_every_installed_plugin():
    out = subprocess.run([sys.executable, "-m", "posttrain", "list", "--format", "json"], capture_output=True, text=True, check=True).stdout
    listed = {m["name"] for m in json.loads(out)["methods"]}
    assert set(IDS) <= listed


def test_methods_index_is_generated_from_the_registry():
    """docs/methods.md is produced by `python docs/gen_methods.py`; rerun it after changing a spec."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import gen_methods
    finally:
        sys.path.pop(0)
    expected = gen_methods.render(installed_methods())
    with open(os.path.join(ROOT, "docs", "methods.md")) as fh:
        assert fh.read() == expected, "docs/methods.md is stale: run `.venv/bin/python docs/gen_methods.py`"
