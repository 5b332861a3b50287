"""Every examples/<method>.yaml trains through `posttrain train` on the tiny model, and learns.

Two tests per example, both in-process through ``posttrain.cli.main`` from the repository root (the
examples' dataset paths are relative to it), on the tiny model of ``posttrain.testing`` (an example's
``outputs/tiny-model``) and its tiny trained teacher (``outputs/tiny-teacher``: the distillation examples'
teacher, and the starting model of the self-distillation ones):

* a smoke run: the config parses and trains two steps;
* the example exactly as its header comment runs it (its own max_steps, seed and hyperparameters;
  only the model directory and output_dir differ): the method's own signal rises from the first
  logged steps to the last ones, no diagnostic of warning or error severity fires, and
  ``posttrain.diagnose`` says "improving".

The margins below are about half the smallest rise measured through the CLI with OMP_NUM_THREADS=1
and 2, seeds 42 (the examples' own) and 1, and ATEN_CPU_CAPABILITY=avx512, avx2 and default (the
comment of each entry gives the measured range). The whole file takes about 15 s of CPU with one thread.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os

import pytest

import posttrain
from posttrain.testing import warning_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))

#: method -> (metric that must rise, minimum rise of mean(last 3 logged values) - mean(first 3)).
#: The metric is the one ``posttrain.diagnose`` judges the run by (its "objective").
LEARNING = {
    "sft": ("mean_token_accuracy", 0.1),  # measured +0.196 .. +0.203
    "dpo": ("rewards/accuracies", 0.2),  # +0.417 .. +0.464
    "reward": ("accuracy", 0.15),  # +0.292 .. +0.542
    "kto": ("rewards/margins", 0.04),  # +0.088 .. +0.103
    "grpo": ("reward", 0.2),  # +0.402 .. +0.525
    "rloo": ("reward", 0.12),  # +0.246 .. +0.323
    "orpo": ("rewards/accuracies", 0.2),  # +0.438 .. +0.479
    "cpo": ("rewards/accuracies", 0.2),  # +0.396 .. +0.479
    "bco": ("rewards/margins", 0.07),  # +0.154 .. +0.179
    "tpo": ("rewards/accuracies", 0.2),  # +0.396 .. +0.500
    "sdpo": ("self_distillation/reward_mean", 0.08),  # +0.157 .. +0.165 (a toy reward the random tiny model can earn)
    # method wave 3 (issue 20); measured with OMP_NUM_THREADS=1, seeds 42 and 1 (ppo also with 2 threads)
    "ppo": ("objective/scores", 0.2),  # +0.396 .. +0.480
    "prm": ("accuracy", 0.11),  # +0.226 .. +0.324 (step-label accuracy of the process reward model)
    "a2po": ("reward", 0.08),  # +0.168 .. +0.188
    "gmpo": ("reward", 0.1),  # +0.215 .. +0.287
    "gspo_token": ("reward", 0.07),  # +0.145 .. +0.180
    "grpo_replay": ("reward", 0.14),  # +0.283 .. +0.382
    "online_dpo": ("objective/scores", 0.07),  # +0.145 .. +0.160
    "xpo": ("objective/model_scores", 0.07),  # +0.157 .. +0.159
    "nash_md": ("objective/model_scores", 1.0),  # +2.06 .. +3.25 (a count of digits, weighted 8)
    "remax": ("reward", 0.03),  # +0.067 .. +0.175
    "prime": ("reward", 0.12),  # +0.246 .. +0.306
}
#: method -> (metric that must FALL, minimum fall of mean(first 3 logged values) - mean(last 3)): the distillation
#: methods, judged by their divergence to the teacher (``posttrain.diagnose``'s objective for them, lower is better).
FALLING = {
    "distill": ("loss", 1.4),  # -2.93 .. -3.42 (generalized JSD to the tiny trained teacher)
    "gold": ("divergence", 0.6),  # -1.18 .. -1.58
    "server_distill": ("divergence", 0.8),  # -1.61 .. -2.63 (the tiny teacher served by posttrain.TeacherServer)
    "gkd": ("divergence", 1.0),  # -1.97 .. -2.78
    "minillm": ("reverse_kl", 0.9),  # -1.93 .. -2.57 (single-step term only: rkl_advantage off, see the example's header)
    "iw_opd": ("teacher_kl", 2.3),  # -4.74 .. -4.75 (the jsd objective, forward KL on the full vocabulary)
    "sdft": ("sdft/distillation_loss", 0.009),  # -0.0185 .. -0.0353
    "ssd": ("loss", 0.065),  # -0.131 .. -0.184 (SSD has no teacher: the NLL of its own truncated samples falls)
}


def _model_args(path: str, tiny_model_dir: str, tiny_teacher_dir) -> list[str]:
    """The example's model paths mapped to the test's tiny models: ``outputs/tiny-model`` (the random student) and
    ``outputs/tiny-teacher`` (the tiny trained teacher, also the starting model of the self-distillation examples)."""
    import yaml

    config = yaml.safe_load(open(path)) or {}
    dirs = {"outputs/tiny-model": lambda: tiny_model_dir, "outputs/tiny-teacher": tiny_teacher_dir}
    args = []
    for key in ("model_name_or_path", "teacher_model_name_or_path"):
        value = config.get(key)
        if value is not None:
            if value not in dirs:
                raise AssertionError(f"{path}: {key}={value!r}; an example names outputs/tiny-model or outputs/tiny-teacher")
            args += [f"--{key}", dirs[value]()]
    return args


def _train(method: str, extra: list[str], tiny_model_dir: str, out, monkeypatch, tiny_teacher_dir=None) -> int:
    from posttrain.cli import main

    registry = posttrain.Registry()
    infos = {m.name: m for m in registry.list_methods()}
    if method not in infos:
        pytest.skip(f"plugin for {method} not installed")
    opt_in = ["--allow-experimental", method] if infos[method].maturity == "experimental" else []
    monkeypatch.chdir(ROOT)  # dataset paths in the examples are relative to the repository root
    path = os.path.join(ROOT, "examples", f"{method}.yaml")
    models = _model_args(path, tiny_model_dir, tiny_teacher_dir)
    with contextlib.ExitStack() as stack:
        import yaml

        if (yaml.safe_load(open(path)) or {}).get("teacher_model_server_url"):  # the example's teacher is served: serve the tiny teacher
            server = stack.enter_context(posttrain.TeacherServer(tiny_teacher_dir()))
            models += ["--teacher_model_server_url", server.url]
        return main(["train", method, "--config", path, *models, "--output_dir", str(out), *extra, *opt_in], registry=registry)


@pytest.fixture
def teacher_dir(request):
    """The tiny trained teacher's directory, built (once per session) only when an example names it."""
    return lambda: request.getfixturevalue("tiny_teacher_dir")


