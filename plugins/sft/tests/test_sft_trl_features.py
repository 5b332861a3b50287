"""TRL 1.16 features of SFTTrainer: data as TRL accepts it, the trainer surface, and the SFTConfig fields beyond the basics."""

from __future__ import annotations

import copy
import json
import warnings

import datasets
import pytest
import torch
from datasets import Dataset

from posttrain import ConfigError
from posttrain_sft import SFTConfig, SFTTrainer
from posttrain_sft.trainer import IGNORE_INDEX


def _trainer(model, tokenizer, args, data, **kwargs):
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)


def _loss(trainer, rows):
    batch = trainer.collate(list(rows))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch, trainer.count_items(batch))[0]


# ====================================================================== datasets as TRL accepts them
def test_processed_datasets_are_datasets_and_iterable_input_is_materialized(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["messages"]
    eager = _trainer(tiny_model, tiny_tokenizer, make_config(), data, eval_dataset={"a": data, "b": data.to_iterable_dataset()})
    streamed = _trainer(copy.deepcopy(tiny_model), tiny_tokenizer, make_config(), data.to_iterable_dataset())
    assert isinstance(eager.train_dataset, Dataset) and isinstance(streamed.train_dataset, Dataset)
    assert streamed.train_dataset[:] == eager.train_dataset[:]
    assert set(eager.eval_dataset) == {"a", "b"} and eager.eval_dataset["b"][:] == eager.train_dataset[:]


def test_pretokenized_rows_keep_labels_or_build_them_from_masks(tiny_model, tiny_tokenizer, make_config):
    data = Dataset.from_list(
        [
            {"input_ids": [5, 6, 7, 8], "attention_mask": [1, 1, 1, 1], "labels": [5, -100, 7, -100], "assistant_masks": [1, 1, 1, 1]},
            {"input_ids": [9, 10, 11], "attention_mask": [1, 1, 1], "labels": None, "assistant_masks": [0, 1, 1]},
        ]
    )
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), data)
    assert trainer.train_dataset[:]["labels"] == [[5, -100, 7, -100], [-100, 10, 11]]
    masked = Dataset.from_list([{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1]}])
    everything = _trainer(tiny_model, tiny_tokenizer, make_config(), masked)  # completion_mask applies only with completion_only_loss=True
    completion_only = _trainer(tiny_model, tiny_tokenizer, make_config(completion_only_loss=True), masked)
    assert everything.train_dataset[0]["labels"] == [5, 6, 7, 8]
    assert completion_only.train_dataset[0]["labels"] == [-100, -100, 7, 8]


def test_pretokenized_rows_are_truncated_and_fully_masked_rows_dropped(tiny_model, tiny_tokenizer, make_config):
    data = Dataset.from_list([{"input_ids": [1, 2, 3, 4, 5], "assistant_masks": [0, 0, 0, 1, 1]}, {"input_ids": [6, 7, 8, 9], "assistant_masks": [1, 1, 1, 1]}])
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        trainer = _trainer(tiny_model, tiny_tokenizer, make_config(max_length=3), data)
    assert trainer.train_dataset[:]["labels"] == [[6, 7, 8]]


def test_pretokenized_mask_of_another_length_is_refused(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match="train_dataset row 1: 'assistant_masks' has a different length than 'input_ids' \\(3\\)"):
        _trainer(tiny_model, tiny_tokenizer, make_config(), [{"input_ids": [1, 2], "assistant_masks": [1, 1]}, {"input_ids": [1, 2, 3], "assistant_masks": [1]}])


def test_completion_only_loss_on_pretokenized_data_needs_a_completion_mask(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match="completion_only_loss=True needs prompt/completion data \\(or a pre-tokenized completion_mask column\\)"):
        _trainer(tiny_model, tiny_tokenizer, make_config(completion_only_loss=True), [{"input_ids": [1, 2, 3]}])


def test_skip_prepare_dataset_uses_rows_as_given(tiny_model, tiny_tokenizer, make_config):
    rows = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}] * 4)
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(dataset_kwargs={"skip_prepare_dataset": True}, max_length=2, max_steps=1), rows)
    assert trainer.train_dataset is rows  # not truncated, not copied
    assert trainer.train().global_step == 1


