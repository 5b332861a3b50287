"""The user's explicit choice wins, visibly: a preset named on the command line applies in full over
the YAML, ``--print-config`` shows every field's source, and the run manifest records the sources."""

from __future__ import annotations

import json
import os

import pytest

from posttrain.cli import build_config, main

pytest.importorskip("posttrain_dpo")
pytest.importorskip("posttrain_grpo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spec(name):
    from posttrain._registry import default_registry

    return default_registry().get_info(name).spec


def test_a_preset_applies_in_full_over_the_yaml_and_a_flag_over_the_preset():
    from posttrain_dpo.config import DPOConfig

    presets = _spec("dpo").presets
    sources: dict = {}
    config = build_config(DPOConfig, presets=presets, preset="ipo", yaml_values={"loss_type": ["sigmoid"], "beta": 0.3}, sources=sources)
    ipo = presets["ipo"].overrides
    for name, value in ipo.items():
        assert getattr(config, name) == value and sources[name] == "preset ipo", name
    assert "beta" in ipo or (config.beta == 0.3 and sources["beta"] == "yaml")  # fields the preset leaves alone keep the YAML's
    flagged = build_config(DPOConfig, presets=presets, preset="ipo", yaml_values={"loss_type": ["sigmoid"]}, cli_values={"loss_type": ["hinge"]})
    assert flagged.loss_type == ["hinge"]


def test_dr_grpo_preset_wins_every_field_over_examples_grpo_yaml(capsys):
    """1.3 applied half of it: scale_rewards and beta, but kept the YAML's loss_type=dapo."""
    assert main(["train", "grpo", "--config", os.path.join(ROOT, "examples", "grpo.yaml"), "--preset", "dr_grpo", "--print-config"]) == 0
    out = capsys.readouterr().out
    for name, value in _spec("grpo").presets["dr_grpo"].overrides.items():
        line = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        assert line.endswith("# preset dr_grpo"), line
        assert json.dumps(value).strip('"') in line.replace("'", '"') or str(value) in line, line
    assert "max_steps: 16  # yaml" in out and "adam_beta1: 0.9  # default" in out


def test_print_config_trains_nothing(tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert main(["train", "dpo", "--config", os.path.join(ROOT, "examples", "dpo.yaml"), "--output_dir", str(out_dir), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert f"output_dir: {out_dir}  # flag" in printed
    assert not out_dir.exists()


def test_the_manifest_records_where_each_field_came_from(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"dataset_name: {os.path.join(ROOT, 'examples', 'data', 'dpo_arithmetic.jsonl')}\nbeta: 0.2\n")
    assert main(["train", "dpo", "--config", str(yaml_file), "--preset", "ipo", "--model_name_or_path", str(tiny_model_dir),
                 "--output_dir", str(out), "--max_steps", "1", "--disable_tqdm", "true", "--report_to", "none"]) == 0
    with open(out / "run_manifest.json") as fh:
        manifest = json.load(fh)
    sources = manifest["config_sources"]
    assert sources["max_steps"] == "flag" and sources["dataset_name"] == "yaml" and sources["loss_type"] == "preset ipo"
    assert sources["adam_beta1"] == "default"
    assert manifest["config"]["loss_type"] == ["ipo"]
