"""Materialize TRL's trainer tests (and the offline Hub stand-ins they need) under ``.cache/``.

TRL's test files are another project's code: they are never committed here. They are read at run
time from a TRL source tree -- ``$TRL_SOURCE``, either a bare/regular git directory (read at
``$TRL_SOURCE_REV``, default ``HEAD``) or a checkout directory -- defaulting to the mirror
``/work/.mirror/huggingface+trl/repo``.

Layout written (all ignored by git, see ``tests/trl_compat/.gitignore``)::

    .cache/hub/              private Hugging Face hub cache (HF_HUB_CACHE) with the model stand-ins
    .cache/datasets/         local dataset folders standing in for trl-internal-testing/{zen,toolcall,harmony}
    .cache/<target>/         one pytest root per target ("trl" or "posttrain"):
        pytest.ini, conftest.py (ours), tests/{__init__,conftest,testing_utils,testing_constants}.py,
        tests/data/..., tests/test_<trainer>_trainer.py
    .cache/trl@<version>/    the "trl" root of the trainers whose baseline is an older TRL release
                             (:data:`BASELINE_TRL`), run with that release first on PYTHONPATH
    .cache/trl-<version>/    that release's wheel, extracted (pure Python)
    .cache/wheels/           downloaded TRL wheels
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
DEFAULT_SOURCE = "/work/.mirror/huggingface+trl/repo"

#: trainer -> (TRL test file, posttrain gate module, config class, trainer class)
TRAINERS = {
    "sft": ("tests/test_sft_trainer.py", "posttrain.methods.sft", "SFTConfig", "SFTTrainer"),
    "dpo": ("tests/test_dpo_trainer.py", "posttrain.methods.dpo", "DPOConfig", "DPOTrainer"),
    "reward": ("tests/test_reward_trainer.py", "posttrain.methods.reward", "RewardConfig", "RewardTrainer"),
    "kto": ("tests/test_kto_trainer.py", "posttrain.methods.kto", "KTOConfig", "KTOTrainer"),
    "grpo": ("tests/test_grpo_trainer.py", "posttrain.methods.grpo", "GRPOConfig", "GRPOTrainer"),
    "rloo": ("tests/test_rloo_trainer.py", "posttrain.methods.rloo", "RLOOConfig", "RLOOTrainer"),
    # experimental trainers: TRL ships them under trl.experimental, we under posttrain.experimental (the opt-in)
    "orpo": ("tests/experimental/test_orpo_trainer.py", "posttrain.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "cpo": ("tests/experimental/test_cpo_trainer.py", "posttrain.experimental.cpo", "CPOConfig", "CPOTrainer"),
    "tpo": ("tests/experimental/test_tpo_trainer.py", "posttrain.experimental.tpo", "TPOConfig", "TPOTrainer"),
    # distillation (issue 19): TRL 1.16 made DistillationTrainer stable; the mirror's tests import it from trl.experimental
    "distill": ("tests/experimental/test_distillation_trainer.py", "posttrain.methods.distill", "DistillationConfig", "DistillationTrainer"),
    "server_distill": ("tests/experimental/test_server_distillation_trainer.py", "posttrain.experimental.server_distill",
                       "ServerDistillationConfig", "ServerDistillationTrainer"),
    "gkd": ("tests/experimental/test_gkd_trainer.py", "posttrain.experimental.gkd", "GKDConfig", "GKDTrainer"),
    "gold": ("tests/experimental/test_gold_trainer.py", "posttrain.experimental.gold", "GOLDConfig", "GOLDTrainer"),
    "iw_opd": ("tests/experimental/test_iw_opd_trainer.py", "posttrain.experimental.iw_opd", "IWOPDConfig", "IWOPDTrainer"),
    "sdft": ("tests/experimental/test_sdft_trainer.py", "posttrain.experimental.sdft", "SDFTConfig", "SDFTTrainer"),
    "sdpo": ("tests/experimental/test_sdpo_trainer.py", "posttrain.experimental.sdpo", "SDPOConfig", "SDPOTrainer"),
    # method wave 3 (issue 20): the trainers TRL 1.16 still ships under trl.experimental
    "online_dpo": ("tests/experimental/test_online_dpo_trainer.py", "posttrain.experimental.online_dpo", "OnlineDPOConfig", "OnlineDPOTrainer"),
    "a2po": ("tests/experimental/test_a2po_trainer.py", "posttrain.experimental.a2po", "A2POConfig", "A2POTrainer"),
    "gmpo": ("tests/experimental/test_gmpo_trainer.py", "posttrain.experimental.gmpo", "GMPOConfig", "GMPOTrainer"),
    # method wave 3 (issue 20): trainers TRL deleted after the mirror's snapshot (their baseline: BASELINE_TRL)
    "ppo": ("tests/experimental/test_ppo_trainer.py", "posttrain.experimental.ppo", "PPOConfig", "PPOTrainer"),
    "prm": ("tests/experimental/test_prm_trainer.py", "posttrain.experimental.prm", "PRMConfig", "PRMTrainer"),
    "xpo": ("tests/experimental/test_xpo_trainer.py", "posttrain.experimental.xpo", "XPOConfig", "XPOTrainer"),
    "nash_md": ("tests/experimental/test_nash_md_trainer.py", "posttrain.experimental.nash_md", "NashMDConfig", "NashMDTrainer"),
    "gspo_token": ("tests/experimental/test_gspo_token_trainer.py", "posttrain.experimental.gspo_token", "GSPOTokenConfig", "GSPOTokenTrainer"),
    "grpo_replay": ("tests/experimental/test_grpo_with_replay_buffer_trainer.py", "posttrain.experimental.grpo_replay",
                    "GRPOWithReplayBufferConfig", "GRPOWithReplayBufferTrainer"),
}
#: trainer -> the trl module its test file imports the config and trainer from (default ``trl``)
TRL_MODULES = {name: "trl.experimental." + name for name in ("orpo", "cpo", "tpo", "gkd", "gold", "iw_opd", "sdft", "sdpo", "online_dpo", "a2po", "gmpo")}
TRL_MODULES.update({"distill": "trl.experimental.distillation", "server_distill": "trl.experimental.server_distillation"})
TRL_MODULES.update({name: "trl.experimental." + name for name in ("ppo", "prm", "xpo", "nash_md", "gspo_token")})
TRL_MODULES["grpo_replay"] = "trl.experimental.grpo_with_replay_buffer"
#: trainer -> the trl names its test file imports that are swapped for posttrain's, when they are not just
#: ``XConfig``/``XTrainer`` from :data:`TRL_MODULES`: {(trl module, trl name): name in the posttrain module}
SWAPS = {
    # the GSPO-token test builds trl's GRPOConfig and imports the trainer as `GRPOTrainer as GSPOTokenTrainer`
    "gspo_token": {("trl", "GRPOConfig"): "GSPOTokenConfig", ("trl.experimental.gspo_token", "GRPOTrainer"): "GSPOTokenTrainer"},
    "grpo_replay": {
        ("trl.experimental.grpo_with_replay_buffer", name): name
        for name in ("GRPOWithReplayBufferConfig", "GRPOWithReplayBufferTrainer", "ReplayBuffer")
    },
}
#: trainer -> the TRL release its "trl" baseline runs against, for trainers the installed trl no longer ships
#: (the last release that shipped them); every other trainer's baseline is the installed trl
BASELINE_TRL = {"ppo": "1.12.0", "prm": "1.13.0", "xpo": "1.13.0", "nash_md": "1.13.0", "gspo_token": "1.13.0", "grpo_replay": "1.13.0"}
SUPPORT_FILES = ["tests/__init__.py", "tests/experimental/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/testing_constants.py"]
TARGETS = ("trl", "posttrain")

NO_SOURCE_MESSAGE = (
    "TRL compatibility suite skipped: no TRL source found; set TRL_SOURCE to a TRL git directory or checkout "
    f"(default {DEFAULT_SOURCE})"
)


class TRLSource:
    """Read files from a TRL git directory (at a revision) or from a checkout directory."""

    def __init__(self, location: str, rev: str = "HEAD"):
        self.location = location
        self.rev = rev
        path = Path(location)
        self.is_git = (path / "HEAD").is_file() and (path / "objects").is_dir()
        if not self.is_git and (path / ".git").exists() and not (path / "tests").is_dir():
            self.is_git, self.location = True, str(path / ".git")

    def read(self, relpath: str) -> str | None:
        if self.is_git:
            proc = subprocess.run(
                ["git", f"--git-dir={self.location}", "show", f"{self.rev}:{relpath}"], capture_output=True, text=True
            )
            return proc.stdout if proc.returncode == 0 else None
        file = Path(self.location) / relpath
        return file.read_text(encoding="utf-8") if file.is_file() else None

    def list_dir(self, relpath: str) -> list[str]:
        """Files under ``relpath`` (recursive), as repo-relative paths."""
        if self.is_git:
            proc = subprocess.run(
                ["git", f"--git-dir={self.location}", "ls-tree", "-r", "--name-only", self.rev, relpath + "/"],
                capture_output=True, text=True,
            )
            return proc.stdout.split() if proc.returncode == 0 else []
        base = Path(self.location)
        return [str(p.relative_to(base)) for p in (base / relpath).rglob("*") if p.is_file()]

    def read_bytes(self, relpath: str) -> bytes | None:
        if self.is_git:
            proc = subprocess.run(["git", f"--git-dir={self.location}", "show", f"{self.rev}:{relpath}"], capture_output=True)
            return proc.stdout if proc.returncode == 0 else None
        file = Path(self.location) / relpath
        return file.read_bytes() if file.is_file() else None

    def version(self) -> str:
        return (self.read("VERSION") or "unknown").strip()

    def describe(self) -> str:
        if self.is_git:
            proc = subprocess.run(
                ["git", f"--git-dir={self.location}", "log", "-1", "--format=%H %cs", self.rev], capture_output=True, text=True
            )
            return f"{self.location}@{proc.stdout.strip()} (TRL {self.version()})"
        return f"{self.location} (TRL {self.version()})"


def find_source() -> TRLSource | None:
    location = os.environ.get("TRL_SOURCE", DEFAULT_SOURCE)
    if not location or not Path(location).exists():
        return None
    src = TRLSource(location, os.environ.get("TRL_SOURCE_REV", "HEAD"))
    return src if src.read(TRAINERS["sft"][0]) is not None else None


def swaps(trainer: str) -> dict[tuple[str, str], str]:
    """{(trl module, trl name): posttrain name} swapped in ``trainer``'s test file (default: XConfig, XTrainer)."""
    if trainer in SWAPS:
        return dict(SWAPS[trainer])
    _, _, config_cls, trainer_cls = TRAINERS[trainer]
    trl_module = TRL_MODULES.get(trainer, "trl")
    return {(trl_module, config_cls): config_cls, (trl_module, trainer_cls): trainer_cls}


