"""The conformance checks every method plugin must pass (collected by ``pytest -p posttrain.conformance``).

Each test takes the ``method_info`` fixture, parametrized over the selected methods: the
``--posttrain-method`` options, or a module-level ``POSTTRAIN_METHODS`` list in a test module that
star-imports this one. ``POSTTRAIN_METHODS = "posttrain-*"`` selects every installed method whose
distribution name starts with ``posttrain-``; ``"all"`` every installed method.

The training checks build the trainer exactly as a user would: ``TrainerCls(model=<saved tiny model
dir>, args=ConfigCls(output_dir=..., **small defaults, **spec.tiny_run), train_dataset=<tiny dataset
of spec.data_format>)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import subprocess
import sys
from fnmatch import fnmatch
from typing import Any

import pytest

from posttrain.conformance.tiny import SMALL_RUN, build_tiny_trainer, logged_metric_names, method_classes

__all__ = [
    "pytest_generate_tests",
    "method_info",
    "HEAVY_MODULES",
    "TRL_SIGNATURE",
    "conformance_model_dir",
    "tiny_run",
    "test_method_loads",
    "test_spec_module_is_light",
    "test_config_module_is_light_and_documents_every_field",
    "test_presets_build_valid_configs",
    "test_trainer_has_trl_signature_and_surface",
    "test_distribution_requires_a_compatible_core",
    "test_maturity_gate",
    "test_trainer_satisfies_method_protocol",
    "test_trains_a_few_steps_on_a_tiny_model",
    "test_resume_is_bit_exact",
    "test_save_model_loads_with_from_pretrained",
    "test_public_surface_matches_api_snapshot",
]

#: Libraries a spec or config module must not import (``posttrain list`` loads every spec).
HEAVY_MODULES = ("torch", "transformers", "datasets", "accelerate", "peft", "deepspeed", "vllm")
#: TRL's trainer ``__init__`` parameters every trainer accepts.
TRL_SIGNATURE = ("model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks", "peft_config")
# -- selection ------------------------------------------------------------------------------------


def _selected(config: Any, module: Any) -> list[str]:
    from posttrain._registry import Registry

    chosen = getattr(module, "POSTTRAIN_METHODS", None)
    if chosen is None:
        chosen = config.getoption("posttrain_method", None)
    if not chosen:
        raise pytest.UsageError("posttrain conformance: name the methods to check: --posttrain-method NAME (or 'all').")
    if isinstance(chosen, str):
        chosen = [chosen]
    infos = Registry().list_methods()
    names: list[str] = []
    for pattern in chosen:
        if pattern == "all":
            names += [i.name for i in infos]
        elif any(ch in pattern for ch in "*?["):
            names += [i.name for i in infos if fnmatch(i.distribution, pattern) or fnmatch(i.name, pattern)]
        else:
            names.append(pattern)
    return list(dict.fromkeys(names))


def pytest_generate_tests(metafunc: Any) -> None:
    if "method_info" in metafunc.fixturenames:
        names = _selected(metafunc.config, metafunc.module)
        metafunc.parametrize("method_info", names, ids=names, indirect=True, scope="module")


@pytest.fixture(scope="module")
def method_info(request: Any) -> Any:
    """The selected method's ``posttrain.MethodInfo`` (fails clearly when it is not installed)."""
    from posttrain._registry import Registry

    name = request.param
    registry = Registry()
    try:
        return registry.get_info(name)
    except Exception:
        installed = ", ".join(sorted(i.name for i in registry.list_methods())) or "none"
        pytest.fail(f"posttrain method {name!r} is not installed (installed: {installed}); pip install its plugin first.")


def _light(module: str) -> list[str]:
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"`import {module}` fails: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return [m for m in out.stdout.strip().split(",") if m]


# -- the contract ------------------------------------------------------------------------------


def test_method_loads(method_info: Any) -> None:
    """The registry loads the spec with status ok (stable) or experimental."""
    assert method_info.status in ("ok", "experimental"), f"{method_info.name}: status {method_info.status}: {method_info.error}"
    if method_info.maturity == "stable":
        major = int(method_info.version.split(".")[0])
        assert major >= 1, f"a stable method needs a distribution version >= 1.0, not {method_info.version}"


def test_spec_module_is_light(method_info: Any) -> None:
    from importlib.metadata import distribution

    eps = [ep for ep in distribution(method_info.distribution).entry_points if ep.group == "posttrain.methods" and ep.name == method_info.name]
    assert eps, f"{method_info.distribution} has no posttrain.methods entry point named {method_info.name!r}"
    module = eps[0].value.split(":")[0]
    heavy = _light(module)
    assert not heavy, f"the spec module {module} imports {heavy}: move those imports into the trainer module"


