"""Tests of the example plugin: its spec, the maturity gate, and a tiny training run."""

import os
import subprocess
import sys
import tomllib
from importlib.metadata import EntryPoint

import pytest

from posttrain import MethodNotAllowedError, Registry
from posttrain_example_method._spec import SPEC
from posttrain_example_method.config import TokenDropoutSFTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean(clean_gate):  # posttrain.testing's fixture: no gate environment, a fresh registry
    yield


@pytest.fixture
def example(register_method):
    register_method(SPEC, distribution="posttrain-example-method", version="0.1.0")


class _Dist:
    name, version = "posttrain-example-method", "0.1.0"


def test_pyproject_entry_point_resolves_to_the_spec_with_status_experimental():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    (name, value), = project["entry-points"]["posttrain.methods"].items()
    ep = EntryPoint(name=name, value=value, group="posttrain.methods")
    fake = type("EP", (), {"name": ep.name, "group": ep.group, "value": ep.value, "load": ep.load, "dist": _Dist})()
    info = Registry(entry_points=[fake]).get_info("example_method")
    assert info.status == "experimental", info.error
    assert info.version == project["version"] == "0.1.0"


def test_spec_module_imports_no_torch():
    code = "import sys, posttrain_example_method._spec, posttrain_example_method.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_config_rejects_dropout_of_one():
    with pytest.raises(ValueError, match="token_dropout=1.0 is invalid"):
        TokenDropoutSFTConfig(token_dropout=1.0)


def test_trainer_without_opt_in_is_refused_by_the_gate(example, tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_example_method.trainer import TokenDropoutSFTTrainer

    with pytest.raises(MethodNotAllowedError, match="--allow-experimental example_method"):
        TokenDropoutSFTTrainer(model=tiny_model, args=TokenDropoutSFTConfig(output_dir=str(tmp_path)), processing_class=tiny_tokenizer)


def test_token_dropout_keeps_first_token_and_replaces_about_p():
    import torch

    from posttrain_example_method.trainer import apply_token_dropout

    ids = torch.arange(1, 1001).repeat(4, 1)
    out = apply_token_dropout(ids, 0.3, 0, torch.Generator().manual_seed(0))
    assert (out[:, 0] == ids[:, 0]).all()
    assert 0.25 < (out == 0).float().mean().item() < 0.35


def test_train_through_experimental_namespace_changes_parameters(example, tiny_model, tiny_tokenizer, tmp_path):
    import torch

    with pytest.warns(UserWarning, match="experimental"):
        from posttrain.experimental.example_method import TokenDropoutSFTConfig as Config, TokenDropoutSFTTrainer
    before = [p.detach().clone() for p in tiny_model.parameters()]
    args = Config(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, save_strategy="no", disable_tqdm=True, token_dropout=0.2)
    rows = [{"text": f"what is {i} plus {i}"} for i in range(8)]
    trainer = TokenDropoutSFTTrainer(model=tiny_model, args=args, train_dataset=rows, processing_class=tiny_tokenizer)
    trainer.train()
    after = list(trainer.loop.unwrapped_model().parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    sys.modules.pop("posttrain.experimental.example_method", None)
    vars(sys.modules["posttrain.experimental"]).pop("example_method", None)
