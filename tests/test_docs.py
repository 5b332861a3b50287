"""The docs run as written: every shell command and Python snippet of the README and docs/.

Each fenced ``python`` / ``bash`` block of ``README.md``, ``docs/*.md`` and ``docs/methods/*.md``
either runs here, or is preceded by one HTML comment saying why it does not and what covers it:

    <!-- docs-test: skip REASON -->                   (e.g. needs a CUDA GPU, installs packages)
    <!-- docs-test: covered by tests/x.py::test_y -->  (a test that runs the same steps; it must exist)

Blocks run in a scratch directory laid out like the repository root, as a reader runs them after
``python -m posttrain.testing.tiny_model outputs/tiny-model``: ``examples/`` (the configs and
data), ``outputs/tiny-model`` (the tiny random model), ``contrib/``. Python blocks run one per
process; bash blocks line by line (``#`` comments dropped, ``\\`` continuations joined). Everything
is offline and on the CPU, so snippets use local data and the tiny model, with the Hub id a reader
would use on a real machine in a comment.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), *sorted(glob.glob(os.path.join(ROOT, "docs", "methods", "*.md")))]
DOCS = [os.path.relpath(os.path.join(ROOT, d), ROOT) for d in DOCS]
_FENCE = re.compile(r"^```(?P<lang>[a-z]*)\n(?P<body>.*?)^```", re.M | re.S)
_MARK = re.compile(r"<!--\s*docs-test:\s*(?P<kind>skip|covered by)\s+(?P<why>.*?)\s*-->\s*$")
RUNNABLE = {"python", "bash", "sh"}


def _blocks():
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
        for match in _FENCE.finditer(text):
            if match.group("lang") not in RUNNABLE:
                continue
            line = text[: match.start()].count("\n") + 1
            before = text[: match.start()].rstrip("\n").splitlines()
            mark = _MARK.search(before[-1]) if before else None
            yield doc, line, match.group("lang"), match.group("body"), mark


BLOCKS = list(_blocks())


@pytest.fixture(scope="module")
def _workspaces(tmp_path_factory):
    """Doc -> its scratch directory. Each doc gets its own (a reader follows one page, in order)."""
    from posttrain.testing.tiny_model import save_tiny_model

    model = tmp_path_factory.mktemp("tiny") / "tiny-model"
    save_tiny_model(str(model))
    made: dict = {}

    def get(doc):
        if doc not in made:
            root = tmp_path_factory.mktemp("docs")
            for name in ("examples", "contrib"):
                os.symlink(os.path.join(ROOT, name), root / name)
            (root / "outputs").mkdir()
            os.symlink(model, root / "outputs" / "tiny-model")
            made[doc] = root
        return made[doc]

    return get


@pytest.fixture
def workspace(_workspaces, request):
    """A scratch copy of the repository root as a reader has it after building the tiny model."""
    return _workspaces(request.node.callspec.params["doc"])


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("POSTTRAIN_")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # `posttrain`, `python`, `pytest` of this environment
    return env


def _commands(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    commands = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = shlex.split(line, comments=True, posix=True)
        if tokens:
            commands.append(line.split(" #")[0].strip())
    return commands


def test_every_snippet_runs_or_says_why_not():
    """No block is silently left out: an unmarked block runs below; a marked one names its reason or its test."""
    problems = []
    for doc, line, lang, body, mark in BLOCKS:
        if mark is None:
            continue
        why = mark.group("why")
        if mark.group("kind") == "covered by":
            path, _, name = why.partition("::")
            target = os.path.join(ROOT, path)
            if not (os.path.isfile(target) and re.search(rf"def {re.escape(name.split('[')[0])}\(", open(target).read())):
                problems.append(f"{doc}:{line}: 'covered by {why}' names no existing test")
        elif len(why) < 10:
            problems.append(f"{doc}:{line}: skip without a reason")
    assert not problems, "\n".join(problems)
    ran = sum(1 for *_, mark in BLOCKS if mark is None)
    print(f"{len(BLOCKS)} snippets: {ran} run here, {len(BLOCKS) - ran} marked (skip or covered by a named test)")


RUN = [(doc, line, lang, body) for doc, line, lang, body, mark in BLOCKS if mark is None]


@pytest.mark.slow
@pytest.mark.parametrize(("doc", "line", "lang", "body"), RUN, ids=[f"{d}:{n}" for d, n, *_ in RUN])
def test_snippet_runs_as_written(doc, line, lang, body, workspace):
    env = _env()
    if lang == "python":
        proc = subprocess.run([sys.executable, "-c", body], cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{doc}:{line} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return
    for command in _commands(body):
        proc = subprocess.run(["bash", "-c", command], cwd=workspace, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{doc}:{line}: `{command}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_demo_learns(tmp_path):
    """`make demo` (README): the demo trains, reloads its saved model and exits 0 only if held-out accuracy rose."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--output-dir", str(tmp_path / "demo")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out exact match BEFORE" in proc.stdout and (tmp_path / "demo" / "diagnose.png").is_file()


def test_method_pages_name_the_installed_versions():
    """A version a method page states in its opening lines is the installed distribution's (no stale '2.0.0')."""
    from importlib.metadata import PackageNotFoundError, version

    stale = []
    for page in sorted(glob.glob(os.path.join(ROOT, "docs", "methods", "*.md"))):
        head = "".join(open(page, encoding="utf-8").readlines()[:6])
        for dist, stated in re.findall(r"`?(posttrain-[a-z_-]+)`? (\d+\.\d+\.\d+)", head):
            try:
                installed = version(dist)
            except PackageNotFoundError:
                continue
            if stated != installed:
                stale.append(f"{os.path.relpath(page, ROOT)} says {dist} {stated}, installed {installed}")
    assert not stale, "\n".join(stale)