def test_config_module_is_light_and_documents_every_field(method_info: Any) -> None:
    from posttrain import TrainingConfig

    module = method_info.spec.config.split(":")[0]
    heavy = _light(module)
    assert not heavy, f"the config module {module} imports {heavy}: configs must stay light (posttrain info imports them)"
    config_cls, _ = method_classes(method_info)
    assert dataclasses.is_dataclass(config_cls) and issubclass(config_cls, TrainingConfig)
    undocumented = [f.name for f in dataclasses.fields(config_cls) if not f.metadata.get("help")]
    assert not undocumented, f"{config_cls.__name__} fields without help text (field(metadata={{'help': ...}})): {undocumented}"
    config_cls(output_dir="unused")  # the defaults are valid


def test_presets_build_valid_configs(method_info: Any) -> None:
    from posttrain import Preset

    config_cls, _ = method_classes(method_info)
    names = {f.name for f in dataclasses.fields(config_cls)}
    for preset_name, preset in method_info.spec.presets.items():
        assert isinstance(preset, Preset)
        unknown = set(preset.overrides) - names
        assert not unknown, f"preset {preset_name!r} overrides unknown fields {sorted(unknown)}"
        config_cls(output_dir="unused", **preset.overrides)
        if method_info.maturity == "stable":
            assert preset.summary, f"preset {preset_name!r} has no summary"
    unknown = set(method_info.spec.tiny_run) - names
    assert not unknown, f"MethodSpec.tiny_run names unknown config fields {sorted(unknown)}"


def test_trainer_has_trl_signature_and_surface(method_info: Any) -> None:
    from posttrain import TrainerSurface

    _, trainer_cls = method_classes(method_info)
    params = inspect.signature(trainer_cls.__init__).parameters
    missing = [p for p in TRL_SIGNATURE if p not in params]
    assert not missing, f"{trainer_cls.__name__}.__init__ lacks TRL's parameters {missing}"
    assert issubclass(trainer_cls, TrainerSurface), f"{trainer_cls.__name__} does not mix in posttrain.TrainerSurface"
    for member in ("train", "evaluate", "save_model", "push_to_hub", "add_callback", "state"):
        assert getattr(trainer_cls, member) is getattr(TrainerSurface, member), f"{trainer_cls.__name__}.{member} overrides TrainerSurface's"