def rewrite_imports(text: str, trainer: str) -> str:
    """Swap the config/trainer names of ``trainer``'s test file for posttrain's gate; every other line stays as is.

    ``from trl import XConfig, XTrainer`` (for an experimental trainer ``from trl.experimental.<name> import ...``,
    see :data:`TRL_MODULES`; other names and aliases: :data:`SWAPS`) becomes
    ``from posttrain.<...>.<name> import XConfig, XTrainer``; the line's other names stay imported from trl.
    A local alias is kept (``import GRPOTrainer as GSPOTokenTrainer`` -> ``import GSPOTokenTrainer``).
    """
    import ast

    module = TRAINERS[trainer][1]
    wanted = swaps(trainer)
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits, found = [], set()
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and any(node.module == m for m, _ in wanted)):
            continue
        rest, ours = [], []
        for alias in node.names:
            key = (node.module, alias.name)
            if key not in wanted:
                rest.append(alias.name + (f" as {alias.asname}" if alias.asname else ""))
                continue
            found.add(key)
            local, ours_name = alias.asname or alias.name, wanted[key]
            ours.append(ours_name if ours_name == local else f"{ours_name} as {local}")
        if not ours:
            continue
        new = [f"from {node.module} import {', '.join(rest)}\n"] if rest else []
        new.append(f"from {module} import {', '.join(ours)}  # trl_compat: swapped from trl\n")
        edits.append((node.lineno - 1, node.end_lineno, new))
    if not found:  # a partial swap is fine (gold's test imports GOLDTrainer from trl's gold_trainer module: kept)
        names = ", ".join(f"{m}.{n}" for m, n in wanted)
        raise RuntimeError(f"the {trainer} test file has no top-level import of any of {names} to swap")
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    return "".join(lines)


