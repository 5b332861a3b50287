"""Semver enforced by a test: the committed API snapshots of the core and of the stable plugins.

The per-plugin check runs in the conformance suite (``test_public_surface_matches_api_snapshot``);
here: the core's snapshot, a real change in a copy of a stable plugin failing with the field and the
bump it needs, and the bump rules themselves.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from posttrain.conformance import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_core_surface_matches_its_snapshot():
    """posttrain.__all__, TrainingConfig and the plugin API equal core/posttrain/api_snapshot.json (else: bump and `posttrain snapshot --core --write`)."""
    snapshot.check(snapshot.core_surface(), snapshot.snapshot_path(None))


def test_cli_snapshot_check_passes_for_the_core():
    out = subprocess.run([sys.executable, "-m", "posttrain", "snapshot", "--core"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "matches" in out.stdout


_CHECK_COPY = """
import json, sys
sys.path.insert(0, sys.argv[1])  # the edited copy shadows the installed posttrain_dpo
import posttrain_dpo
assert posttrain_dpo.__file__.startswith(sys.argv[1]), posttrain_dpo.__file__
from posttrain import Registry
from posttrain.conformance import snapshot
live = snapshot.method_surface(Registry().get_info("dpo"))
try:
    snapshot.check(live, sys.argv[2])
except snapshot.SnapshotError as exc:
    print("REFUSED", exc)
else:
    print("ACCEPTED")
