"""Root conftest of a materialized TRL test tree (copied there as ``conftest.py`` by materialize.py).

* points the Hugging Face caches at the suite's private stand-in hub cache, offline;
* makes ``datasets.load_dataset("trl-internal-testing/<name>", ...)`` read the local stand-in
  folders (any other id falls through to the real ``load_dataset``);
* deselects the out-of-scope tests listed in ``tests/trl_compat/deselect.txt``;
* records every test's outcome (with exception type and first message line) into the JSON file
  named by ``$TRL_COMPAT_RESULTS``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent.parent  # tests/trl_compat/.cache
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(CACHE / "hub")
os.environ["HF_HOME"] = str(CACHE / "hf_home")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402


# ---------------------------------------------------------------------------------------------
# datasets.load_dataset -> local stand-ins
# ---------------------------------------------------------------------------------------------
def _install_dataset_redirect() -> None:
    import datasets
    import datasets.load

    mapping_file = CACHE / "datasets.json"
    mapping = json.loads(mapping_file.read_text()) if mapping_file.exists() else {}
    original = datasets.load.load_dataset
    if getattr(original, "_trl_compat", False):
        return

    def load_dataset(path, *args, **kwargs):
        if isinstance(path, str) and path in mapping:
            path = mapping[path]
        return original(path, *args, **kwargs)

    load_dataset._trl_compat = True
    load_dataset.__wrapped__ = original
    datasets.load_dataset = load_dataset
    datasets.load.load_dataset = load_dataset


_install_dataset_redirect()


# ---------------------------------------------------------------------------------------------
# deselection of out-of-scope tests
# ---------------------------------------------------------------------------------------------
def _read_rules(path: str | None):
    rules = []
    if not path or not Path(path).is_file():
        return rules
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, _, reason = line.partition("|")
        rules.append((pattern.strip(), reason.strip() or "out of scope"))
    return rules


def _match(item, pattern: str) -> bool:
    if pattern.startswith("marker:"):
        return item.get_closest_marker(pattern[len("marker:") :]) is not None
    return fnmatch.fnmatchcase(item.nodeid, pattern)


def pytest_collection_modifyitems(config, items):
    rules = _read_rules(os.environ.get("TRL_COMPAT_DESELECT"))
    if not rules:
        return
    keep, drop = [], []
    reasons = {}
    for item in items:
        for pattern, reason in rules:
            if _match(item, pattern):
                drop.append(item)
                reasons[item.nodeid] = reason
                break
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    out = os.environ.get("TRL_COMPAT_RESULTS")
    if out and os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0":
        Path(out + ".deselected.json").write_text(json.dumps(reasons, indent=0))


# ---------------------------------------------------------------------------------------------
# outcome recorder
# ---------------------------------------------------------------------------------------------
def _first_line(text: str) -> str:
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and report.outcome == "failed":
        exc = call.excinfo.value
        report.user_properties.append(("exc_type", type(exc).__name__))
        report.user_properties.append(("exc_msg", _first_line(exc)))


_RESULTS: dict[str, dict] = {}
_START = time.time()


def pytest_runtest_logreport(report):
    entry = _RESULTS.setdefault(report.nodeid, {"outcome": None, "duration": 0.0})
    entry["duration"] = round(entry["duration"] + getattr(report, "duration", 0.0), 3)
    props = dict(report.user_properties or [])
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
        report.when == "teardown" and report.outcome == "failed"
    ):
        if report.outcome == "passed":
            entry["outcome"] = entry["outcome"] or "passed"
        elif report.outcome == "skipped":
            entry["outcome"] = "skipped"
            longrepr = report.longrepr
            if isinstance(longrepr, tuple) and len(longrepr) == 3:
                entry["reason"] = _first_line(longrepr[2])
        else:
            phase = "failed" if report.when == "call" else "error"
            if entry["outcome"] in (None, "passed"):
                entry["outcome"] = phase
            crash = getattr(report.longrepr, "reprcrash", None)
            message = props.get("exc_msg") or (_first_line(crash.message) if crash is not None else _first_line(str(report.longrepr)))
            entry.setdefault("exc_type", props.get("exc_type") or ("Crash" if crash is None else _guess_type(crash.message)))
            entry.setdefault("exc_msg", message)
            entry.setdefault("phase", report.when)


def _guess_type(message: str) -> str:
    head = message.split(":", 1)[0].strip()
    return head if head and " " not in head else "AssertionError"


def pytest_collectreport(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        _RESULTS[report.nodeid or "<collection>"] = {
            "outcome": "collection_error",
            "exc_type": _guess_type(crash.message) if crash is not None else "CollectionError",
            "exc_msg": _first_line(crash.message if crash is not None else str(report.longrepr)),
        }


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("TRL_COMPAT_RESULTS")
    if not out or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # workers report through the controller
    Path(out).write_text(json.dumps({"wall_s": round(time.time() - _START, 1), "tests": _RESULTS}, indent=0))