def test_every_example_is_checked_for_learning():
    assert sorted(os.path.splitext(os.path.basename(p))[0] for p in EXAMPLES) == sorted({**LEARNING, **FALLING})


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_config_trains_through_the_cli(path, tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    method = os.path.splitext(os.path.basename(path))[0]
    out = tmp_path / "out"
    code = _train(method, ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"],
                  tiny_model_dir, out, monkeypatch, teacher_dir)
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]
    assert json.load(open(out / "run_manifest.json"))["method"] == method


@pytest.mark.parametrize("method", sorted({**LEARNING, **FALLING}))
def test_example_learns(method, tiny_model_dir, teacher_dir, tmp_path, monkeypatch):
    metric, min_rise = LEARNING[method] if method in LEARNING else FALLING[method]
    sign = 1.0 if method in LEARNING else -1.0
    out = tmp_path / "out"
    assert _train(method, [], tiny_model_dir, out, monkeypatch, teacher_dir) == 0

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    assert train[-1]["step"] == json.load(open(out / "run_manifest.json"))["max_steps"]  # the whole example ran
    values = [r[metric] for r in train]
    assert len(values) >= 6, f"{method}: only {len(values)} logged steps; the example should log at least 6"
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert sign * (last - first) >= min_rise, f"{method}: {metric} went {first:.3f} -> {last:.3f} (first/last 3 logged steps): {values}"
    if method == "sft":  # the loss on the answers falls too
        losses = [r["loss"] for r in train]
        assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses

    assert warning_events(str(out)) == []
    report = posttrain.diagnose(str(out))
    assert report["objective"] == metric
    assert report["verdict"] == "improving", (report["verdict"], report["reason"], report["evidence"])


def test_the_examples_toy_reward_and_tiny_model_need_no_pytest():
    """grpo.yaml / rloo.yaml name posttrain.testing.rewards: a user without pytest can run them, and importing it changes no environment."""
    import subprocess
    import sys

    code = ("import sys, os; sys.modules['pytest'] = None; os.environ.pop('HF_HUB_OFFLINE', None)\n"
            "from posttrain.testing.rewards import digit_fraction_reward\n"
            "from posttrain.testing.tiny_model import build_tokenizer\n"
            "assert digit_fraction_reward(['12', 'ab']) == [1.0, 0.0] and 'HF_HUB_OFFLINE' not in os.environ\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
