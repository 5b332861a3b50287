"""The outside lab's kit, end to end in a fresh virtual environment.

* Wheels behave like PyPI: the core alone lists no method; ``pip install --find-links DIR
  posttrain-grpo`` adds ``grpo`` (ok); a plugin built for plugin API 2.0 is refused by pip's metadata
  and, forced in with ``--no-deps``, listed ``incompatible`` with the fix; uninstalling restores the list.
* ``posttrain new`` writes a plugin that installs with ``pip install -e`` and passes the conformance
  suite (both ways of running it) and its own learning test, unchanged, for every family (sft,
  preference, online); its code imports only public names of ``posttrain``; the online plugin trains
  from the CLI and ``posttrain diagnose`` reads its run through the spec's signals and actions.

The fresh venv has its own pip and site-packages; the third-party libraries (torch, transformers,
...) come from this test venv through a ``.pth`` file pointing at a folder of symlinks that leaves
out every ``posttrain`` distribution, so nothing of ours is visible there until pip installs it,
and nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _run(cmd, *, ok=True, **kw):
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)
    if ok and out.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Wheels of the core and of posttrain-grpo, built like `make dist` does."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), ROOT, os.path.join(ROOT, "plugins", "grpo")])
    return out


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv (own pip) whose only view of this environment is its third-party libraries."""
    base = tmp_path_factory.mktemp("fresh")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    site = sysconfig.get_paths()["purelib"]
    shared = base / "shared" / "site-packages"  # dill pickles modules by reference only under a "site-packages" path
    shared.mkdir(parents=True)
    for entry in os.listdir(site):
        low = entry.lower()
        if low.startswith(("posttrain", "__editable__", "_posttrain", "pip")) or low.endswith(".pth"):
            continue
        os.symlink(os.path.join(site, entry), shared / entry)
    (sys_site,) = [p for p in (venv / "lib").glob("python*/site-packages")]
    for entry in os.listdir(sys_site):  # the venv's bundled setuptools would shadow the newer one torch needs
        if entry.lower().startswith(("setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence")):
            path = sys_site / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (sys_site / "_shared_deps.pth").write_text(str(shared) + "\n")
    return venv


def _listed(venv) -> dict:
    out = _run([str(venv / "bin" / "posttrain"), "list", "--format", "json"])
    return {m["name"]: m for m in json.loads(out.stdout)["methods"]}


def _pip(venv, *args, ok=True):
    return _run([str(venv / "bin" / "python"), "-m", "pip", *args], ok=ok)


def _incompatible_plugin_wheel(tmp_path, wheels) -> str:
    """A generated plugin whose spec and metadata say it was built for plugin API 2.0."""
    from posttrain._scaffold import write_plugin

    root = write_plugin("future_method", directory=str(tmp_path))
    spec = os.path.join(root, "posttrain_future_method", "_spec.py")
    original = open(spec).read()
    text = re.sub(r'plugin_api="\d+\.\d+"', 'plugin_api="2.0"', original)
    assert text != original, "the generated spec declares no literal plugin_api"
    open(spec, "w").write(text)
    pyproject = os.path.join(root, "pyproject.toml")
    text = re.sub(r'"posttrain>=[^"]+"', '"posttrain>=2.0,<3"', open(pyproject).read())
    open(pyproject, "w").write(text)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), root])
    return "posttrain-future-method"


def test_wheels_install_like_pypi_and_the_registry_follows_pip(fresh_venv, wheels, tmp_path):
    venv = fresh_venv
    _pip(venv, "install", "-q", "--find-links", str(wheels), "posttrain")
    assert _listed(venv) == {}, "the core alone must list no method"

    _pip(venv, "install", "-q", "--find-links", str(wheels), "posttrain-grpo")
    listed = _listed(venv)
    assert set(listed) == {"grpo"} and listed["grpo"]["status"] == "ok", listed
    version = _run([str(venv / "bin" / "python"), "-c", "import posttrain_grpo, importlib.metadata as m; print(m.version('posttrain-grpo'))"]).stdout.strip()
    assert version == listed["grpo"]["version"]
    location = _run([str(venv / "bin" / "python"), "-c", "import posttrain, posttrain_grpo; print(posttrain.__file__, posttrain_grpo.__file__)"]).stdout
    assert str(venv) in location and ROOT not in location, f"imported from the source tree, not the installed wheels: {location}"

    name = _incompatible_plugin_wheel(tmp_path, wheels)
    refused = _pip(venv, "install", "--find-links", str(wheels), name, ok=False)
    assert refused.returncode != 0 and "posttrain" in refused.stderr, "pip must refuse a plugin that requires posttrain>=2"
    _pip(venv, "install", "-q", "--no-deps", "--find-links", str(wheels), name)
    listed = _listed(venv)
    assert listed["future_method"]["status"] == "incompatible", listed
    assert "built for plugin API 2.0" in listed["future_method"]["error"]
    assert "upgrade posttrain to a release with plugin API 2.x" in listed["future_method"]["error"]
    assert listed["grpo"]["status"] == "ok"
    strict = _run([str(venv / "bin" / "posttrain"), "list", "--strict"], ok=False)
    assert strict.returncode == 1 and "future_method" in strict.stdout

    _pip(venv, "uninstall", "-y", "-q", name)
    assert set(_listed(venv)) == {"grpo"}
    _pip(venv, "uninstall", "-y", "-q", "posttrain-grpo")
    assert _listed(venv) == {}


