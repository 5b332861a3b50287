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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
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
}
#: trainer -> the trl module its test file imports the config and trainer from (default ``trl``)
TRL_MODULES = {name: "trl.experimental." + name for name in ("orpo", "cpo", "tpo", "gkd", "gold", "iw_opd", "sdft", "sdpo", "online_dpo", "a2po", "gmpo")}
TRL_MODULES.update({"distill": "trl.experimental.distillation", "server_distill": "trl.experimental.server_distillation"})
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


def rewrite_imports(text: str, trainer: str) -> str:
    """Swap ``from trl import XConfig, XTrainer`` for posttrain's gate; every other line stays as is.

    For an experimental trainer the line is ``from trl.experimental.<name> import ...`` (see :data:`TRL_MODULES`).
    """
    _, module, config_cls, trainer_cls = TRAINERS[trainer]
    wanted = {config_cls, trainer_cls}
    trl_module = TRL_MODULES.get(trainer, "trl")
    import_re = re.compile(rf"^from {re.escape(trl_module)} import (?:\((?P<paren>[A-Za-z0-9_,\s]+)\)|(?P<names>[A-Za-z0-9_, ]+))$", re.MULTILINE)

    def repl(match: re.Match) -> str:
        names = [n.strip() for n in (match.group("names") or match.group("paren")).split(",") if n.strip()]
        ours = [n for n in names if n in wanted]
        rest = [n for n in names if n not in wanted]
        lines = []
        if rest:
            lines.append(f"from {trl_module} import {', '.join(rest)}")
        if ours:
            lines.append(f"from {module} import {', '.join(ours)}  # trl_compat: swapped from trl")
        return "\n".join(lines)

    new, count = import_re.subn(repl, text)
    if count == 0 or module not in new:
        raise RuntimeError(f"could not find `from {trl_module} import {config_cls}, {trainer_cls}` in the {trainer} test file")
    return new


STUB_HELPER = """
def _trl_compat_missing(qualname):  # written by tests/trl_compat/materialize.py
    \"\"\"Stand-in for a name the TRL test imports but the installed trl lacks.\"\"\"
    if qualname.rsplit(".", 1)[-1].startswith("is_") and qualname.endswith("_available"):
        return lambda *args, **kwargs: False

    def missing(*args, **kwargs):
        raise ImportError(f"{qualname} does not exist in the installed trl (trl_compat stub)")

    missing.__name__ = qualname.rsplit(".", 1)[-1]
    return missing
"""


def stub_missing_trl_imports(text: str, log=print, filename: str = "") -> str:
    """Keep a TRL test file importable when it imports ``trl`` internals the installed trl lacks.

    The TRL source snapshot and the installed trl are different versions; a file-level
    ``from trl.x import name`` of a missing private helper would make pytest drop the whole file.
    Such names become stubs (``is_*_available`` -> returns False; anything else raises ImportError
    when called), so only the tests that use them fail -- identically for both targets.
    """
    import ast
    import importlib

    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    edits = []
    for node in tree.body:
        if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "trl"):
            continue
        try:
            module = importlib.import_module(node.module)
        except Exception:
            module = None
        present, missing = [], []
        for alias in node.names:
            ok = module is not None and hasattr(module, alias.name)
            if module is not None and not ok:
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                    ok = True
                except Exception:
                    ok = False
            (present if ok else missing).append(alias)
        if not missing:
            continue
        log(f"  {filename}: stubbed names missing from the installed trl: {', '.join(f'{node.module}.{a.name}' for a in missing)}")
        new = []
        if present:
            names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in present)
            new.append(f"from {node.module} import {names}\n")
        for alias in missing:
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


def _quiet(*_args, **_kwargs):
    pass


def materialize(source: TRLSource, targets=TARGETS, trainers=None, log=print) -> dict:
    """Write the pytest roots, the hub stand-ins and the datasets. Returns a manifest dict."""
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
    for target in targets:
        root = CACHE / target
        if root.exists():
            shutil.rmtree(root)
        (root / "tests").mkdir(parents=True)
        (root / "pytest.ini").write_text(PYTEST_INI)
        shutil.copy(HERE / "_root_conftest.py", root / "conftest.py")
        for rel in SUPPORT_FILES:
            text = source.read(rel)
            if text and rel.endswith(".py"):
                text = stub_missing_trl_imports(text, log=log if target == targets[0] else _quiet, filename=rel)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text if text is not None else "")
        for rel in data_files:
            blob = source.read_bytes(rel)
            dest = root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(blob or b"")
        for trainer in trainers:
            rel = TRAINERS[trainer][0]
            text = source.read(rel)
            if text is None:
                log(f"  {rel}: not in the TRL source")
                continue
            text = stub_missing_trl_imports(text, log=log if target == targets[0] else _quiet, filename=rel)
            if target == "posttrain":
                text = rewrite_imports(text, trainer)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    manifest = {
        "source": source.describe(),
        "trl_source_version": source.version(),
        "models": models,
        "datasets": sorted(datasets),
        "trainers": trainers,
    }
    (CACHE / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
