"""Every examples/<method>.yaml runs through `posttrain train` (two steps, tiny model)."""

import glob
import json
import os

import pytest

from posttrain._registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_config_trains_through_the_cli(path, tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.cli import main

    method = os.path.splitext(os.path.basename(path))[0]
    registry = Registry()
    infos = {m.name: m for m in registry.list_methods()}
    if method not in infos:
        pytest.skip(f"plugin for {method} not installed")
    opt_in = ["--allow-experimental", method] if infos[method].maturity == "experimental" else []
    monkeypatch.chdir(ROOT)  # dataset paths in the examples are relative to the repository root
    out = tmp_path / "out"
    code = main(["train", method, "--config", path, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                 "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true", *opt_in], registry=registry)
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]
    assert json.load(open(out / "run_manifest.json"))["method"] == method
