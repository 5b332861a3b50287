"""posttrain's opt-in pytest plugin: tiny models, tiny datasets, an isolated registry.

Enable it with ``pytest -p posttrain.testing`` or ``pytest_plugins = ["posttrain.testing"]`` in a
conftest. It is never auto-loaded and imports no torch at import time (fixtures import lazily).

Fixtures:
    tiny_tokenizer: a byte-level BPE tokenizer with a ChatML template (session-scoped, read-only).
    tiny_model: a fresh random tiny Qwen2 causal LM (function-scoped, float32).
    tiny_model_dir: a directory with a saved tiny model + tokenizer (session-scoped, read-only).
    tiny_teacher_dir: a directory with the tiny *trained* teacher (same tokenizer and vocabulary as
        ``tiny_model_dir``'s model; see :func:`distillation_report`) (session-scoped, read-only).
    tiny_datasets: ``{"text", "messages", "prompt_completion", "conversational_prompt_completion",
        "preference", "conversational_preference", "unpaired_preference", "prompt_only",
        "triple_preference"}`` -> Dataset.
    isolated_registry: a fresh empty ``posttrain.Registry`` (no installed plugins).
    register_method: ``register_method(spec, distribution=..., version=...)`` makes a spec visible
        to the default registry until the test ends.
    clean_gate: no maturity-gate environment variables and a fresh default registry for one test.

Helpers: :class:`posttrain.testing.scripted.ScriptedToolTurns` (a rollout backend writing fixed model turns,
for tests of the tool-calling path).
"""

from __future__ import annotations

import os

try:
    import pytest

    _fixture = pytest.fixture
except ImportError:  # the package's other parts (tiny_model, rewards) are used outside pytest too

    def _fixture(*args, **kwargs):
        """Without pytest the fixtures are plain functions (nothing collects them)."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda function: function


def pytest_configure(config) -> None:
    """As a pytest plugin: the tiny models never reach for the Hub (set before any test runs, not on a plain import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["make_tiny_datasets", "warning_events", "distillation_report", "arithmetic_prompts"]


def make_tiny_datasets(n: int = 16, seed: int = 0) -> dict:
    """Return tiny ``datasets.Dataset`` objects in each of TRL's standard and conversational formats."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        rows.append((f"what is {a} + {b}", str(a + b), str(wrong)))
    conv = lambda role, text: [{"role": role, "content": text}]  # noqa: E731
    return {
        "text": Dataset.from_dict({"text": [f"{q} = {a}" for q, a, _ in rows]}),
        "messages": Dataset.from_dict({"messages": [conv("user", q) + conv("assistant", a) for q, a, _ in rows]}),
        "prompt_completion": Dataset.from_dict({"prompt": [q + " =" for q, _, _ in rows], "completion": [" " + a for _, a, _ in rows]}),
        "conversational_prompt_completion": Dataset.from_dict(
            {"prompt": [conv("user", q) for q, _, _ in rows], "completion": [conv("assistant", a) for _, a, _ in rows]}
        ),
        "preference": Dataset.from_dict(
            {"prompt": [q + " =" for q, _, _ in rows], "chosen": [" " + a for _, a, _ in rows], "rejected": [" " + r for _, _, r in rows]}
        ),
        "conversational_preference": Dataset.from_dict(
            {
                "prompt": [conv("user", q) for q, _, _ in rows],
                "chosen": [conv("assistant", a) for _, a, _ in rows],
                "rejected": [conv("assistant", r) for _, _, r in rows],
            }
        ),
        "unpaired_preference": Dataset.from_dict(
            {
                "prompt": [q + " =" for q, _, _ in rows for _ in (0, 1)],
                "completion": [" " + c for _, a, r in rows for c in (a, r)],
                "label": [lab for _ in rows for lab in (True, False)],
            }
        ),
        "prompt_only": Dataset.from_dict({"prompt": [q + " =" for q, _, _ in rows], "solution": [a for _, a, _ in rows]}),
        "triple_preference": Dataset.from_dict(  # TRL's TPO rows: the gold response is the correct sum, spelled out
            {
                "prompt": [q + " =" for q, _, _ in rows],
                "chosen": [" " + a for _, a, _ in rows],
                "rejected": [" " + r for _, _, r in rows],
                "reference": [f" {a}, because {q.removeprefix('what is ')} = {a}" for q, a, _ in rows],
            }
        ),
    }


@_fixture(scope="session")
def tiny_tokenizer():
    """A tiny byte-level BPE tokenizer with a ChatML chat template (shared; do not mutate)."""
    from posttrain.testing.tiny_model import build_tokenizer

    return build_tokenizer()


@_fixture
def tiny_model(tiny_tokenizer):
    """A fresh randomly initialised tiny Qwen2 causal LM (float32)."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer)


@_fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory holding a saved tiny model + tokenizer (shared; do not write into it)."""
    from posttrain.testing.tiny_model import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@_fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A directory holding the tiny trained teacher + tokenizer (shared; do not write into it)."""
    from posttrain.testing.tiny_model import save_tiny_teacher

    return save_tiny_teacher(str(tmp_path_factory.mktemp("tiny_teacher")))


def distillation_report(student, teacher, tokenizer, prompts, max_new_tokens: int = 8, solutions=None) -> dict:
    """A student against the tiny teacher on held-out prompts (see :func:`posttrain.testing._teacher.distillation_report`)."""
    from posttrain.testing._teacher import distillation_report as _report

    return _report(student, teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, solutions=solutions)


def arithmetic_prompts(n: int = 64, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """Conversational arithmetic prompt rows with a ``solution`` (see :func:`posttrain.testing._teacher.arithmetic_prompts`)."""
    from posttrain.testing._teacher import arithmetic_prompts as _prompts

    return _prompts(n, seed=seed, max_operand=max_operand)


@_fixture(scope="session")
def tiny_datasets():
    """Tiny datasets in every TRL format (see :func:`make_tiny_datasets`)."""
    return make_tiny_datasets()


@_fixture
def isolated_registry():
    """A fresh ``posttrain.Registry`` that sees no installed plugins."""
    from posttrain._registry import Registry

    return Registry(entry_points=[])


@_fixture
def register_method():
    """Return ``register(spec, distribution=..., version=...)``; registrations end with the test."""
    import contextlib

    from posttrain._registry import temporary_method

    with contextlib.ExitStack() as stack:

        def register(spec, *, distribution: str = "posttrain-test", version: str = "1.0.0"):
            stack.enter_context(temporary_method(spec, distribution=distribution, version=version))
            return spec

        yield register


@_fixture
def clean_gate(monkeypatch):
    """Run the test with no maturity-gate environment (``POSTTRAIN_ALLOW_EXPERIMENTAL``, ...) and a fresh default registry.

    Opt-ins granted in the test (activations) are forgotten when it ends.
    """
    from posttrain._registry import _reset_default_registry

    for var in ("POSTTRAIN_ALLOW_EXPERIMENTAL", "POSTTRAIN_STABLE_ONLY", "POSTTRAIN_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    _reset_default_registry()
    yield
    _reset_default_registry()


def warning_events(output_dir: str) -> list[dict]:
    """The warning- and error-level events a run wrote to ``output_dir/diagnostics.jsonl`` (for no-false-alarm asserts)."""
    import json
    import os

    path = os.path.join(output_dir, "diagnostics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        events = [json.loads(line) for line in fh if line.strip()]
    return [e for e in events if e.get("severity", "warning") in ("warning", "error")]
