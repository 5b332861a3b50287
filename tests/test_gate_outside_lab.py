"""The maturity gate against an outside lab's layout: no plugin code beyond the spec runs before the opt-in.

An outside lab may well put its config class inside its trainer module
(``config="acme_foo.trainer:FooConfig"``) and give that module an import-time side effect. This
test installs such a distribution for real (a package and a ``.dist-info`` with an entry point,
on ``PYTHONPATH``) and runs the installed ``posttrain`` command in a subprocess, as a user would:
``list``, ``info``, ``doctor``, ``train`` and ``train --help`` without an opt-in must never
import the trainer module (it writes a marker file when imported). The positive controls show
the marker does appear once the user opts in, so the test can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import posttrain

SPEC = '''
from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="acme_foo",
    maturity="experimental",
    plugin_api="{api}",
    summary="Acme's foo method (an outside lab's layout: config inside the trainer module).",
    family="sft",
    trainer="acme_foo.trainer:FooTrainer",
    config="acme_foo.trainer:FooConfig",
    data_format="prompt_completion",
    papers=("Acme et al. 2026, Foo, arXiv:0000.00000",),
    presets={{"paper": Preset(summary="The paper's setting.", overrides={{"foo_scale": 2.0}}, paper="arXiv:0000.00000")}},
)
'''

TRAINER = '''
import os

with open(os.environ["ACME_MARKER"], "a") as fh:  # the import-time side effect the gate must never trigger
    fh.write("acme_foo.trainer imported\\n")

from dataclasses import dataclass, field

from posttrain import TrainingConfig


@dataclass(kw_only=True)
class FooConfig(TrainingConfig):
    foo_scale: float = field(default=1.0, metadata={"help": "How much foo."})


class FooTrainer:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("not reached in this test")
'''


@pytest.fixture
def outside_lab(tmp_path):
    """Install ``acme-foo`` 0.1.0 into a fresh site directory; return (env, marker path, workdir)."""
    site = tmp_path / "site"
    package = site / "acme_foo"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Acme foo (light package init)."""\n')
    (package / "_spec.py").write_text(SPEC.format(api=posttrain.API_VERSION))
    (package / "trainer.py").write_text(TRAINER)
    dist_info = site / "acme_foo-0.1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-foo\nVersion: 0.1.0\nRequires-Dist: posttrain\n")
    (dist_info / "entry_points.txt").write_text("[posttrain.methods]\nacme_foo = acme_foo._spec:SPEC\n")
    marker = tmp_path / "imported.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")}
    env.update(PYTHONPATH=str(site) + os.pathsep + env.get("PYTHONPATH", ""), ACME_MARKER=str(marker), HF_HUB_OFFLINE="1")
    (tmp_path / "foo.yaml").write_text("model_name_or_path: nowhere\ndataset_name: nowhere.jsonl\nmax_steps: 1\n")
    return env, marker, tmp_path


def _posttrain(env, cwd, *args):
    return subprocess.run([sys.executable, "-m", "posttrain", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_no_command_imports_an_experimental_plugin_before_the_opt_in(outside_lab):
    env, marker, cwd = outside_lab
    listing = _posttrain(env, cwd, "list")
    assert listing.returncode == 0, listing.stderr
    assert "acme_foo" in listing.stdout and "experimental" in listing.stdout

    info = _posttrain(env, cwd, "info", "acme_foo")
    assert info.returncode == 0, info.stderr
    assert "Acme et al. 2026" in info.stdout and "paper:" in info.stdout  # the spec's papers and presets are shown
    assert "--allow-experimental acme_foo" in info.stdout and "--foo_scale" not in info.stdout

    doctor = _posttrain(env, cwd, "doctor")
    assert "acme_foo" in doctor.stdout and "not imported before the opt-in" in doctor.stdout, doctor.stdout

    train = _posttrain(env, cwd, "train", "acme_foo", "--config", "foo.yaml")
    assert train.returncode == 2 and "experimental" in train.stderr and "Traceback" not in train.stderr
    assert len(train.stderr.strip().splitlines()) == 1, train.stderr

    helped = _posttrain(env, cwd, "train", "acme_foo", "--help")
    assert helped.returncode == 0 and "--foo_scale" not in helped.stdout

    assert not marker.exists(), f"plugin code ran before the opt-in: {marker.read_text()}"


def test_the_opt_in_imports_it_so_the_test_above_can_fail(outside_lab):
    env, marker, cwd = outside_lab
    info = _posttrain(env, cwd, "info", "acme_foo", "--allow-experimental", "acme_foo")
    assert info.returncode == 0, info.stderr
    assert "--foo_scale (float, default 1.0)" in info.stdout
    assert marker.read_text().count("imported") == 1

    doctor = _posttrain(env, cwd, "doctor", "--allow-experimental", "acme_foo")
    assert "ok    acme_foo" in doctor.stdout, doctor.stdout  # its config (and the preset's field) were checked
    assert marker.read_text().count("imported") == 2


def test_list_is_tier_two_only(outside_lab):
    """``posttrain list`` imports entry points and spec modules only: no torch, no config or trainer module."""
    env, marker, cwd = outside_lab
    code = (
        "import sys; from posttrain.cli import main; main(['list'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'acme_foo.trainer') if m in sys.modules)\n"
        "configs = sorted(m for m in sys.modules if m.startswith('posttrain_') and m.endswith(('.config', '.trainer')))\n"
        "print('HEAVY', heavy, 'CONFIGS', configs)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY [] CONFIGS []" in proc.stdout, proc.stdout
    assert not marker.exists()


def test_info_of_a_broken_experimental_config_is_reported_after_the_opt_in(outside_lab):
    """A config path that does not import is an error the opt-in reveals, in one line, not a traceback."""
    env, marker, cwd = outside_lab
    site = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    (site / "acme_foo" / "trainer.py").write_text(textwrap.dedent(TRAINER) + "\nraise ImportError('acme needs libfoo')\n")
    info = _posttrain(env, cwd, "info", "acme_foo", "--allow-experimental", "acme_foo")
    assert info.returncode == 1 and "acme needs libfoo" in info.stdout and "Traceback" not in info.stdout + info.stderr
