"""Tests of RewardTrainer's TRL surface: constructor arguments, config conversion, datasets, evaluation, callbacks, chat templates."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain import ConfigError

CONFIG = dict(report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no")


def _config(tmp_path, **kw):
    from posttrain.methods.reward import RewardConfig

    return RewardConfig(output_dir=str(tmp_path / "out"), **{**CONFIG, **kw})


def _trainer(tmp_path, model, tok, data, **kw):
    from posttrain.methods.reward import RewardTrainer

    names = ("eval_dataset", "peft_config", "callbacks", "compute_metrics", "data_collator", "optimizers", "optimizer_cls_and_kwargs",
             "preprocess_logits_for_metrics", "quantization_config")
    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in names}
    return RewardTrainer(model=model, args=_config(tmp_path, **kw), train_dataset=data, processing_class=tok, **trainer_kw)


@pytest.fixture
def reward_model(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_reward_model

    return build_reward_model(tiny_tokenizer, seed=1)


# ---------------------------------------------------------------------------- construction
def test_signature_is_trls_plus_allow_experimental():
    import inspect

    from trl import RewardTrainer as TRLRewardTrainer

    from posttrain.methods.reward import RewardTrainer

    ours = list(inspect.signature(RewardTrainer.__init__).parameters)
    assert ours == list(inspect.signature(TRLRewardTrainer.__init__).parameters) + ["allow_experimental"]


def test_every_trl_config_field_exists_with_trls_default():
    import dataclasses

    import transformers
    from trl import RewardConfig as TRLRewardConfig

    from posttrain.methods.reward import RewardConfig

    ours = {f.name: f for f in dataclasses.fields(RewardConfig)}
    ta = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    for f in dataclasses.fields(TRLRewardConfig):
        assert f.name in ours, f.name
        if f.name not in ta or f.name in ("learning_rate", "gradient_checkpointing", "logging_steps"):
            assert ours[f.name].default == f.default, f.name


def test_training_arguments_are_converted_like_trl(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from transformers import TrainingArguments

    from posttrain.methods.reward import RewardConfig, RewardTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "ta"), learning_rate=3e-4, per_device_train_batch_size=4, report_to="none")
    trainer = RewardTrainer(model=reward_model, args=args, train_dataset=tiny_datasets["preference"], processing_class=tiny_tokenizer)
    assert type(trainer.args) is RewardConfig
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size, trainer.args.max_length) == (3e-4, 4, 1024)


def test_default_output_dir_and_tags_are_trls(tiny_model_dir, tiny_datasets):
    from posttrain.methods.reward import RewardTrainer

    trainer = RewardTrainer(model=tiny_model_dir, train_dataset=tiny_datasets["preference"])
    assert trainer.args.output_dir == f"{tiny_model_dir.rstrip('/').split('/')[-1]}-Reward"
    assert {"trl", "reward-trainer"} <= set(trainer.model.model_tags)


# ---------------------------------------------------------------------------- datasets
def test_train_and_eval_datasets_are_datasets_and_iterable_input_is_read_once(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from datasets import Dataset

    data = tiny_datasets["preference"]
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, data.to_iterable_dataset(), eval_dataset={"x": data.to_iterable_dataset()})
    reference = _trainer(tmp_path, copy.deepcopy(reward_model), tiny_tokenizer, data)
    assert isinstance(trainer.train_dataset, Dataset) and isinstance(trainer.eval_dataset["x"], Dataset)
    assert list(trainer.train_dataset) == list(reference.train_dataset) == list(trainer.eval_dataset["x"])


@pytest.mark.parametrize("columns", [("chosen_ids", "rejected_ids"), ("chosen_input_ids", "rejected_input_ids")])
def test_pretokenized_pairs_are_used_as_given(tmp_path, reward_model, tiny_tokenizer, tiny_datasets, columns, recwarn):
    from datasets import Dataset

    reference = _trainer(tmp_path, copy.deepcopy(reward_model), tiny_tokenizer, tiny_datasets["preference"])
    rows = list(reference.train_dataset)
    ids = Dataset.from_list([{columns[0]: r["chosen_ids"], columns[1]: r["rejected_ids"]} for r in rows])
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, ids)
    legacy = [w for w in recwarn if issubclass(w.category, FutureWarning) and "will not be supported in v1" in str(w.message)]
    assert len(legacy) == (columns[0] == "chosen_input_ids")
    assert trainer.train_dataset.column_names == ["chosen_ids", "rejected_ids"] and list(trainer.train_dataset) == rows


def test_trls_collator_can_be_passed_as_data_collator(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from trl.trainer.reward_trainer import DataCollatorForPreference

    data = tiny_datasets["preference"].add_column("margin", [0.5] * 16)
    ours = _trainer(tmp_path, reward_model, tiny_tokenizer, data)
    theirs = _trainer(tmp_path, copy.deepcopy(reward_model), tiny_tokenizer, data, data_collator=DataCollatorForPreference(pad_token_id=tiny_tokenizer.pad_token_id))
    rows = list(ours.train_dataset.select(range(4)))
    a, b = ours.collate(rows), theirs.data_collator(rows)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["margin"], b["margin"])
    torch.testing.assert_close(ours.compute_loss(ours.model, a, 4)[0], theirs.compute_loss(theirs.model, b, 4)[0])


def test_a_peft_model_with_a_peft_config_is_refused(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS")
    with pytest.raises(ConfigError, match="model is already a PeftModel and peft_config was given: merge and unload"):
        _trainer(tmp_path, get_peft_model(reward_model, lora), tiny_tokenizer, tiny_datasets["preference"], peft_config=lora)


def test_a_collator_without_input_ids_is_rejected(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], data_collator=lambda rows: {"ids": None})
    with pytest.raises(ConfigError, match="data_collator returned keys \\['ids'\\]"):
        trainer.collate(list(trainer.train_dataset.select(range(2))))


def test_chat_template_path_from_a_jinja_file(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    tok = copy.deepcopy(tiny_tokenizer)
    trainer = _trainer(tmp_path, reward_model, tok, tiny_datasets["conversational_preference"], chat_template_path=str(path))
    assert trainer.processing_class.chat_template == template
    first = tiny_datasets["conversational_preference"][0]
    assert trainer.train_dataset[0]["chosen_ids"] == tok(f"[user]{first['prompt'][0]['content']}[assistant]{first['chosen'][0]['content']}")["input_ids"]


def test_chat_template_path_from_another_tokenizer_copies_template_tokens_and_eos(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    donor = copy.deepcopy(tiny_tokenizer)
    donor.chat_template = "{% for m in messages %}<|turn|>{{ m['content'] }}{% endfor %}<|end|>"
    donor.add_special_tokens({"eos_token": "<|end|>", "additional_special_tokens": ["<|turn|>"]})
    donor.save_pretrained(tmp_path / "donor")
    tok = copy.deepcopy(tiny_tokenizer)
    rows_before = reward_model.get_input_embeddings().weight.shape[0]
    trainer = _trainer(tmp_path, reward_model, tok, tiny_datasets["conversational_preference"], chat_template_path=str(tmp_path / "donor"))
    assert trainer.processing_class.chat_template == donor.chat_template and trainer.processing_class.eos_token == "<|end|>"
    assert trainer.model.get_input_embeddings().weight.shape[0] == len(tok) == rows_before + 2
    assert trainer.model.config.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    assert trainer.train_dataset[0]["chosen_ids"][-1] == tok.convert_tokens_to_ids("<|end|>")


# ---------------------------------------------------------------------------- metrics, evaluation, callbacks
def test_evaluate_reports_exact_metrics_for_a_raw_dataset_and_a_dict_of_them(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["preference"]
    # float64: evaluate() pads batches of 3, the check below one batch of 16; the other summation orders then cost ~1e-16,
    # so the tolerances below hold anywhere and no pair's chosen > rejected can flip on rounding
    trainer = _trainer(tmp_path, reward_model.double(), tiny_tokenizer, data, per_device_eval_batch_size=3)
    single = trainer.evaluate(eval_dataset=data)
    both = trainer.evaluate(eval_dataset={"a": data, "b": data.select(range(5))})
    rows = list(trainer.process_dataset(data, "eval_dataset"))
    batch = trainer.collate(rows)
    with torch.no_grad():
        _, chosen, rejected = trainer._rewards(trainer.model.to(trainer.loop.device).eval(), trainer.loop.to_device(batch))
    rewards = torch.cat([chosen, rejected])
    assert single["eval_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert single["eval_min_reward"] == pytest.approx(float(rewards.min()), rel=1e-10) and single["eval_max_reward"] == pytest.approx(float(rewards.max()), rel=1e-10)
    # evaluate() accumulates its sums in float32: the margin, a mean of differences of rewards of magnitude <= max|reward|, is
    # off by a few float32 ulps of those (eps32 = 1.2e-7); 1e-6 * max|reward| bounds it (measured 1e-10 for rewards ~0.1)
    assert single["eval_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=0, abs=1e-6 * float(rewards.abs().max()))
    for key in ("loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert both[f"eval_a_{key}"] == pytest.approx(single[f"eval_{key}"], rel=1e-6), key
    assert "eval_b_loss" in both


def test_compute_metrics_gets_chosen_and_rejected_scores(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    import numpy as np

    seen = {}

    def compute_metrics(prediction):
        seen["predictions"], seen["labels"] = prediction.predictions, prediction.label_ids
        return {"accuracy_from_argmax": float((np.argmax(prediction.predictions, axis=1) == prediction.label_ids).mean())}

    data = tiny_datasets["preference"]
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, data, eval_dataset=data, compute_metrics=compute_metrics,
                       preprocess_logits_for_metrics=lambda scores, labels: scores * 2)
    metrics = trainer.evaluate()
    assert seen["predictions"].shape == (16, 2) and seen["labels"].tolist() == [0] * 16
    assert metrics["eval_accuracy_from_argmax"] == pytest.approx(metrics["eval_accuracy"])
    assert float(seen["predictions"][:, 0].mean()) == pytest.approx(2 * metrics["eval_rewards/chosen"], rel=1e-5)


def test_training_logs_trls_metric_names(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], max_steps=1, per_device_train_batch_size=4)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "accuracy", "margin", "mean_reward", "min_reward", "max_reward", "num_tokens"} <= set(logged)
    assert logged["min_reward"] <= logged["mean_reward"] <= logged["max_reward"]


def test_callbacks_see_every_step_and_log_and_the_summary_row_ends_the_history(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], callbacks=[recorder], max_steps=3, per_device_train_batch_size=4)
    trainer.train()
    assert recorder.steps == [1, 2, 3]
    assert [log["loss"] for log in recorder.logs if "loss" in log] == [row["loss"] for row in trainer.state.log_history if "loss" in row]
    summary = trainer.state.log_history[-1]
    assert {"train_runtime", "train_loss", "train_samples_per_second"} <= set(summary) and summary["step"] == 3


# ---------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"pad_to_multiple_of": "eight"}, "pad_to_multiple_of='eight'"), ({"model_init_kwargs": "{oops"}, "model_init_kwargs=")],
)
def test_config_rejects_invalid_value(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **overrides)


def test_config_resolves_trls_string_values_and_warns_on_the_deprecated_pad_token(tmp_path):
    config = _config(tmp_path, pad_to_multiple_of="8", model_init_kwargs='{"dtype": "float32"}')
    assert (config.pad_to_multiple_of, config.model_init_kwargs, _config(tmp_path).pad_to_multiple_of) == (8, {"dtype": "float32"}, None)
    with pytest.warns(FutureWarning, match="pad_token is deprecated"):
        _config(tmp_path, pad_token="<|endoftext|>")


def test_train_dataset_is_required(tmp_path, reward_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="`train_dataset` is required"):
        _trainer(tmp_path, reward_model, tiny_tokenizer, None)


@pytest.mark.parametrize("argument", ["optimizers", "optimizer_cls_and_kwargs"])
def test_custom_optimizers_are_refused_with_the_alternative(tmp_path, reward_model, tiny_tokenizer, tiny_datasets, argument):
    value = (torch.optim.SGD(reward_model.parameters(), lr=0.1), None) if argument == "optimizers" else (torch.optim.SGD, {"lr": 0.1})
    with pytest.raises(ConfigError, match=f"{argument}= is not supported.*optim_args"):
        _trainer(tmp_path, reward_model, tiny_tokenizer, tiny_datasets["preference"], **{argument: value})


def test_pad_token_outside_the_vocabulary_is_rejected(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="pad_token='<nope>' is not in the tokenizer's vocabulary"):
        _trainer(tmp_path, reward_model, copy.deepcopy(tiny_tokenizer), tiny_datasets["preference"], pad_token="<nope>")


def test_missing_chosen_value_names_the_row(tmp_path, reward_model, tiny_tokenizer):
    data = [{"chosen": " a", "rejected": " b"}, {"chosen": None, "rejected": " c"}]
    with pytest.raises(ConfigError, match="train_dataset row 1, column 'chosen': missing value"):
        _trainer(tmp_path, reward_model, tiny_tokenizer, data)


def test_tools_column_reaches_the_chat_template_as_json_or_as_a_list(tmp_path, reward_model, tiny_tokenizer, tiny_datasets):
    import json

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }}{% endfor %}]{% endif %}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {"type": "object", "properties": {}}}}
    base = tiny_datasets["conversational_preference"].select(range(4))
    as_json = base.add_column("tools", [json.dumps([tool])] * 4)
    as_list = [{**row, "tools": [tool]} for row in base]
    a = _trainer(tmp_path, reward_model, tok, as_json)
    b = _trainer(tmp_path, copy.deepcopy(reward_model), tok, as_list)
    assert list(a.train_dataset) == list(b.train_dataset)
    assert tok.decode(a.train_dataset[0]["chosen_ids"]).startswith("[tools:add]<user>")
