"""Bad input as a new user gives it: one line naming the file/field/row and the fix, never a traceback."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main

pytest.importorskip("posttrain_sft")


def _train(capsys, model, data, tmp_path, *extra):
    code = main(["train", "sft", "--model_name_or_path", str(model), "--dataset_name", str(data), "--max_steps", "1",
                 "--output_dir", str(tmp_path / "out"), "--disable_tqdm", "true", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("posttrain train: error:")]
    assert "Traceback" not in err and len(errors) == 1, err  # (other stderr lines: datasets' progress bars)
    return errors[0]


def _write(path, text):
    path.write_text(text)
    return path


def test_empty_data_file_names_the_file(tiny_model_dir, tmp_path, capsys):
    err = _train(capsys, tiny_model_dir, _write(tmp_path / "empty.jsonl", ""), tmp_path)
    assert "empty.jsonl has no rows" in err


def test_a_null_row_names_the_line(tiny_model_dir, tmp_path, capsys):  # pyarrow segfaults on this file
    err = _train(capsys, tiny_model_dir, _write(tmp_path / "rows.jsonl", '{"text": "a"}\nnull\n'), tmp_path)
    assert "rows.jsonl line 2: a row must be a JSON object" in err


def test_invalid_json_names_the_line(tiny_model_dir, tmp_path, capsys):
    err = _train(capsys, tiny_model_dir, _write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"text": \n'), tmp_path)
    assert "rows.jsonl line 2: invalid JSON" in err


def test_a_none_value_names_the_row_and_column(tiny_model_dir, tmp_path, capsys):
    err = _train(capsys, tiny_model_dir, _write(tmp_path / "rows.jsonl", '{"text": "a"}\n{"text": null}\n'), tmp_path)
    assert "row 1" in err and "'text'" in err and "fix or drop the row" in err


def test_missing_model_directory_names_it(tmp_path, capsys):
    data = _write(tmp_path / "rows.jsonl", json.dumps({"text": "a"}) + "\n")
    err = _train(capsys, tmp_path / "no-such-model", data, tmp_path)
    assert "no-such-model' is not a directory" in err


def test_unreachable_hub_id_says_offline_and_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = _write(tmp_path / "rows.jsonl", json.dumps({"text": "a"}) + "\n")
    err = _train(capsys, "surely-not-an-org/surely-not-a-model", data, tmp_path)
    assert "cannot load the model 'surely-not-an-org/surely-not-a-model'" in err and "HF_HUB_OFFLINE=1" in err


def test_tokenizer_without_pad_and_eos_token_is_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = None
    tok.eos_token = None
    tok.save_pretrained(model)
    data = _write(tmp_path / "rows.jsonl", json.dumps({"text": "a"}) + "\n")
    err = _train(capsys, model, data, tmp_path)
    assert "neither a pad_token nor an eos_token" in err