def test_skip_prepare_dataset_refuses_masks_without_labels(tiny_model, tiny_tokenizer, make_config):
    rows = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "assistant_masks": [0, 0, 1, 1]}] * 2)
    with pytest.raises(ValueError, match="mask columns \\['assistant_masks'\\] but no 'labels'.*Add a 'labels' column"):
        _trainer(tiny_model, tiny_tokenizer, make_config(dataset_kwargs={"skip_prepare_dataset": True}), rows)


def test_with_transform_needs_skip_prepare_dataset(tiny_model, tiny_tokenizer, make_config):
    def tokenized(batch):
        return {"input_ids": [[1, 2, 3]] * len(batch["text"]), "labels": [[1, 2, 3]] * len(batch["text"])}

    data = Dataset.from_dict({"text": ["a", "b"]}).with_transform(tokenized)
    with pytest.raises(ValueError, match=r"Dataset\.with_transform\(\).*skip_prepare_dataset.*trainer-ready"):
        _trainer(tiny_model, tiny_tokenizer, make_config(), data)
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(dataset_kwargs={"skip_prepare_dataset": True}, max_steps=1), data)
    assert trainer.train().global_step == 1


def test_formatting_func_turns_rows_into_text(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["preference"]
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), data, formatting_func=lambda row: f"{row['prompt']}{row['chosen']}")
    first = data[0]
    expected = tiny_tokenizer(first["prompt"] + first["chosen"] + tiny_tokenizer.eos_token)["input_ids"]
    assert trainer.train_dataset[0]["input_ids"] == expected == trainer.train_dataset[0]["labels"]


def test_formatting_func_must_return_a_string(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="train_dataset row 0: formatting_func returned a list"):
        _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["preference"], formatting_func=lambda row: [row["prompt"]])
    with pytest.raises(ConfigError, match="formatting_func=... turns the rows into language-modeling text.*completion_only_loss=True"):
        _trainer(tiny_model, tiny_tokenizer, make_config(completion_only_loss=True), tiny_datasets["preference"], formatting_func=lambda row: row["prompt"])


def test_sharegpt_conversations_equal_messages(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["messages"]
    sharegpt = data.map(lambda row: {"conversations": [{"from": m["role"], "value": m["content"]} for m in row["messages"]]}, remove_columns="messages")
    ours = _trainer(tiny_model, tiny_tokenizer, make_config(assistant_only_loss=True), sharegpt)
    reference = _trainer(tiny_model, tiny_tokenizer, make_config(assistant_only_loss=True), data)
    assert ours.train_dataset[:] == reference.train_dataset[:]


def test_row_tools_and_chat_template_kwargs_reach_the_template(tiny_model, tiny_tokenizer, make_config):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{%- if tools %}<|im_start|>system\n{{ tools | length }} tools<|im_end|>\n{% endif %}"
        "{%- for m in messages %}<|im_start|>{{ m['role'] | upper if shout else m['role'] }}\n{{ m['content'] or '' }}"
        "{%- for call in m['tool_calls'] or [] %}call {{ call['function']['name'] }}{%- endfor %}<|im_end|>\n{% endfor %}"
    )
    tool = {"type": "function", "function": {"name": "timer", "description": "set a timer", "parameters": {"type": "object", "properties": {}}}}
    call = [{"type": "function", "function": {"name": "timer", "arguments": {}}}]
    rows = [
        {"messages": [{"role": "user", "content": "hi", "tool_calls": None}, {"role": "assistant", "content": None, "tool_calls": call}],
         "tools": json.dumps([tool]), "chat_template_kwargs": {"shout": True}},
        {"messages": [{"role": "user", "content": "hi", "tool_calls": None}, {"role": "assistant", "content": "yo", "tool_calls": None}],
         "tools": None, "chat_template_kwargs": {"shout": False}},
    ]
    trainer = _trainer(tiny_model, tokenizer, make_config(), rows)
    texts = [tokenizer.decode(row["input_ids"]) for row in trainer.train_dataset]
    assert texts[0] == "<|im_start|>system\n1 tools<|im_end|>\n<|im_start|>USER\nhi<|im_end|>\n<|im_start|>ASSISTANT\ncall timer<|im_end|>\n"
    assert texts[1] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"


