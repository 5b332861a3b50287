"""TRL 1.16's CPOTrainer surface: processed columns, data_collator, compute_metrics, the arguments TRL refuses."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from cpo_helpers import make_ours, make_trl

TRL_DECODER_COLUMNS = ["prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                       "rejected_input_ids", "rejected_attention_mask", "rejected_labels"]


def test_processed_columns_are_trls(tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    data = uneven_data["conversational_preference"]
    ours = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data, eval_dataset={"a": data, "b": data})
    theirs = make_trl(tiny_tokenizer, cpo_policy, tmp_path, data)
    assert ours.train_dataset.column_names == TRL_DECODER_COLUMNS
    assert set(ours.eval_dataset) == {"a", "b"} and "chosen_input_ids" in next(iter(ours.eval_dataset["a"]))
    for column in TRL_DECODER_COLUMNS:  # the same values as TRL's tokenize_row
        assert ours.train_dataset[column] == theirs.train_dataset[column], column
    assert ours.process_dataset(ours.train_dataset, "again").to_list() == ours.train_dataset.to_list()  # already processed: kept


def test_default_collator_is_trls_layout_and_is_the_one_used(tiny_tokenizer, cpo_policy, uneven_data, tmp_path):
    from trl.experimental.utils import DPODataCollatorWithPadding

    from posttrain_cpo.trainer import PaddingCollator

    data = uneven_data["preference"]
    ours = make_ours(tiny_tokenizer, cpo_policy, tmp_path, data)
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

    import posttrain
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    trainer = CPOTrainer(model=copy.deepcopy(cpo_policy), args=CPOConfig(output_dir=str(tmp_path / "custom"), per_device_train_batch_size=4, max_steps=2,
                                                          report_to="none", disable_tqdm=True, gradient_checkpointing=False, save_strategy="no"),
                         data_collator=counting, train_dataset=data, processing_class=tiny_tokenizer)
    assert trainer.data_collator is counting
    trainer.train()
    assert calls[:2] == [4, 4]
    trainer.data_collator = lambda r: {"input_ids": torch.zeros(2, 2)}
    with pytest.raises(posttrain.ConfigError, match=r"the data collator's batch has no tensor 'chosen_input_ids'.*a data_collator must return TRL's padded columns"):
        trainer.collate(rows)


def test_compute_metrics_gets_trls_predictions(tiny_tokenizer, cpo_policy, pref_data, tmp_path):
    """As TRL's prediction_step: per eval batch the (logits/chosen, logits/rejected) pair, labels zeros; called at evaluation."""
    import posttrain
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    posttrain.activate("cpo", allow_experimental=True)
    data = pref_data["preference"]
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"test": 0.0, "n_predictions": float(len(prediction.predictions))}

    args = CPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=4, eval_strategy="steps",
                     eval_steps=1, max_steps=2, report_to="none", disable_tqdm=True, gradient_checkpointing=False, save_strategy="no")
    trainer = CPOTrainer(model=copy.deepcopy(cpo_policy), args=args, train_dataset=data, eval_dataset=data, processing_class=tiny_tokenizer,
                         compute_metrics=compute_metrics, preprocess_logits_for_metrics=lambda logits, labels: logits * 2)
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
        ({"model_init_kwargs": {"dtype": "float32"}}, "model_init_kwargs is set but the model is already instantiated"),
        pytest.param({"generate_during_eval": True}, "generate_during_eval=True requires wandb or comet_ml",
                     marks=pytest.mark.skipif(importlib.util.find_spec("wandb") or importlib.util.find_spec("comet_ml"), reason="a tracker is installed")),
    ],
    ids=["model_init_kwargs", "generate_during_eval"],
)
def test_what_trl_refuses_is_refused(kwargs, message, tiny_tokenizer, cpo_policy, pref_data, tmp_path):
    import posttrain

    with pytest.raises(posttrain.ConfigError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # generate_during_eval=True also warns that it has no effect
        make_ours(tiny_tokenizer, cpo_policy, tmp_path, pref_data["preference"], **kwargs)
    assert message in str(info.value)
