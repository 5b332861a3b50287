"""TRL 1.16's ORPOTrainer surface: processed columns, data_collator, compute_metrics, the arguments TRL refuses, config fields."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import warnings

import pytest
import torch

import posttrain
from posttrain.testing import make_tiny_datasets

TRL_DECODER_COLUMNS = ["prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                       "rejected_input_ids", "rejected_attention_mask", "rejected_labels"]


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("orpo", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)


def _ours(tokenizer, model, tmp_path, dataset, eval_dataset=None, name="ours", **kwargs):
    from posttrain_orpo import ORPOConfig, ORPOTrainer

    cfg = {"per_device_train_batch_size": 4, "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no",
           **kwargs.pop("cfg", {})}
    return ORPOTrainer(model=copy.deepcopy(model), args=ORPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=dataset,
                       eval_dataset=eval_dataset, processing_class=tokenizer, **kwargs)


def test_processed_columns_are_trls(tiny_tokenizer, policy, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    data = make_tiny_datasets(8)["conversational_preference"]
    ours = _ours(tiny_tokenizer, policy, tmp_path, data, eval_dataset={"a": data, "b": data})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ORPOTrainer(model=copy.deepcopy(policy), args=ORPOConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True),
                             train_dataset=data, processing_class=tiny_tokenizer)
    assert ours.train_dataset.column_names == TRL_DECODER_COLUMNS
    assert set(ours.eval_dataset) == {"a", "b"} and "chosen_input_ids" in next(iter(ours.eval_dataset["a"]))
    for column in TRL_DECODER_COLUMNS:  # the same values as TRL's tokenize_row
        assert ours.train_dataset[column] == theirs.train_dataset[column], column
    # rows already holding the columns are kept as they are
    again = ours.process_dataset(ours.train_dataset, "again")
    assert again.to_list() == ours.train_dataset.to_list()


def test_default_collator_is_trls_layout_and_is_the_one_used(tiny_tokenizer, policy, tmp_path):
    from trl.experimental.utils import DPODataCollatorWithPadding

    from posttrain_orpo.trainer import PaddingCollator

    data = make_tiny_datasets(8)["preference"]
    ours = _ours(tiny_tokenizer, policy, tmp_path, data)
    assert isinstance(ours.data_collator, PaddingCollator)
    rows = list(ours.train_dataset)
    theirs = DPODataCollatorWithPadding(pad_token_id=tiny_tokenizer.pad_token_id)(rows)
    mine = ours.data_collator(rows)
    assert set(mine) == set(theirs)
    for key in theirs:
        assert torch.equal(mine[key], theirs[key]), key  # prompt left-padded, the rest right-padded, -100 labels

    calls = []

    def counting(batch_rows):
        calls.append(len(batch_rows))
        return PaddingCollator(tiny_tokenizer.pad_token_id)(batch_rows)

    trainer = _ours(tiny_tokenizer, policy, tmp_path, data, data_collator=counting, cfg={"max_steps": 2})
    assert trainer.data_collator is counting
    trainer.train()
    assert calls[:2] == [4, 4]
    with pytest.raises(posttrain.ConfigError, match=r"the data collator's batch has no tensor 'chosen_input_ids'.*a data_collator must return TRL's padded columns"):
        _ours(tiny_tokenizer, policy, tmp_path, data, data_collator=lambda r: {"input_ids": torch.zeros(2, 2)}).collate(rows)


def test_compute_metrics_gets_trls_predictions(tiny_tokenizer, policy, tmp_path):
    """As TRL's prediction_step: per eval batch the (logits/chosen, logits/rejected) pair, labels zeros; called at evaluation."""
    data = make_tiny_datasets(8)["preference"]
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"test": 0.0, "n_predictions": float(len(prediction.predictions))}

    trainer = _ours(tiny_tokenizer, policy, tmp_path, data, eval_dataset=data, compute_metrics=compute_metrics,
                    preprocess_logits_for_metrics=lambda logits, labels: logits * 2,
                    cfg={"per_device_eval_batch_size": 4, "eval_strategy": "steps", "eval_steps": 1, "max_steps": 2})
    trainer.model.eval()
    result = trainer.evaluate()
    assert result["eval_test"] == 0.0 and result["eval_n_predictions"] == 4.0  # 2 batches x 2 numbers
    with torch.no_grad():
        expected = []
        for start in (0, 4):
            _, m = trainer.compute_loss(trainer.model, trainer.collate(list(trainer.eval_dataset)[start : start + 4]), 4)
            expected += [2 * m["logits/chosen"].item(), 2 * m["logits/rejected"].item()]
    assert seen[-1].predictions.tolist() == pytest.approx(expected, rel=1e-6)
    assert seen[-1].label_ids.tolist() == [0.0] * 4
    trainer.train()
    assert trainer.state.log_history[-2]["eval_test"] == 0.0  # TRL's test_compute_metrics


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_init": object()}, "model_init= is not supported"),
        ({"optimizers": (object(), None)}, "optimizers=(optimizer, scheduler) cannot be honoured"),
        ({"cfg": {"model_init_kwargs": {"dtype": "float32"}}}, "model_init_kwargs is set but the model is already instantiated"),
        pytest.param({"cfg": {"generate_during_eval": True}}, "generate_during_eval=True requires wandb or comet_ml",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") or importlib.util.find_spec("comet_ml"), reason="a tracker is installed")),
    ],
    ids=["model_init", "optimizers", "model_init_kwargs", "generate_during_eval"],
)
def test_what_trl_refuses_is_refused(kwargs, message, tiny_tokenizer, policy, tmp_path):
    with pytest.raises(posttrain.ConfigError) as info:
        _ours(tiny_tokenizer, policy, tmp_path, make_tiny_datasets(2)["preference"], **kwargs)
    assert message in str(info.value)


def test_every_trl_orpo_config_field_exists_with_trls_default():
    from transformers import TrainingArguments

    from posttrain_orpo.config import ORPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig as TRLORPOConfig
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(ORPOConfig)}
    checked = []
    for f in dataclasses.fields(TRLORPOConfig):
        if f.name in base and f.name not in ("learning_rate", "gradient_checkpointing"):
            continue  # plain TrainingArguments fields: posttrain.TrainingConfig's business
        assert f.name in ours, f"TRL's ORPOConfig.{f.name} is missing"
        trl_default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        our_default = ours[f.name].default_factory() if ours[f.name].default_factory is not dataclasses.MISSING else ours[f.name].default
        assert our_default == trl_default, f"{f.name}: ours {our_default!r} != TRL {trl_default!r}"
        checked.append(f.name)
    assert {"beta", "max_length", "max_completion_length", "is_encoder_decoder", "padding_value", "dataset_num_proc"} <= set(checked)