def test_assistant_mask_without_generation_markers_matches_the_markers(tiny_model, tiny_tokenizer, make_config):
    """Turn-by-turn rendering finds the same assistant tokens as the {% generation %} markers, plus the newline after <|im_end|>."""
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 2"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "and 3 + 3"}, {"role": "assistant", "content": "6"}]
    marked = _trainer(tiny_model, tiny_tokenizer, make_config(assistant_only_loss=True), [{"messages": turns}]).train_dataset[0]
    by_turns = _trainer(tiny_model, tokenizer, make_config(assistant_only_loss=True), [{"messages": turns}]).train_dataset[0]
    assert by_turns["input_ids"] == marked["input_ids"]
    newline, end = tiny_tokenizer.convert_tokens_to_ids(tiny_tokenizer.tokenize("\n"))[0], tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    extra = [i for i, (a, b) in enumerate(zip(by_turns["labels"], marked["labels"])) if a != b]
    assert len(extra) == 2 and all(marked["labels"][i] == IGNORE_INDEX and marked["input_ids"][i] == newline and marked["input_ids"][i - 1] == end for i in extra)


# ====================================================================== truncation and packing
def test_truncation_mode_keep_end_keeps_the_last_tokens(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["text"]
    with pytest.warns(FutureWarning, match="truncation_mode='keep_end' is deprecated"):
        args = make_config(max_length=4, truncation_mode="keep_end")
    trainer = _trainer(tiny_model, tiny_tokenizer, args, data)
    assert trainer.train_dataset[0]["input_ids"] == tiny_tokenizer(data[0]["text"] + tiny_tokenizer.eos_token)["input_ids"][-4:]


def test_wrapped_packing_cuts_the_token_stream_into_full_rows(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["text"]
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(packing=True, packing_strategy="wrapped", max_length=16), data)
    stream = [t for row in data for t in tiny_tokenizer(row["text"] + tiny_tokenizer.eos_token)["input_ids"]]
    rows = trainer.train_dataset
    assert "seq_lengths" not in rows.column_names and [t for ids in rows["input_ids"] for t in ids] == stream
    assert all(len(ids) == 16 for ids in rows["input_ids"][:-1])
    assert "attention_mask" in trainer.collate(list(rows)[:2])  # padded rows, not padding-free


def test_bfd_split_packs_the_pieces_of_over_long_sequences(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["text"]
    split = _trainer(tiny_model, tiny_tokenizer, make_config(packing=True, packing_strategy="bfd_split", max_length=6), data).train_dataset
    truncated = _trainer(tiny_model, tiny_tokenizer, make_config(packing=True, packing_strategy="bfd", max_length=6), data).train_dataset
    total = sum(len(tiny_tokenizer(row["text"] + tiny_tokenizer.eos_token)["input_ids"]) for row in data)
    assert sum(map(sum, split["seq_lengths"])) == total > sum(map(sum, truncated["seq_lengths"]))
    assert all(sum(lengths) <= 6 and max(lengths) <= 6 for lengths in split["seq_lengths"])


def test_eval_packing_false_leaves_eval_rows_unpacked(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["text"]
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(packing=True, max_length=64, eval_packing=False), data, eval_dataset=data)
    assert "seq_lengths" in trainer.train_dataset.column_names and len(trainer.train_dataset) < len(data)
    assert "seq_lengths" not in trainer.eval_dataset.column_names and len(trainer.eval_dataset) == len(data)
    assert set(trainer.evaluate()) >= {"eval_loss", "eval_mean_token_accuracy"}


def test_shuffle_dataset_reorders_the_rows(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["text"]
    plain = _trainer(tiny_model, tiny_tokenizer, make_config(), data).train_dataset["input_ids"]
    shuffled = _trainer(tiny_model, tiny_tokenizer, make_config(shuffle_dataset=True), data).train_dataset["input_ids"]
    assert shuffled != plain and sorted(shuffled) == sorted(plain)


@pytest.mark.parametrize("layout", [{}, {"padding_free": True, "max_length": None}])
def test_pad_to_multiple_of_pads_without_changing_the_loss(tiny_model, tiny_tokenizer, tiny_datasets, make_config, layout):
    data = tiny_datasets["messages"]
    tiny_model.double()  # the padded shapes change the summation order: float64 keeps that at ~1e-16
    plain = _trainer(tiny_model, tiny_tokenizer, make_config(**layout), data)
    padded = _trainer(tiny_model, tiny_tokenizer, make_config(pad_to_multiple_of=64, **layout), data)
    rows = list(plain.train_dataset)[:3]
    batch = padded.collate(rows)
    assert batch["input_ids"].shape[1] % 64 == 0 and batch["input_ids"].shape[1] > plain.collate(rows)["input_ids"].shape[1]
    assert batch["num_tokens"] == plain.collate(rows)["num_tokens"]
    torch.testing.assert_close(_loss(padded, rows), _loss(plain, rows), rtol=1e-12, atol=0)


def test_padding_free_without_packing_needs_max_length_none(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ValueError, match="`max_length` is not enforced"):
        _trainer(tiny_model, tiny_tokenizer, make_config(padding_free=True, max_length=16), tiny_datasets["text"])


# ====================================================================== loss, metrics and the trainer surface
def test_callbacks_receive_step_and_log_events_and_summary_row_carries_metrics(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(max_steps=3), tiny_datasets["text"], callbacks=[recorder])
    trainer.train()
    assert recorder.steps == [1, 2, 3]
    assert [("loss" in row, "train_loss" in row) for row in recorder.logs] == [(True, False), (False, True)]  # logging_first_step=False, as TRL
    summary, last_log = trainer.state.log_history[-1], trainer.state.log_history[-2]
    assert summary["train_loss"] == pytest.approx(last_log["loss"]) and "train_runtime" in summary
    assert summary["mean_token_accuracy"] == last_log["mean_token_accuracy"] and summary["entropy"] == last_log["entropy"]


def test_evaluate_takes_a_raw_dataset_or_a_dict_of_them(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["prompt_completion"]
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["text"])
    single = trainer.evaluate(eval_dataset=data)
    both = trainer.evaluate(eval_dataset=datasets.DatasetDict({"a": data, "b": data.to_iterable_dataset()}))
    assert both["eval_a_loss"] == pytest.approx(single["eval_loss"]) == pytest.approx(both["eval_b_loss"])
    assert trainer.evaluate(eval_dataset=data, metric_key_prefix="test")["test_loss"] == pytest.approx(single["eval_loss"])


def test_compute_metrics_gets_full_logits_and_labels(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    seen = {}

    def compute_metrics(prediction):
        seen["shapes"] = (prediction.predictions.shape, prediction.label_ids.shape)
        labels = prediction.label_ids[:, 1:]
        keep = labels != -100
        return {"accuracy": float((prediction.predictions[:, :-1] == labels)[keep].mean())}

    data = tiny_datasets["messages"]
    tiny_model.double()  # two argmaxes (full logits vs chunked) agree unless two logits tie to rounding: float64 makes that impossible here
    trainer = _trainer(
        tiny_model, tiny_tokenizer, make_config(per_device_eval_batch_size=5), data, eval_dataset=data,
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(dim=-1),
    )
    metrics = trainer.evaluate()
    longest = max(len(ids) for ids in trainer.eval_dataset["input_ids"])
    assert seen["shapes"] == ((len(data), longest), (len(data), longest))
    assert metrics["eval_accuracy"] == pytest.approx(metrics["eval_mean_token_accuracy"], abs=1e-6)


def test_compute_loss_func_gets_the_model_outputs(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    def token_nll(outputs, labels, num_items_in_batch):
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum") / num_items_in_batch

    data = tiny_datasets["conversational_prompt_completion"]
    tiny_model.double()  # full logits vs chunked scoring: float64 so that a tight tolerance holds on any machine
    with pytest.warns(FutureWarning, match="compute_loss_func is deprecated"):
        custom = _trainer(tiny_model, tiny_tokenizer, make_config(), data, compute_loss_func=token_nll)
    default = _trainer(tiny_model, tiny_tokenizer, make_config(), data)
    rows = list(default.train_dataset)[:4]
    torch.testing.assert_close(_loss(custom, rows), _loss(default, rows), rtol=1e-12, atol=0)


def test_prompt_tuning_loss_reads_logits_after_the_virtual_tokens(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    from peft import PromptTuningConfig, TaskType

    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    tiny_model.double()  # full logits vs chunked scoring: float64 so that a tight tolerance holds on any machine
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["messages"], peft_config=peft_config)
    batch = trainer.collate(list(trainer.train_dataset)[:3])
    with torch.no_grad():
        loss, _ = trainer.compute_loss(trainer.model, batch, trainer.count_items(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 4:]  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_moe_adds_the_weighted_router_aux_loss(tiny_tokenizer, tiny_datasets, make_config):
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8, router_aux_loss_coef=0.5, pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)  # float32: the experts' grouped GEMM has no float64 kernel
    data = tiny_datasets["messages"]
    with_aux = _trainer(model, tiny_tokenizer, make_config(), data)
    assert with_aux.aux_loss_enabled and with_aux.router_aux_loss_coef == 0.5
    rows = list(with_aux.train_dataset)[:4]
    batch = with_aux.collate(rows)
    with torch.no_grad():
        loss, metrics = with_aux.compute_loss(model, batch, with_aux.count_items(batch))
    without = _trainer(model, tiny_tokenizer, make_config(router_aux_loss_coef=0.0), data)
    assert not without.aux_loss_enabled and model.config.output_router_logits is False
    # the same forward on both sides: they differ by the rounding of the final addition (and of kernels that need not be
    # bit-reproducible on an accelerator), a few float32 ulps (eps32 = 1.2e-7) of a loss of ~6, so 1e-5 relative has margin
    torch.testing.assert_close(loss, _loss(without, rows) + 0.5 * metrics["aux_loss"], rtol=1e-5, atol=0)
    assert metrics["aux_loss"] > 0


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.1 but Qwen2ForCausalLM is not a Mixture-of-Experts model"):
        _trainer(tiny_model, tiny_tokenizer, make_config(router_aux_loss_coef=0.1), tiny_datasets["text"])


def test_activation_offloading_gives_the_same_gradients(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    data = tiny_datasets["messages"]
    tiny_model.double()  # the same ops either way, but accelerator kernels need not be bit-reproducible: float64, tight tolerance
    grads = []
    for offload in (False, True):
        trainer = _trainer(copy.deepcopy(tiny_model), tiny_tokenizer, make_config(activation_offloading=offload), data)
        batch = trainer.collate(list(trainer.train_dataset)[:4])
        trainer.compute_loss(trainer.model, batch, trainer.count_items(batch))[0].backward()
        grads.append({n: p.grad for n, p in trainer.model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_data_collator_is_the_collator_in_use(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["messages"])
    rows = list(trainer.train_dataset)[:3]
    batch = trainer.data_collator(rows)  # TRL's attribute: processed rows -> a batch
    assert set(batch) >= {"input_ids", "labels", "attention_mask"} and torch.equal(batch["input_ids"], trainer.collate(rows)["input_ids"])


def test_custom_data_collator_replaces_the_layout(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    calls = []

    def collator(rows):
        calls.append(len(rows))
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.tensor([r["input_ids"] + [0] * (length - len(r["input_ids"])) for r in rows])
        labels = torch.tensor([r["labels"] + [-100] * (length - len(r["labels"])) for r in rows])
        mask = torch.tensor([[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(max_steps=1), tiny_datasets["text"], data_collator=collator)
    assert trainer.data_collator(list(trainer.train_dataset)[:2])["input_ids"].shape[0] == 2 and calls == [2]  # routed through the given collator
    assert trainer.train().global_step == 1 and len(calls) > 1
    with pytest.raises(ConfigError, match="data_collator=... cannot be used with padding-free batches"):
        _trainer(tiny_model, tiny_tokenizer, make_config(packing=True), tiny_datasets["text"], data_collator=collator)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizers": (object(), None)}, "optimizers=\\(optimizer, scheduler\\) is not supported.*set optim"),
        ({"optimizer_cls_and_kwargs": (torch.optim.SGD, {})}, "optimizer_cls_and_kwargs=... is not supported.*set optim"),
        ({"data_collator": "pad"}, "data_collator is a str, not a callable"),
    ],
)
def test_trainer_arguments_that_cannot_apply_are_refused(tiny_model, tiny_tokenizer, tiny_datasets, make_config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["text"], **kwargs)


def test_compute_loss_func_with_dft_is_refused(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ValueError, match="compute_loss_func=... and loss_type='dft' both define the loss"):
        _trainer(tiny_model, tiny_tokenizer, make_config(loss_type="dft"), tiny_datasets["text"], compute_loss_func=lambda *a, **k: 0)


# ====================================================================== model, tokenizer and config
def test_model_tags_name_trl_and_sft(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    trainer = _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["text"])
    assert {"trl", "sft"} <= set(trainer.model.model_tags)


def test_chat_template_path_from_a_jinja_file(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{%- for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{%- endfor %}")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    trainer = _trainer(tiny_model, tokenizer, make_config(chat_template_path=str(template)), tiny_datasets["messages"])
    assert tokenizer.chat_template == template.read_text()
    assert tokenizer.decode(trainer.train_dataset[0]["input_ids"]).startswith("<|im_start|>user: what is")


def test_chat_template_path_clones_a_tokenizer_with_its_tokens(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    source = copy.deepcopy(tiny_tokenizer)
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    source.eos_token = "<|turn|>"
    source.chat_template = "{%- for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|turn|>{%- endfor %}"
    source.save_pretrained(tmp_path / "source")
    tokenizer = copy.deepcopy(tiny_tokenizer)
    trainer = _trainer(tiny_model, tokenizer, make_config(chat_template_path=str(tmp_path / "source"), max_steps=1), tiny_datasets["messages"])
    turn = tokenizer.convert_tokens_to_ids("<|turn|>")
    assert tokenizer.eos_token == "<|turn|>" and tiny_model.config.eos_token_id == turn
    assert tiny_model.get_input_embeddings().weight.shape[0] % 64 == 0 and tiny_model.get_input_embeddings().weight.shape[0] > turn
    assert turn in trainer.train_dataset[0]["input_ids"] and trainer.train().global_step == 1


def test_chat_template_path_that_cannot_be_read_is_refused(tiny_model, tiny_tokenizer, tiny_datasets, make_config, tmp_path):
    with pytest.raises(ConfigError, match="chat_template_path=.*missing.jinja' cannot be read"):
        _trainer(tiny_model, tiny_tokenizer, make_config(chat_template_path=str(tmp_path / "missing.jinja")), tiny_datasets["messages"])


def test_quantization_config_goes_to_from_pretrained_of_a_named_model(tiny_model, tiny_tokenizer, tiny_model_dir, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="quantization_config is set both as a trainer argument and in args.model_init_kwargs"):
        SFTTrainer(model=tiny_model_dir, args=make_config(model_init_kwargs={"quantization_config": {}}), train_dataset=tiny_datasets["text"],
                   quantization_config=object())
    with pytest.warns(UserWarning, match="quantization_config=... is ignored: the model is already instantiated"):
        _trainer(tiny_model, tiny_tokenizer, make_config(), tiny_datasets["text"], quantization_config=object())


def test_use_liger_kernel_keeps_fused_cross_entropy_off(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    args = make_config(use_liger_kernel=True, liger_kernel_config={"rope": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without liger-kernel or CUDA the loop says so and runs the PyTorch layers
        _trainer(tiny_model, tiny_tokenizer, args, tiny_datasets["text"])
    assert args.liger_kernel_config == {"rope": True, "fused_linear_cross_entropy": False}
    with pytest.raises(ConfigError, match="fused_linear_cross_entropy"):
        _trainer(tiny_model, tiny_tokenizer, make_config(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}), tiny_datasets["text"])


def test_trl_deprecated_values_still_work(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.warns(FutureWarning, match="chunked_nll"):
        assert SFTConfig(loss_type="chunked_nll").loss_type == "nll"
    with pytest.warns(FutureWarning, match="bfd-requeue"):
        assert SFTConfig(packing_strategy="bfd-requeue").packing_strategy == "bfd_split"
    tokenizer = copy.deepcopy(tiny_tokenizer)
    with pytest.warns(FutureWarning, match="pad_token is deprecated"):
        args = make_config(pad_token="<|im_start|>")
    trainer = _trainer(tiny_model, tokenizer, args, tiny_datasets["text"])
    assert trainer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_config_has_every_trl_sft_field_with_its_default():
    trl = pytest.importorskip("trl")
    import dataclasses

    import transformers

    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for theirs in dataclasses.fields(trl.SFTConfig):
        if theirs.name in base and theirs.name not in ("learning_rate", "logging_steps", "gradient_checkpointing", "model_init_kwargs"):
            continue
        assert theirs.name in ours, theirs.name
        assert ours[theirs.name].default == theirs.default, theirs.name
    assert SFTConfig().pad_to_multiple_of is None  # 'auto' resolves to None off Neuron, as in TRL
