"""TRL-compatibility yardstick: TRL's own trainer tests, run against posttrain's trainers.

Materializes TRL's test files from a TRL source (``$TRL_SOURCE``; skipped when none is found),
swaps only ``from trl import XConfig, XTrainer`` for posttrain's, runs them, and compares with the
committed TRL baseline (``trl_baseline.json``: the ids that pass against trl itself). The share of
baseline tests that also pass on posttrain must not fall below ``threshold.json``.
"""

from __future__ import annotations

import json
import os

import pytest

from .materialize import CACHE, NO_SOURCE_MESSAGE, TRAINERS, find_source, materialize
from .run import THRESHOLD_FILE, load_baseline, pass_rates, print_table, run_pytest


@pytest.mark.slow
def test_posttrain_passes_trl_trainer_tests():
    source = find_source()
    if source is None:
        pytest.skip(NO_SOURCE_MESSAGE)
    baseline = load_baseline()
    if baseline is None:
        pytest.skip("no trl_baseline.json: run `python -m tests.trl_compat.run --target trl --write-baseline`")
    trainers = list(TRAINERS)
    materialize(source, targets=["posttrain"], trainers=trainers, log=lambda *a: None)
    workers = int(os.environ.get("TRL_COMPAT_WORKERS", "2"))
    timeout = int(os.environ.get("TRL_COMPAT_TIMEOUT", "300"))
    report = run_pytest("posttrain", trainers, workers, timeout, [], log=lambda *a: None)
    (CACHE / "report-posttrain.json").write_text(json.dumps(report, indent=1))
    print_table(report, baseline)

    rates = pass_rates(report, baseline)
    ok, total = sum(r[0] for r in rates.values()), sum(r[1] for r in rates.values())
    overall = ok / total if total else 0.0
    threshold = json.loads(THRESHOLD_FILE.read_text())
    lines = [f"{t}: {o}/{b} = {o / b if b else 0:.3f} (threshold {threshold['per_trainer'].get(t, 0):.3f})" for t, (o, b) in rates.items()]
    print("\n".join(lines) + f"\noverall: {ok}/{total} = {overall:.3f} (threshold {threshold['overall']:.3f})")

    below = [t for t, (o, b) in rates.items() if b and o / b + 1e-9 < threshold["per_trainer"].get(t, 0.0)]
    assert overall + 1e-9 >= threshold["overall"], f"TRL-compat pass rate {overall:.3f} fell below {threshold['overall']:.3f}"
    assert not below, f"per-trainer TRL-compat pass rate fell below its threshold for: {', '.join(below)}"


# ---------------------------------------------------------------------------------------------
# unit tests of the suite's machinery (fast: no model, no pytest run)
# ---------------------------------------------------------------------------------------------
GSPO_TOKEN_HEAD = '''"""TRL's GSPO-token test (shape of its imports)."""
import torch

from trl import GRPOConfig
from trl.experimental.gspo_token import GRPOTrainer as GSPOTokenTrainer
from trl.experimental.grpo_with_replay_buffer import (
    GRPOWithReplayBufferConfig,
    GRPOWithReplayBufferTrainer,
    ReplayBuffer,
)
'''


def test_rewrite_imports_keeps_local_names_and_other_imports():
    from .materialize import rewrite_imports

    new = rewrite_imports(GSPO_TOKEN_HEAD, "gspo_token")
    assert "from posttrain.experimental.gspo_token import GSPOTokenConfig as GRPOConfig  # trl_compat" in new
    assert "from posttrain.experimental.gspo_token import GSPOTokenTrainer  # trl_compat" in new
    assert "from trl import" not in new and "from trl.experimental.gspo_token" not in new
    assert "from trl.experimental.grpo_with_replay_buffer import (" in new  # not this trainer's: untouched

    new = rewrite_imports(GSPO_TOKEN_HEAD, "grpo_replay")
    assert ("from posttrain.experimental.grpo_replay import GRPOWithReplayBufferConfig, GRPOWithReplayBufferTrainer, "
            "ReplayBuffer  # trl_compat") in new
    assert "from trl import GRPOConfig\n" in new
    with pytest.raises(RuntimeError, match="no top-level import of any of trl.experimental.ppo.PPOConfig"):
        rewrite_imports(GSPO_TOKEN_HEAD, "ppo")


def test_stub_missing_names_keeps_present_ones():
    from .materialize import stub_missing_trl_imports

    text = '"""doc"""\nfrom trl.experimental.ppo import PPOConfig, Helper as H\nfrom trl.import_utils import is_foo_available\n'
    new = stub_missing_trl_imports(text, log=lambda *a: None, missing={("trl.experimental.ppo", "Helper"), ("trl.import_utils", "is_foo_available")})
    assert "from trl.experimental.ppo import PPOConfig\n" in new
    namespace: dict = {}
    exec(compile(new.replace("from trl.experimental.ppo import PPOConfig\n", ""), "<stubbed>", "exec"), namespace)
    assert namespace["is_foo_available"]() is False
    with pytest.raises(ImportError, match="trl.experimental.ppo.Helper does not exist"):
        namespace["H"].from_pretrained("x")
    with pytest.raises(ImportError):
        namespace["H"]()


def test_baseline_trl_releases_get_their_own_roots():
    from .materialize import BASELINE_TRL, TRAINERS, plan_roots

    assert set(BASELINE_TRL) <= set(TRAINERS)
    roots = plan_roots(["trl", "posttrain"], ["sft", "ppo", "prm", "xpo"])
    assert [(r["name"], r["trainers"]) for r in roots] == [
        ("trl", ["sft"]), ("trl@1.12.0", ["ppo"]), ("trl@1.13.0", ["prm", "xpo"]), ("posttrain", ["sft", "ppo", "prm", "xpo"]),
    ]


def test_every_trainer_file_swaps_cleanly():
    """Each registered TRL test file (from the TRL source) has the imports the swap expects."""
    from .materialize import TRAINERS, rewrite_imports

    source = find_source()
    if source is None:
        pytest.skip(NO_SOURCE_MESSAGE)
    for trainer, (rel, module, *_rest) in TRAINERS.items():
        text = source.read(rel)
        assert text is not None, f"{rel} is not in the TRL source"
        assert f"from {module} import" in rewrite_imports(text, trainer)


def test_pass_rate_ignores_baseline_ids_deselected_since():
    report = {"target": "posttrain", "trainers": {"x": {"passed": ["a"], "deselected": ["c"]}}}
    assert pass_rates(report, {"x": ["a", "b", "c"]}) == {"x": (1, 2)}