"""


def _check_dpo_copy(tmp_path, edit):
    """Copy posttrain_dpo, apply ``edit`` to its config.py, and check the copy's live surface against the committed snapshot."""
    package = os.path.join(ROOT, "plugins", "dpo", "posttrain_dpo")
    target = tmp_path / "copy" / "posttrain_dpo"
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = target / "config.py"
    text = config.read_text()
    new = edit(text)
    assert new != text, "the edit did not apply"
    config.write_text(new)
    out = subprocess.run([sys.executable, "-c", _CHECK_COPY, str(tmp_path / "copy"), os.path.join(package, snapshot.SNAPSHOT_FILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_changing_a_stable_default_in_a_copy_fails_naming_the_field_and_the_major_bump(tmp_path):
    before = json.load(open(os.path.join(ROOT, "plugins", "dpo", "posttrain_dpo", snapshot.SNAPSHOT_FILE)))
    assert before["config"]["fields"]["beta"]["default"] == 0.1
    out = _check_dpo_copy(tmp_path, lambda text: text.replace("beta: float = field(\n        default=0.1,", "beta: float = field(\n        default=0.2,", 1)
                          if "beta: float = field(\n        default=0.1," in text else text.replace("beta: float = field(default=0.1,", "beta: float = field(default=0.2,", 1))
    assert out.startswith("REFUSED"), out
    version = before["version"]
    major = int(version.split(".")[0])
    assert "DPOConfig.beta default changed 0.1 -> 0.2" in out
    assert f"needs a major version bump of posttrain-dpo ({version} -> {major + 1}.0.0)" in out


def test_adding_a_config_field_in_a_copy_needs_a_minor_bump(tmp_path):
    def add_field(text):
        anchor = "    beta: float = field("
        return text.replace(anchor, '    lab_weight: float = field(default=0.0, metadata={"help": "new"})\n' + anchor, 1)

    out = _check_dpo_copy(tmp_path, add_field)
    version = json.load(open(os.path.join(ROOT, "plugins", "dpo", "posttrain_dpo", snapshot.SNAPSHOT_FILE)))["version"]
    major, minor = (int(x) for x in version.split(".")[:2])
    assert out.startswith("REFUSED") and "DPOConfig.lab_weight added" in out
    assert f"needs a minor version bump of posttrain-dpo ({version} -> {major}.{minor + 1}.0)" in out


# -- the rules, on plain surfaces -----------------------------------------------------------------


def _surface(version="2.1.0", **over):
    base = {
        "schema": snapshot.SCHEMA,
        "distribution": "posttrain-x",
        "version": version,
        "method": "x",
        "config": {"class": "m:XConfig", "fields": {"beta": {"type": "float", "default": 0.1}}},
        "trainer": {"class": "m:XTrainer", "signature": [{"name": "model", "kind": "POSITIONAL_OR_KEYWORD", "default": None}]},
        "exports": ["XConfig", "XTrainer"],
        "presets": {"a": {"beta": 0.5}},
        "metrics": ["loss", "rewards/margins"],
    }
    base.update(over)
    return base


def _write(tmp_path, surface):
    path = tmp_path / "api_snapshot.json"
    path.write_text(json.dumps(surface))
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "needed", "text"),
    [
        (lambda s: s["config"]["fields"].pop("beta"), "major", "XConfig.beta removed"),
        (lambda s: s["config"]["fields"]["beta"].update(type="int"), "major", "XConfig.beta type changed"),
        (lambda s: s["config"]["fields"].update(gamma={"type": "float", "default": 0.0}), "minor", "XConfig.gamma added"),
        (lambda s: s["trainer"]["signature"].append({"name": "ref", "kind": "POSITIONAL_OR_KEYWORD", "default": None}), "minor", "XTrainer.__init__(ref) added"),
        (lambda s: s["trainer"]["signature"].append({"name": "ref", "kind": "POSITIONAL_OR_KEYWORD", "default": "<required>"}), "major", "XTrainer.__init__(ref) changed"),
        (lambda s: s["exports"].remove("XTrainer"), "major", "__all__ name 'XTrainer' removed"),
        (lambda s: s["presets"].pop("a"), "major", "preset 'a' removed"),
        (lambda s: s["presets"]["a"].update(beta=0.6), "major", "preset 'a' changed"),
        (lambda s: s["metrics"].remove("rewards/margins"), "major", "logged metric 'rewards/margins' removed"),
        (lambda s: s["metrics"].append("rewards/chosen"), "minor", "logged metric 'rewards/chosen' added"),
    ],
)
def test_each_kind_of_change_needs_its_bump(tmp_path, mutate, needed, text):
    path = _write(tmp_path, _surface())
    live = copy.deepcopy(_surface())
    mutate(live)
    with pytest.raises(snapshot.SnapshotError) as err:
        snapshot.check(live, path)
    assert text in str(err.value) and f"needs a {needed} version bump" in str(err.value)
    # with the bump made, the change is allowed but the snapshot must be rewritten ...
    live["version"] = "3.0.0" if needed == "major" else "2.2.0"
    with pytest.raises(snapshot.SnapshotError, match="snapshot is stale"):
        snapshot.check(live, path)
    snapshot.write(live, path)  # ... which `posttrain snapshot --write` does
    assert snapshot.check(live, path) == []


def test_write_refuses_a_change_without_its_bump_and_leaves_the_file(tmp_path):
    path = _write(tmp_path, _surface())
    live = _surface()
    live["config"]["fields"]["beta"]["default"] = 0.2
    with pytest.raises(snapshot.SnapshotError, match="major version bump"):
        snapshot.write(live, path)
    assert json.load(open(path))["config"]["fields"]["beta"]["default"] == 0.1


def test_zero_major_distributions_are_exempt_and_a_missing_snapshot_says_how_to_create_it(tmp_path):
    path = _write(tmp_path, _surface(version="0.3.0"))
    live = _surface(version="0.3.1")
    live["config"]["fields"].pop("beta")
    with pytest.raises(snapshot.SnapshotError, match="stale"):  # no bump needed under 0.x, but keep the file current
        snapshot.check(live, path)
    with pytest.raises(snapshot.SnapshotError, match="posttrain snapshot x --write"):
        snapshot.check(_surface(), str(tmp_path / "absent.json"))


def test_core_rules_version_exports_by_distribution_and_the_protocol_by_api_version(tmp_path):
    core = snapshot.core_surface()
    path = _write(tmp_path, core)
    live = copy.deepcopy(core)
    live["exports"]["brand_new_helper"] = "function"
    with pytest.raises(snapshot.SnapshotError, match=r"needs a minor version bump of posttrain \("):
        snapshot.check(live, path)
    live = copy.deepcopy(core)
    live["plugin_api"]["MethodProtocol"].pop("count_items")
    with pytest.raises(snapshot.SnapshotError, match=r"MethodProtocol.count_items removed.*needs a major version bump of posttrain.API_VERSION"):
        snapshot.check(live, path)
    live["api_version"] = "2.0"
    with pytest.raises(snapshot.SnapshotError, match="stale"):
        snapshot.check(live, path)
