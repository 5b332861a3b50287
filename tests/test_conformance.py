"""Conformance: every plugin of this repository passes the shipped conformance suite (DESIGN.md §2-4).

The contract checks are `posttrain.conformance.suite`, the same suite an outside lab runs with
`pytest -p posttrain.conformance --posttrain-method NAME`; this module runs it over `plugins/*`
(contrib/ runs it on its own, as an outside lab would) and adds what only this repository
promises: docs pages, examples and the generated methods index.
"""

import json
import os
import subprocess
import sys

import pytest

from posttrain._registry import Registry
from posttrain.conformance.suite import *  # noqa: F401,F403  (the shipped contract checks)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plugin_method_names(*, without_own_suite: bool = False) -> list[str]:
    """The methods of ``plugins/*``; with ``without_own_suite``, only those whose plugin does not run the suite itself
    (a ``tests/test_*conformance*.py`` of its own, collected by the same ``make test`` run: running it twice only costs time)."""
    import glob
    import tomllib

    names = []
    for folder in sorted(os.listdir(os.path.join(ROOT, "plugins"))):
        if without_own_suite and glob.glob(os.path.join(ROOT, "plugins", folder, "tests", "test_*conformance*.py")):
            continue
        with open(os.path.join(ROOT, "plugins", folder, "pyproject.toml"), "rb") as fh:
            names += sorted(tomllib.load(fh)["project"]["entry-points"]["posttrain.methods"])
    return names


#: the shipped suite runs here over the plugins that do not run it in their own tests (the experimental plugins each
#: have a one-line tests/test_<name>_conformance.py; `make test` collects both); test_every_plugin_runs_the_suite checks
#: that together they cover every plugin
POSTTRAIN_METHODS = _plugin_method_names(without_own_suite=True)


def installed_methods():
    return [info for info in Registry().list_methods() if info.distribution.startswith("posttrain-")]


METHODS = installed_methods()


@pytest.fixture(scope="module", autouse=True)
def _served_tiny_teacher(tiny_teacher_dir):
    """server_distill's tiny runs need a teacher server: the tiny trained teacher, served for this module.

    Its config reads the URL from ``$POSTTRAIN_TEACHER_SERVER_URL`` when ``teacher_model_server_url`` is not set (the
    suite builds configs from the spec alone), as the plugin's own tests/conftest.py does.
    """
    import posttrain

    old = os.environ.get("POSTTRAIN_TEACHER_SERVER_URL")
    with posttrain.TeacherServer(tiny_teacher_dir) as server:
        os.environ["POSTTRAIN_TEACHER_SERVER_URL"] = server.url
        yield server.url
    if old is None:
        os.environ.pop("POSTTRAIN_TEACHER_SERVER_URL", None)
    else:
        os.environ["POSTTRAIN_TEACHER_SERVER_URL"] = old
IDS = [m.name for m in METHODS]


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


def test_every_plugin_runs_the_suite_here_or_in_its_own_tests():
    import glob

    own = set()
    for path in glob.glob(os.path.join(ROOT, "plugins", "*", "tests", "test_*conformance*.py")):
        text = open(path).read()
        assert "from posttrain.conformance.suite import *" in text and "POSTTRAIN_METHODS" in text, path
        own.add(path.split(os.sep)[-3])
    assert set(POSTTRAIN_METHODS) | own >= set(_plugin_method_names()), set(_plugin_method_names()) - set(POSTTRAIN_METHODS) - own
    assert not set(POSTTRAIN_METHODS) & own


def test_the_project_ships_at_least_80_paper_backed_methods_across_28_families():
    """Issue 20's bar: presets that cite a paper (arXiv id or URL), over this repository's own plugins."""
    sys.path.insert(0, os.path.join(ROOT, "docs"))
    try:
        import gen_methods
    finally:
        sys.path.pop(0)
    from posttrain.cli import paper_backed_count

    methods, families = paper_backed_count(gen_methods.project_methods())
    print(f"{methods} paper-backed methods across {families} families")
    assert methods >= 80 and families >= 28, (methods, families)


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
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    assert readme == gen_methods.render_readme(readme, gen_methods.project_methods()), (
        "the README's methods table is stale: run `.venv/bin/python docs/gen_methods.py`"
    )
