"""Blocks marked ``# Copied from <module>.<qualname>`` in any plugin equal their original, both ways.

A copy is the function/class right below the marker; the original is imported by its dotted path.
Names are swapped before comparing: by default the two plugins' names (``posttrain_grpo`` ->
``posttrain_rloo`` swaps ``grpo`` -> ``rloo`` and ``GRPO`` -> ``RLOO``); a marker may give its own
swaps, ``# Copied from posttrain_dpo.trainer.f with DPO->CPO, dpo->cpo``. Changing either copy
fails here until both agree (TRL's "consistency over correctness", checked by CI instead of reviewers).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^(?P<indent>\s*)# Copied from (?P<path>[\w.]+)(?: with (?P<swaps>.+))?$")


def _copy_sites() -> list[tuple[pathlib.Path, int, str, str | None]]:
    sites = []
    for path in sorted([*ROOT.glob("plugins/*/posttrain_*/*.py"), *ROOT.glob("contrib/*/*/*.py")]):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            match = MARKER.match(line)
            if match:
                sites.append((path, lineno, match["path"], match["swaps"]))
    return sites


def _module_name(path: pathlib.Path) -> str:
    return f"{path.parent.name}.{path.stem}"


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _block_after(path: pathlib.Path, lineno: int) -> str:
    """Source of the def/class that starts on the first code line after the marker at ``lineno``."""
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            if start == lineno + 1:
                return "".join(lines[start - 1 : node.end_lineno])
    raise AssertionError(f"{path}:{lineno}: '# Copied from' must be directly above a def or class")


def _swaps(copy_module: str, original: str, given: str | None) -> list[tuple[str, str]]:
    if given:
        return [tuple(part.strip().split("->")) for part in given.split(",")]  # type: ignore[misc]
    src, dst = original.split(".")[0].removeprefix("posttrain_"), copy_module.split(".")[0].removeprefix("posttrain_")
    return [(src, dst), (src.upper(), dst.upper())]


SITES = _copy_sites()


def test_plugins_have_copied_blocks_to_check():
    assert len(SITES) >= 10, "the GRPO/RLOO aligned copies are marked; did the markers disappear?"


@pytest.mark.parametrize(("path", "lineno", "original", "swaps"), SITES, ids=[f"{p.parent.name}:{n}" for p, n, _, _ in SITES])
def test_copied_block_equals_its_original(path, lineno, original, swaps):
    pytest.importorskip(original.split(".")[0])
    copy_module = _module_name(path)
    target = _resolve(original)
    expected = inspect.getsource(target)
    for old, new in _swaps(copy_module, original, swaps):
        expected = expected.replace(old, new)
    actual = _block_after(path, lineno)
    indent = len(actual) - len(actual.lstrip())
    expected_indent = len(expected) - len(expected.lstrip())
    expected = "".join(line[expected_indent:] if line.strip() else line for line in expected.splitlines(keepends=True))
    actual = "".join(line[indent:] if line.strip() else line for line in actual.splitlines(keepends=True))
    assert actual == expected, (
        f"{path.relative_to(ROOT)}:{lineno} drifted from {original}: change both copies in the same commit "
        "(or, where the method's meaning differs, drop the marker and say why in a comment)."
    )