def _posttrain_imports(path) -> set[str]:
    """Every name a generated module takes from ``posttrain`` (``from posttrain import ...``) or reaches as ``posttrain.<name>``."""
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "posttrain":
            names |= {f"{node.module}:{a.name}" if node.module != "posttrain" else a.name for a in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "posttrain":
            names.add(node.attr)
    return names


@pytest.mark.parametrize("family", ["sft", "preference", "online"])
def test_posttrain_new_writes_a_plugin_that_passes_conformance_and_learns(fresh_venv, wheels, tmp_path, family):
    import posttrain

    venv = fresh_venv
    _pip(venv, "install", "-q", "--find-links", str(wheels), "posttrain")
    name = f"lab_{family}"
    prefix = ["--class-prefix", "LabPO"] if family == "preference" else []  # TRL-style acronym class names
    made = _run([str(venv / "bin" / "posttrain"), "new", name, "--family", family, "--dir", str(tmp_path), *prefix])
    root = tmp_path / f"posttrain-lab-{family}"
    assert str(root) in made.stdout
    trainer_class = {"sft": "LabSftTrainer", "preference": "LabPOTrainer", "online": "LabOnlineTrainer"}[family]
    assert f"class {trainer_class}(TrainerSurface)" in (root / f"posttrain_{name}" / "trainer.py").read_text()
    for rel in ("pyproject.toml", "README.md", f"docs/{name}.md", f"posttrain_{name}/_spec.py", f"posttrain_{name}/config.py",
                f"posttrain_{name}/trainer.py", f"tests/test_{name}_conformance.py", f"tests/test_{name}_learning.py"):
        assert (root / rel).is_file(), rel
    public = set(posttrain.__all__) | {"posttrain.conformance.suite:*", "posttrain.testing:make_tiny_datasets"}
    for module in sorted(root.glob("**/*.py")):  # an outside lab's code: public names of posttrain only
        private = sorted(n for n in _posttrain_imports(module) if n not in public)
        assert not private, f"{module.relative_to(root)} uses names outside posttrain.__all__: {private}"
    again = _run([str(venv / "bin" / "posttrain"), "new", name, "--dir", str(tmp_path)], ok=False)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr

    _pip(venv, "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(root))
    try:
        assert _listed(venv)[name]["status"] == "experimental"
        env_python = str(venv / "bin" / "python")
        if family != "preference":  # the plugin's own tests: the suite star-imported, and the learning test
            out = _run([env_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], ok=False, cwd=root)
        else:  # the shipped pytest plugin, from anywhere, plus the learning test
            out = _run([env_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "posttrain.conformance", "--posttrain-method", name,
                        f"tests/test_{name}_learning.py"], ok=False, cwd=root)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        passed = int(re.search(r"(\d+) passed", out.stdout).group(1))
        assert passed >= 12, out.stdout[-2000:]  # the whole suite ran, not an empty selection
        assert "failed" not in out.stdout and "error" not in out.stdout.lower().split("passed")[-1]
        if family == "online":  # trains from the CLI on the example's prompts; diagnose reads the run through the spec
            _diagnose_an_online_run(venv, name, tmp_path)
    finally:
        _pip(venv, "uninstall", "-y", "-q", f"posttrain-lab-{family.replace('_', '-')}")


def _diagnose_an_online_run(venv, name: str, tmp_path) -> None:
    """``posttrain train NAME`` as examples/grpo.yaml runs GRPO, then ``posttrain diagnose``: the reward is the objective and it improves."""
    model_dir, run = tmp_path / "tiny-model", tmp_path / "run"
    _run([str(venv / "bin" / "python"), "-m", "posttrain.testing.tiny_model", str(model_dir)])
    _run([str(venv / "bin" / "posttrain"), "train", name, "--allow-experimental", name, "--model_name_or_path", str(model_dir),
          "--dataset_name", os.path.join(ROOT, "examples", "data", "prompts_arith.jsonl"),
          "--reward_funcs", "posttrain.testing.rewards:digit_fraction_reward", "--num_generations", "4", "--per_device_train_batch_size", "16",
          "--max_completion_length", "8", "--learning_rate", "5e-2", "--max_steps", "16", "--logging_steps", "1", "--save_strategy", "no",
          "--disable_tqdm", "true", "--output_dir", str(run)], cwd=tmp_path)
    report = json.loads(_run([str(venv / "bin" / "posttrain"), "diagnose", str(run), "--format", "json"]).stdout)
    assert report["method"] == name and report["objective"] == "reward" and report["steps_logged"] == 16, report
    # GRPO's example rises from about 0.25 to 0.8 in these 16 steps; this method on them: 0.25 -> 0.85 (t = 20.7) when written
    assert report["verdict"] == "improving", report
    codes = {event["code"]: event for event in report["events"]}
    assert "max_completion_length" in codes["completions_truncated"]["action"], codes  # the spec's own advice (8 tokens always truncate)