STUB_HELPER = """
def _trl_compat_missing(qualname):  # written by tests/trl_compat/materialize.py
    \"\"\"Stand-in for a name the TRL test imports but the trl it runs against lacks.\"\"\"
    if qualname.rsplit(".", 1)[-1].startswith("is_") and qualname.endswith("_available"):
        return lambda *args, **kwargs: False
    message = f"{qualname} does not exist in the trl this test runs against (trl_compat stub)"

    class Missing:
        __name__ = __qualname__ = qualname.rsplit(".", 1)[-1]

        def __call__(self, *args, **kwargs):
            raise ImportError(message)

        def __getattr__(self, attr):  # e.g. SomeMissingModel.from_pretrained(...)
            raise AttributeError(attr) if attr.startswith("_") else ImportError(message)

    return Missing()
"""


def trl_imports(text: str) -> list[tuple[str, str]]:
    """The (module, name) pairs of a file's top-level ``from trl... import name`` statements."""
    import ast

    return [
        (node.module, alias.name)
        for node in ast.parse(text).body
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "trl"
        for alias in node.names
    ]


def missing_trl_names(pairs) -> list[tuple[str, str]]:
    """The (module, name) pairs the ``trl`` importable in this process lacks (neither attribute nor submodule)."""
    import importlib

    missing = []
    for module_name, name in sorted(set(map(tuple, pairs))):
        try:
            module = importlib.import_module(module_name)
        except Exception:
            missing.append((module_name, name))
            continue
        if hasattr(module, name):
            continue
        try:
            importlib.import_module(f"{module_name}.{name}")
        except Exception:
            missing.append((module_name, name))
    return missing


