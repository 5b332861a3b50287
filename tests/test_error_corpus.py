"""A corpus of bad inputs across methods, through the CLI: each ends in one line and exit status 2.

Every error a user can cause derives from :class:`posttrain.PosttrainError`, which the CLI catches
(``POSTTRAIN_DEBUG=1`` shows the traceback instead). Each case below is a mistake a user makes:
a bad config, bad data, a bad checkpoint, a reward function that misbehaves at step 1, a wrong
method or opt-in. The assertion is the same for all: exit status 2, exactly one
``posttrain train: error:`` line naming the problem, and no traceback anywhere on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import posttrain
from posttrain.cli import main

pytest.importorskip("posttrain_sft")
pytest.importorskip("posttrain_dpo")
pytest.importorskip("posttrain_grpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")
DPO_DATA = os.path.join(ROOT, "examples", "data", "dpo_arithmetic.jsonl")
PROMPTS = os.path.join(ROOT, "examples", "data", "prompts_arith.jsonl")

REWARDS = '''
def too_few(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def raises(completions, **kwargs):
    raise KeyError("solution_text")


def fine(completions, **kwargs):
    return [float(len(c[-1]["content"]) if isinstance(c, list) else len(c)) for c in completions]
'''


@pytest.fixture
def corpus(tmp_path, tiny_model_dir, monkeypatch):
    """Files the cases refer to: the tiny model, data files, YAML files and a reward module."""
    (tmp_path / "acme_rewards_corpus.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    files = {"model": str(tiny_model_dir), "tmp": str(tmp_path), "sft_data": SFT_DATA, "dpo_data": DPO_DATA, "prompts": PROMPTS}
    lines = open(SFT_DATA).read().splitlines()
    truncated = "\n".join(lines[:5]) + "\n" + lines[5][: len(lines[5]) // 2]  # a download cut mid-row
    (tmp_path / "truncated.jsonl").write_text(truncated)
    (tmp_path / "list.yaml").write_text("- learning_rate: 1e-4\n- max_steps: 3\n")
    (tmp_path / "typo.yaml").write_text("learnin_rate: 1e-4\n")
    (tmp_path / "badtype.yaml").write_text("learning_rate: [1, 2]\n")
    (tmp_path / "not_a_checkpoint").mkdir()
    (tmp_path / "not_a_checkpoint" / "notes.txt").write_text("hello")
    (tmp_path / "text_only.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    (tmp_path / "empty_out").mkdir()
    return files


def _common(f, out="out"):
    return ["--model_name_or_path", f["model"], "--output_dir", os.path.join(f["tmp"], out), "--max_steps", "1",
            "--disable_tqdm", "true", "--report_to", "none"]


def _grpo(f, reward):
    return ["train", "grpo", *_common(f), "--dataset_name", f["prompts"], "--reward_funcs", reward, "--num_generations", "2",
            "--per_device_train_batch_size", "2", "--max_completion_length", "4", "--logging_steps", "1"]


#: id -> (argv builder, text the one error line must contain)
CASES = {
    "reward_returns_too_few_values": (lambda f: _grpo(f, "acme_rewards_corpus:too_few"), "returned 1 rewards for 2 completions"),
    "reward_raises": (lambda f: _grpo(f, "acme_rewards_corpus:raises"), "reward function 'raises' raised KeyError"),
    "reward_path_does_not_import": (lambda f: _grpo(f, "acme_no_such_module:fn"), "acme_no_such_module"),
    "resume_from_a_directory_that_is_not_a_checkpoint": (
        lambda f: ["train", "sft", *_common(f), "--dataset_name", f["sft_data"], "--resume_from_checkpoint", os.path.join(f["tmp"], "not_a_checkpoint")],
        "is not a complete checkpoint (no trainer_state.json)",
    ),
    "resume_from_a_missing_directory": (
        lambda f: ["train", "sft", *_common(f), "--dataset_name", f["sft_data"], "--resume_from_checkpoint", os.path.join(f["tmp"], "nope")],
        "does not exist",
    ),
    "resume_true_without_a_checkpoint": (
        lambda f: ["train", "sft", *_common(f, "empty_out"), "--dataset_name", f["sft_data"], "--resume_from_checkpoint", "true"],
        "holds no complete checkpoint",
    ),
    "truncated_jsonl": (lambda f: ["train", "sft", *_common(f), "--dataset_name", os.path.join(f["tmp"], "truncated.jsonl")], "truncated.jsonl line 6: invalid JSON"),
    "yaml_of_the_wrong_shape": (lambda f: ["train", "sft", "--config", os.path.join(f["tmp"], "list.yaml")], "the top level must be a mapping"),
    "yaml_field_typo": (lambda f: ["train", "sft", "--config", os.path.join(f["tmp"], "typo.yaml")], "learning_rate"),
    "yaml_value_of_the_wrong_type": (lambda f: ["train", "sft", "--config", os.path.join(f["tmp"], "badtype.yaml")], "learning_rate"),
    "config_file_missing": (lambda f: ["train", "sft", "--config", os.path.join(f["tmp"], "missing.yaml")], "missing.yaml"),
    "flag_value_not_a_number": (lambda f: ["train", "sft", *_common(f), "--dataset_name", f["sft_data"], "--learning_rate", "fast"], "learning_rate"),
    "unknown_preset": (lambda f: ["train", "dpo", *_common(f), "--dataset_name", f["dpo_data"], "--preset", "ipoo"], "ipoo"),
    "preference_data_without_its_columns": (
        lambda f: ["train", "dpo", *_common(f), "--dataset_name", os.path.join(f["tmp"], "text_only.jsonl")], "chosen",
    ),
    "dataset_path_missing": (lambda f: ["train", "sft", *_common(f), "--dataset_name", "./nowhere/data.jsonl"], "does not exist"),
    "model_directory_missing": (
        lambda f: ["train", "sft", "--model_name_or_path", os.path.join(f["tmp"], "no-model"), "--output_dir", os.path.join(f["tmp"], "o"),
                   "--dataset_name", f["sft_data"], "--max_steps", "1"],
        "is not a directory",
    ),
    "method_name_typo": (lambda f: ["train", "dpoo", "--max_steps", "1"], "Did you mean 'dpo'"),
    "experimental_without_opt_in": (lambda f: ["train", "orpo", *_common(f), "--dataset_name", f["dpo_data"]], "--allow-experimental orpo"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_line(case, corpus, capsys, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_DEBUG", raising=False)
    build, expected = CASES[case]
    code = main(build(corpus))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("posttrain train: error:")]
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(errors) == 1, err  # (other stderr lines: progress bars of datasets, the experimental warning)
    assert expected in errors[0], errors[0]


def test_a_checkpoint_of_another_method_is_refused_in_one_line(corpus, capsys, monkeypatch):
    monkeypatch.delenv("POSTTRAIN_DEBUG", raising=False)
    dpo_out = os.path.join(corpus["tmp"], "dpo_run")
    code = main(["train", "dpo", *_common(corpus, "dpo_run"), "--dataset_name", corpus["dpo_data"], "--save_steps", "1",
                 "--per_device_train_batch_size", "2"])
    assert code == 0, capsys.readouterr().err
    checkpoint = posttrain.find_latest_checkpoint(dpo_out)
    assert checkpoint is not None
    capsys.readouterr()
    code = main(["train", "sft", *_common(corpus, "sft_run"), "--dataset_name", corpus["sft_data"], "--resume_from_checkpoint", checkpoint])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("posttrain train: error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert "was written by method 'dpo', but this run trains 'sft'" in errors[0]


def test_every_user_error_class_is_a_posttrain_error():
    """The classes the CLI relies on, and the built-in bases user code may already catch."""
    assert issubclass(posttrain.ConfigError, (posttrain.PosttrainError, ValueError))
    assert issubclass(posttrain.DataError, ValueError) and issubclass(posttrain.DataNotFoundError, FileNotFoundError)
    assert issubclass(posttrain.CheckpointNotFoundError, (posttrain.CheckpointError, FileNotFoundError))
    assert issubclass(posttrain.RewardFunctionError, (posttrain.PosttrainError, RuntimeError))
    for cls in (posttrain.MethodNotFoundError, posttrain.MethodNotAllowedError, posttrain.DataError, posttrain.CheckpointError, posttrain.RewardFunctionError):
        assert issubclass(cls, posttrain.PosttrainError), cls


def test_posttrain_debug_shows_the_traceback(tmp_path):
    """One line by default; with POSTTRAIN_DEBUG=1 the same mistake shows where it was raised."""
    (tmp_path / "list.yaml").write_text("- 1\n")
    env = {k: v for k, v in os.environ.items() if k != "POSTTRAIN_DEBUG"}
    argv = [sys.executable, "-m", "posttrain", "train", "sft", "--config", str(tmp_path / "list.yaml")]
    quiet = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr and len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    loud = subprocess.run(argv, env=dict(env, POSTTRAIN_DEBUG="1"), capture_output=True, text=True, timeout=300)
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UsageError" in loud.stderr, loud.stderr


def test_train_without_a_method_is_one_line_naming_the_fix(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name a method: posttrain train METHOD" in err[0] and "rest" not in err[0]


def test_train_method_help_starts_with_the_usage_line(capsys):
    assert main(["train", "sft", "--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("usage: posttrain train sft [--config FILE.yaml] [--preset NAME] [--allow-experimental NAME]")
    assert any(line.strip().startswith("--learning_rate") for line in out)


def test_posttrain_warnings_print_as_one_line_without_a_source_line():
    code = (
        "import warnings\n"
        "from posttrain._registry import ExperimentalMethodWarning\n"
        "from posttrain.cli import _one_line_warnings\n"
        "with _one_line_warnings():\n"
        "    warnings.warn('method x is experimental:\\n  it may change', ExperimentalMethodWarning)\n"
        "    warnings.warn('another library', UserWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert lines[0] == "posttrain: warning: method x is experimental: it may change", proc.stderr
    assert "UserWarning: another library" in proc.stderr  # other libraries' warnings keep Python's format