def test_distribution_requires_a_compatible_core(method_info: Any) -> None:
    """pip's metadata agrees with the spec: ``posttrain>=<plugin_api>,<next major>``."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    import posttrain

    reqs = [Requirement(r) for r in requires(method_info.distribution) or []]
    core = [r for r in reqs if r.name == "posttrain" and not r.marker]
    assert core, f"{method_info.distribution} does not depend on posttrain: add 'posttrain>={method_info.plugin_api},<{int(method_info.plugin_api.split('.')[0]) + 1}'"
    spec_set = core[0].specifier
    major, minor = (int(x) for x in method_info.plugin_api.split("."))
    fix = f"declare dependencies = ['posttrain>={major}.{minor},<{major + 1}'] (plugin_api is {method_info.plugin_api})"
    assert spec_set.contains(posttrain.__version__, prereleases=True), f"{method_info.distribution} requires {core[0]}, not the installed posttrain {posttrain.__version__}"
    assert not spec_set.contains(f"{major + 1}.0.0"), f"{method_info.distribution} requires {core[0]}: no upper bound below the next plugin API major; {fix}"
    if minor > 0:
        assert not spec_set.contains(f"{major}.{minor - 1}.99"), f"{method_info.distribution} requires {core[0]}, which allows a core without plugin API {method_info.plugin_api}; {fix}"


def test_maturity_gate(method_info: Any, tmp_path: Any) -> None:
    """Stable methods import without an opt-in; experimental ones are refused without one, in Python and in the CLI."""
    name = method_info.name
    if method_info.maturity == "stable":
        code = f"import warnings; warnings.simplefilter('error'); import posttrain.methods.{name} as m; print(sorted(m.__all__)[:1])"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, f"`import posttrain.methods.{name}` fails or warns: {out.stderr.strip()[-500:]}"
        return
    code = (
        "import posttrain\n"
        f"info = posttrain.Registry().get_info({name!r})\n"
        "mod, cls = info.spec.trainer.split(':')\n"
        "import importlib\n"
        "try:\n"
        "    getattr(importlib.import_module(mod), cls)(model=None, args=None)\n"
        "except posttrain.MethodNotAllowedError as exc:\n"
        "    print('REFUSED', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_ALLOW_EXPERIMENTAL", "POSTTRAIN_STABLE_ONLY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "REFUSED" in out.stdout and f"--allow-experimental {name}" in out.stdout, (
        f"constructing the experimental {name} trainer without an opt-in was not refused by posttrain's gate "
        f"(call posttrain.TrainingLoop(args, method={name!r}, allow_experimental=...) first in __init__): {out.stdout}{out.stderr[-500:]}"
    )
    cli = subprocess.run([sys.executable, "-m", "posttrain", "train", name, "--output_dir", str(tmp_path)], capture_output=True, text=True, env=env)
    assert cli.returncode != 0 and "--allow-experimental" in cli.stderr, f"`posttrain train {name}` ran without an opt-in: {cli.stderr[-500:]}"


# -- a tiny run ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def conformance_model_dir(tmp_path_factory: Any) -> str:
    """A saved tiny causal LM + tokenizer (``posttrain.testing.tiny_model``), loaded by path like a Hub id."""
    from posttrain.testing.tiny_model import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("conformance_model")))


def _weights(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_run(method_info: Any, conformance_model_dir: str, tmp_path_factory: Any) -> dict[str, Any]:
    """Train the method for ``SMALL_RUN['max_steps']`` steps; returns the trainer, output dir, weights before/after and log rows."""
    import torch

    torch.manual_seed(0)
    output_dir = str(tmp_path_factory.mktemp(f"conformance_{method_info.name}"))
    try:
        trainer = build_tiny_trainer(method_info, conformance_model_dir, output_dir)
    except ValueError as exc:
        pytest.fail(str(exc))
    before = _weights(trainer.model)
    result = trainer.train()
    return {"trainer": trainer, "output_dir": output_dir, "before": before, "after": _weights(trainer.model), "result": result}


def test_trainer_satisfies_method_protocol(method_info: Any, tiny_run: dict) -> None:
    from posttrain import MethodProtocol, check_method

    trainer = tiny_run["trainer"]
    check_method(trainer, plugin=method_info.distribution)  # raises MethodContractError naming the member and the fix
    assert isinstance(trainer, MethodProtocol)


def test_trains_a_few_steps_on_a_tiny_model(method_info: Any, tiny_run: dict) -> None:
    trainer = tiny_run["trainer"]
    steps = SMALL_RUN["max_steps"]
    assert trainer.state.global_step == steps, f"trained {trainer.state.global_step} steps, asked for {steps}"
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) >= steps, f"expected a 'loss' in each of {steps} log rows (logging_steps=1), got {trainer.state.log_history}"
    assert all(math.isfinite(x) for x in losses), f"non-finite training loss: {losses}"
    changed = [k for k, v in tiny_run["after"].items() if not (v.shape == tiny_run["before"][k].shape and bool((v == tiny_run["before"][k]).all()))]
    assert changed, "no parameter changed in a few steps at learning_rate=1e-3"
    assert os.path.isfile(os.path.join(tiny_run["output_dir"], "metrics.jsonl")), "the run wrote no metrics.jsonl"


def test_resume_is_bit_exact(method_info: Any, conformance_model_dir: str, tmp_path: Any) -> None:
    """4 steps straight == 2 steps, a checkpoint, a fresh process state, 2 resumed steps (every weight bit-equal)."""
    import torch

    plan = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2}
    torch.manual_seed(0)
    full = build_tiny_trainer(method_info, conformance_model_dir, str(tmp_path / "full"), **plan)
    full.train()
    expected = _weights(full.model)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir(), f"save_steps=2 wrote no {checkpoint.name} (found {sorted(os.listdir(tmp_path / 'full'))})"
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG state
    resumed = build_tiny_trainer(method_info, conformance_model_dir, str(tmp_path / "resumed"), **plan)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    got = _weights(resumed.model)
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"a run resumed from {checkpoint.name} differs from the uninterrupted one in {len(differ)} tensors, e.g. {differ[:3]}"


def test_save_model_loads_with_from_pretrained(method_info: Any, tiny_run: dict, tmp_path: Any) -> None:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    trainer = tiny_run["trainer"]
    target = str(tmp_path / "saved")
    trainer.save_model(target)
    model = trainer.model
    unwrapped = getattr(model, "module", model)
    config = AutoConfig.from_pretrained(target)
    assert config.model_type == unwrapped.config.model_type
    loaded = type(unwrapped).from_pretrained(target)
    live = unwrapped.state_dict()
    missing = [k for k in live if k not in loaded.state_dict()]
    assert not missing, f"save_model output lacks {missing[:3]}"
    differ = [k for k, v in loaded.state_dict().items() if k in live and not torch.equal(v, live[k].to(v.dtype))]
    assert not differ, f"weights loaded from save_model output differ from the trained ones: {differ[:3]}"
    AutoTokenizer.from_pretrained(target)  # the tokenizer is saved alongside


def test_public_surface_matches_api_snapshot(method_info: Any, tiny_run: dict) -> None:
    """Semver by test: a stable plugin's surface equals its committed api_snapshot.json unless the version was bumped."""
    from posttrain.conformance import snapshot

    if method_info.maturity != "stable":
        pytest.skip(f"{method_info.name} is experimental: its surface may change in any release")
    live = snapshot.method_surface(method_info, metrics=logged_metric_names(tiny_run["trainer"]))
    snapshot.check(live, snapshot.snapshot_path(method_info))
