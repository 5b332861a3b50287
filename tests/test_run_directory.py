"""One run per output_dir, and nothing of a run ever lost (through the CLI, as a user runs it).

Before 1.4 a second ``posttrain train`` into the same ``output_dir`` appended to the first run's
``metrics.jsonl``, checkpoint rotation deleted the *new* run's checkpoint and kept the old run's,
``--resume_from_checkpoint true`` resumed the old run, and ``diagnose`` judged the mixture.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from posttrain._checkpoint import _rotate, list_checkpoints, read_manifest
from posttrain.cli import main
from posttrain.diagnostics import diagnose

pytest.importorskip("posttrain_sft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_DATA = os.path.join(ROOT, "examples", "data", "sft_arithmetic.jsonl")


def _train(model, out, *extra):
    return main(["train", "sft", "--model_name_or_path", str(model), "--dataset_name", SFT_DATA, "--output_dir", str(out),
                 "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "1",
                 "--per_device_train_batch_size", "2", "--disable_tqdm", "true", "--report_to", "none", *extra])


def _metric_steps(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh if line.strip() and "loss" in json.loads(line)]


def test_a_second_run_into_the_same_directory_is_refused_and_loses_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out) == 0
    first_id = read_manifest(str(out))["run_id"]
    before = {name: os.path.getmtime(out / name) for name in ("metrics.jsonl", "run_manifest.json")}
    checkpoints = [os.path.basename(p) for p in list_checkpoints(str(out))]
    capsys.readouterr()

    assert _train(tiny_model_dir, out, "--learning_rate", "1e-3") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("posttrain train: error:")]
    assert len(err) == 1 and "already holds a run (method 'sft'" in err[0]
    assert "--overwrite_output_dir true" in err[0] and "--resume_from_checkpoint true" in err[0]
    assert {name: os.path.getmtime(out / name) for name in before} == before  # untouched
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == checkpoints == ["checkpoint-4"]
    assert read_manifest(str(out))["run_id"] == first_id and _metric_steps(out) == [1, 2, 3, 4]


def test_overwrite_output_dir_replaces_the_previous_run(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out) == 0
    first_id = read_manifest(str(out))["run_id"]
    assert _train(tiny_model_dir, out, "--overwrite_output_dir", "true", "--max_steps", "2") == 0
    assert "removed the previous run's" in capsys.readouterr().out
    manifest = read_manifest(str(out))
    assert manifest["run_id"] != first_id
    assert _metric_steps(out) == [1, 2]  # the old run's rows are gone, not mixed in
    assert [read_manifest(p)["run_id"] for p in list_checkpoints(str(out))] == [manifest["run_id"]]


def test_resume_true_continues_the_same_run_and_says_which_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out, "--max_steps", "2") == 0
    first_id = read_manifest(str(out))["run_id"]
    capsys.readouterr()
    assert _train(tiny_model_dir, out, "--resume_from_checkpoint", "true") == 0
    printed = capsys.readouterr().out
    assert "the newest checkpoint of" in printed and "is checkpoint-2" in printed
    assert read_manifest(str(out))["run_id"] == first_id  # the resumed run is the same run
    assert _metric_steps(out) == [1, 2, 3, 4]
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-4"]  # rotated its own step-2 one


def test_resuming_another_runs_checkpoint_into_a_used_directory_is_refused(tiny_model_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(tiny_model_dir, a, "--max_steps", "2") == 0
    assert _train(tiny_model_dir, b, "--max_steps", "2") == 0
    capsys.readouterr()
    assert _train(tiny_model_dir, b, "--resume_from_checkpoint", str(a / "checkpoint-2")) == 2
    err = capsys.readouterr().err
    assert "belongs to another run than the one in output_dir" in err and "Traceback" not in err


def test_rotation_never_removes_another_runs_checkpoint_nor_the_newest_of_this_run(tmp_path):
    """The 1.3 failure: the old run's checkpoint-60 kept, the new run's checkpoint-50 deleted."""
    out = tmp_path / "mixed"

    def fake_checkpoint(step, run_id):
        path = out / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        (path / "run_manifest.json").write_text(json.dumps({"method": "sft", "run_id": run_id}))
        return str(path)

    fake_checkpoint(60, "old")
    fake_checkpoint(30, "new")
    newest = fake_checkpoint(50, "new")
    _rotate(str(out), 1, run_id="new", keep=newest)
    assert sorted(os.listdir(out)) == ["checkpoint-50", "checkpoint-60"]
    _rotate(str(out), 1, run_id="other", keep=None)  # a run with no checkpoints here deletes nothing
    assert sorted(os.listdir(out)) == ["checkpoint-50", "checkpoint-60"]


def test_diagnose_judges_only_the_last_of_several_runs_in_an_old_directory(tiny_model_dir, tmp_path):
    """A directory written by posttrain < 1.4 may hold several runs in one metrics.jsonl."""
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out) == 0
    shutil.copy(out / "metrics.jsonl", tmp_path / "one.jsonl")
    with open(out / "metrics.jsonl", "a") as fh:  # what 1.3 did: a second run appended to the same file
        fh.write((tmp_path / "one.jsonl").read_text())
    report = diagnose(str(out))
    assert report["steps_logged"] == 4 and report["last_step"] == 4
    assert "holds 2 runs" in report["note"]


def test_diagnose_plot_writes_a_picture_of_the_run(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert _train(tiny_model_dir, out) == 0
    capsys.readouterr()
    assert main(["diagnose", str(out), "--plot"]) == 0
    printed = capsys.readouterr().out
    png = out / "diagnose.png"
    assert f"plot: {png}" in printed and "verdict:" in printed
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["diagnose", str(out), "--plot", str(tmp_path / "elsewhere" / "run.png"), "--format", "json"]) == 0
    assert (tmp_path / "elsewhere" / "run.png").stat().st_size > 10_000


def test_diagnose_plot_without_matplotlib_is_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import sys

    out = tmp_path / "run"
    assert _train(tiny_model_dir, out, "--max_steps", "2") == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["diagnose", str(out), "--plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs matplotlib: pip install 'posttrain[plot]'" in err[0]
