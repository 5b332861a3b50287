"""posttrain's conformance suite for method plugins, as a pytest plugin (ships with the core).

Run it against any installed method — ours or an outside lab's — with::

    pytest -p posttrain.conformance --posttrain-method NAME [--posttrain-method OTHER ...]

``--posttrain-method all`` selects every installed method. The suite (:mod:`posttrain.conformance.suite`)
checks what this repository checks on its own plugins: the spec and config modules are light, every
config field is documented, presets build valid configs, the trainer has TRL's signature and
``posttrain.TrainerSurface``, the distribution requires a compatible core, the maturity gate holds,
the trainer satisfies ``posttrain.MethodProtocol``, a few steps train on a tiny model, a resumed run is
bit-exact, ``save_model`` output loads with ``from_pretrained``, and a stable plugin's public surface
matches its committed API snapshot (:mod:`posttrain.conformance.snapshot`).

A test module can also run the suite itself (no ``-p`` needed)::

    from posttrain.conformance.suite import *  # noqa: F401,F403
    POSTTRAIN_METHODS = ["my_method"]

The method must declare ``MethodSpec.data_format`` (and, where needed, ``MethodSpec.tiny_run``) so the
suite can train it. See docs/writing-a-plugin.md.
"""

from __future__ import annotations

import os

__all__ = ["SUITE_PATH"]

#: The file pytest collects for ``--posttrain-method``.
SUITE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "suite.py")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("posttrain", "posttrain conformance")
    group.addoption(
        "--posttrain-method",
        action="append",
        default=None,
        metavar="NAME",
        help="run posttrain's conformance suite against the installed method NAME (repeatable; 'all' = every installed method)",
    )


def pytest_configure(config) -> None:
    if not config.getoption("posttrain_method"):
        return
    # Collect the suite. Explicit paths the user gave are kept; the default (rootdir/testpaths) is replaced.
    explicit = getattr(config, "args_source", None) == getattr(getattr(config, "ArgsSource", None), "ARGS", object())
    if explicit:
        if SUITE_PATH not in config.args:
            config.args.append(SUITE_PATH)
    else:
        config.args[:] = [SUITE_PATH]