def missing_trl_names_in(pairs, trl_path: Path | None) -> set[tuple[str, str]]:
    """:func:`missing_trl_names` against the installed trl (``trl_path=None``) or the trl extracted at ``trl_path``.

    The latter runs in a child process with ``trl_path`` first on ``PYTHONPATH``, as the pytest run will.
    """
    if trl_path is None:
        return set(missing_trl_names(pairs))
    code = (
        "import json, sys; from tests.trl_compat.materialize import missing_trl_names; "
        "print(json.dumps(missing_trl_names(json.loads(sys.stdin.read()))))"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(trl_path), str(HERE.parents[1])]), TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(sorted(set(pairs))), capture_output=True, text=True,
                          env=env, cwd=HERE.parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"could not import the trl at {trl_path}: {proc.stderr.strip().splitlines()[-1:]}")
    return {tuple(pair) for pair in json.loads(proc.stdout.strip().splitlines()[-1])}


def stub_missing_trl_imports(text: str, log=print, filename: str = "", missing: set | None = None) -> str:
    """Keep a TRL test file importable when it imports ``trl`` names the trl it runs against lacks.

    The TRL source snapshot and the trl a root runs against are different versions; a file-level
    ``from trl.x import name`` of a missing private helper would make pytest drop the whole file.
    Such names become stubs (``is_*_available`` -> returns False; anything else raises ImportError
    when called or when an attribute is read), so only the tests that use them fail.
    ``missing``: the (module, name) pairs to stub (default: those the installed trl lacks).
    """
    import ast

    if missing is None:
        missing = set(missing_trl_names(trl_imports(text)))
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "trl"):
            continue
        present = [a for a in node.names if (node.module, a.name) not in missing]
        absent = [a for a in node.names if (node.module, a.name) in missing]
        if not absent:
            continue
        log(f"  {filename}: stubbed names missing from the trl it runs against: {', '.join(f'{node.module}.{a.name}' for a in absent)}")
        new = []
        if present:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in present)
            new.append(f"from {node.module} import {names}\n")
        for alias in absent:
            new.append(f"{alias.asname or alias.name} = _trl_compat_missing({node.module + '.' + alias.name!r})  # trl_compat stub\n")
        edits.append((node.lineno - 1, node.end_lineno, new))
    if not edits:
        return text
    for start, end, new in sorted(edits, reverse=True):
        lines[start:end] = new
    # the helper goes right after the module docstring / license header (before the first import)
    first = tree.body[0]
    at = first.end_lineno if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) else 0
    while at < len(lines) and lines[at].lstrip().startswith("#"):
        at += 1
    lines[at:at] = [STUB_HELPER.lstrip("\n"), "\n"]
    return "".join(lines)


PYTEST_INI = """\
# written by tests/trl_compat/materialize.py -- a pytest root for TRL's own tests, isolated from
# the repository's pytest configuration
[pytest]
markers =
    slow: TRL's long-running tests
    low_priority: TRL's low-priority tests
    invariant: TRL's training-invariant checks
filterwarnings =
    ignore::DeprecationWarning
"""


