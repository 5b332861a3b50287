"""Fakes shared by the registry, maturity, namespace and CLI tests (no installed plugins needed).

``make_plugin`` writes a small method plugin package (light ``_spec`` and ``config``, a trainer
module that records its import) to ``tmp_path`` and puts it on ``sys.path``; ``FakeEntryPoint``
has the shape of :class:`importlib.metadata.EntryPoint` that :class:`posttrain.Registry` reads.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest

from posttrain import _registry

GATE_VARS = ("POSTTRAIN_ALLOW_EXPERIMENTAL", "POSTTRAIN_STABLE_ONLY", "POSTTRAIN_DISABLE_PLUGINS")


class FakeDist:
    """The ``ep.dist`` part of an entry point."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version


class FakeEntryPoint:
    """An object shaped like importlib.metadata.EntryPoint; ``load`` imports ``value`` or returns/raises what it is given."""

    group = "posttrain.methods"

    def __init__(self, name, value="", *, dist="posttrain-demo", version="1.0.0", obj=None, exc=None, group=None):
        self.name, self.value, self.dist = name, value, FakeDist(dist, version)
        self._obj, self._exc = obj, exc
        self.loaded = False
        if group is not None:
            self.group = group

    def load(self):
        self.loaded = True
        if self._exc is not None:
            raise self._exc
        if self._obj is not None:
            return self._obj
        module, _, attr = self.value.partition(":")
        return getattr(importlib.import_module(module), attr)


@pytest.fixture
def clean_gate(monkeypatch):
    """Unset the gate's environment variables and give the process an empty default registry."""
    for var in GATE_VARS:
        monkeypatch.delenv(var, raising=False)
    _registry._reset_default_registry()
    _registry._DEFAULT_REGISTRY = _registry.Registry(entry_points=[])
    before = set(sys.modules)
    yield
    _registry._reset_default_registry()
    for name in set(sys.modules) - before:
        if name.startswith(("posttrain.methods.", "posttrain.experimental.", "fakeplug_")):
            del sys.modules[name]
            parent, _, child = name.rpartition(".")
            if parent in ("posttrain.methods", "posttrain.experimental"):
                vars(sys.modules[parent]).pop(child, None)


@pytest.fixture
def make_plugin(tmp_path, monkeypatch):
    """Return ``make(name, maturity=..., plugin_api=..., spec_extra=..., requires=...) -> package name``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(name="demo", *, maturity="stable", plugin_api="1.0", spec_prelude="", config_base="TrainingConfig", requires=(), trainer_module="trainer", presets=None):
        package = f"fakeplug_{name}_{uuid.uuid4().hex[:8]}"
        root = tmp_path / package
        root.mkdir()
        (root / "__init__.py").write_text("")
        presets = presets if presets is not None else {"fast": {"summary": "Few steps.", "overrides": {"learning_rate": 0.1, "max_steps": 5}, "paper": "arXiv:0000.0001"}}
        preset_src = ", ".join(f"{k!r}: Preset(**{v!r})" for k, v in presets.items())
        (root / "_spec.py").write_text(textwrap.dedent(f"""\
            {spec_prelude}
            from posttrain import MethodSpec, Preset
            SPEC = MethodSpec(
                name={name!r}, maturity={maturity!r}, plugin_api={plugin_api!r},
                summary="Demo method {name}.", family="demo",
                trainer="{package}.{trainer_module}:DemoTrainer", config="{package}.config:DemoConfig",
                papers=("Doe et al. 2024, A Demo Paper",), presets={{{preset_src}}}, requires={tuple(requires)!r},
            )
            """))
        (root / "config.py").write_text(textwrap.dedent(f"""\
            from __future__ import annotations
            from dataclasses import dataclass, field
            from posttrain import TrainingConfig

            class NotAConfig:
                pass

            @dataclass(kw_only=True)
            class DemoConfig({config_base}):
                \"\"\"Demo config.\"\"\"
                beta: float = field(default=0.1, metadata={{"help": "KL weight."}})
                loss_type: str = field(default="sigmoid", metadata={{"help": "Loss variant."}})
                tags: list[str] = field(default_factory=list, metadata={{"help": "Free-form tags."}})
                num_generations: int | None = field(default=None, metadata={{"help": "Samples per prompt."}})
                extra: dict | None = field(default=None, metadata={{"help": "Extra options."}})
            """))
        (root / "trainer.py").write_text(textwrap.dedent(f"""\
            from posttrain._registry import ensure_activated
            __all__ = ["DemoTrainer", "demo_helper"]
            CALLS = []

            def demo_helper():
                return "helper"

            class DemoTrainer:
                def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, allow_experimental=False):
                    self.activation = ensure_activated({name!r}, allow_experimental=allow_experimental or bool(getattr(args, "allow_experimental", False)))
                    self.model, self.args, self.train_dataset, self.eval_dataset = model, args, train_dataset, eval_dataset
                    CALLS.append(self)

                def train(self):
                    self.trained = True
            """))
        return package

    return make


def entry_point_for(package: str, name: str, **kw) -> FakeEntryPoint:
    """Return a fake entry point ``name = "<package>._spec:SPEC"``."""
    return FakeEntryPoint(name, f"{package}._spec:SPEC", **kw)