def baseline_trl_dir(version: str, log=print) -> Path | None:
    """TRL ``version`` extracted from its wheel into ``.cache/trl-<version>/`` (pure Python); None when unavailable.

    The wheel is looked up in ``$TRL_COMPAT_WHEELS`` (directories, ``os.pathsep``-separated) and
    ``.cache/wheels/``, else downloaded there with ``pip download trl==<version> --no-deps``.
    """
    import zipfile

    dest = CACHE / f"trl-{version}"
    if (dest / "trl" / "__init__.py").is_file():
        return dest
    name = f"trl-{version}-py3-none-any.whl"
    wheels = CACHE / "wheels"
    dirs = [Path(d) for d in os.environ.get("TRL_COMPAT_WHEELS", "").split(os.pathsep) if d] + [wheels]
    wheel = next((d / name for d in dirs if (d / name).is_file()), None)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", f"trl=={version}", "--no-deps", "--only-binary", ":all:",
               "--retries", "1", "--timeout", "20", "-q", "-d", str(wheels)]
        try:
            subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if not (wheels / name).is_file():
            return None
        wheel = wheels / name
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    log(f"  TRL {version}: extracted {wheel} into {dest}")
    return dest


def plan_roots(targets, trainers) -> list[dict]:
    """One pytest root per (target, trl version): the "trl" target of a trainer in :data:`BASELINE_TRL` runs
    against that release (root ``.cache/trl@<version>/``), everything else against the installed trl."""
    roots = []
    for target in targets:
        groups: dict[str | None, list[str]] = {}
        for trainer in trainers:
            groups.setdefault(BASELINE_TRL.get(trainer) if target == "trl" else None, []).append(trainer)
        for version, names in sorted(groups.items(), key=lambda kv: kv[0] or ""):
            roots.append({"name": target if version is None else f"{target}@{version}", "target": target,
                          "trl_version": version, "trainers": names})
    return roots


def _write_root(root: Path, source: TRLSource, target: str, trainers, trl_path: Path | None, data_files, log) -> None:
    if root.exists():
        shutil.rmtree(root)
    (root / "tests").mkdir(parents=True)
    (root / "pytest.ini").write_text(PYTEST_INI)
    shutil.copy(HERE / "_root_conftest.py", root / "conftest.py")
    files = {rel: source.read(rel) for rel in SUPPORT_FILES}
    for trainer in trainers:
        rel = TRAINERS[trainer][0]
        text = source.read(rel)
        if text is None:
            log(f"  {rel}: not in the TRL source")
            continue
        files[rel] = rewrite_imports(text, trainer) if target == "posttrain" else text
    python_files = {rel: text for rel, text in files.items() if text and rel.endswith(".py")}
    missing = missing_trl_names_in([pair for text in python_files.values() for pair in trl_imports(text)], trl_path)
    for rel, text in files.items():
        if rel in python_files:
            text = stub_missing_trl_imports(text, log=log, filename=f"{root.name}/{rel}", missing=missing)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text if text is not None else "")
    for rel in data_files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes(rel) or b"")


def materialize(source: TRLSource, targets=TARGETS, trainers=None, log=print) -> dict:
    """Write the pytest roots, the hub stand-ins and the datasets. Returns a manifest dict.

    ``manifest["roots"]``: the pytest roots to run (name, target, trl_version -- None for the installed trl --,
    trl_path, trainers); ``manifest["unavailable"]``: trainers skipped because their baseline TRL release
    could not be found or downloaded.
    """
    from . import standins

    trainers = list(trainers or TRAINERS)
    CACHE.mkdir(exist_ok=True)
    hub = CACHE / "hub"
    hub.mkdir(exist_ok=True)
    log(f"TRL source: {source.describe()}")
    log("building Hub stand-ins (models, tokenizers, datasets) ...")
    models = standins.build_models(hub, source, log=log)
    datasets = standins.build_datasets(CACHE / "datasets", source, log=log)
    (CACHE / "datasets.json").write_text(json.dumps(datasets, indent=1))

    data_files = [p for p in source.list_dir("tests/data")]
    roots, unavailable = [], {}
    for plan in plan_roots(targets, trainers):
        trl_path = None
        if plan["trl_version"] is not None:
            trl_path = baseline_trl_dir(plan["trl_version"], log=log)
            if trl_path is None:
                reason = f"TRL {plan['trl_version']} wheel not cached and not downloadable (set TRL_COMPAT_WHEELS to a folder holding it)"
                log(f"skipping {', '.join(plan['trainers'])} on target {plan['target']}: {reason}")
                unavailable.update({t: reason for t in plan["trainers"]})
                continue
        _write_root(CACHE / plan["name"], source, plan["target"], plan["trainers"], trl_path, data_files, log)
        roots.append({**plan, "trl_path": str(trl_path) if trl_path else None})
    manifest = {
        "source": source.describe(),
        "trl_source_version": source.version(),
        "models": models,
        "datasets": sorted(datasets),
        "trainers": trainers,
        "roots": roots,
        "unavailable": unavailable,
    }
    (CACHE / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
