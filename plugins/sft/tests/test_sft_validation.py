"""Each invalid setting or row raises a ConfigError that names the field or row and the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
from datasets import Dataset

from posttrain import ConfigError
from posttrain_sft import SFTConfig, SFTTrainer


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"loss_type": "focal"}, "loss_type='focal' is invalid"),
        ({"packing_strategy": "first_fit"}, "packing_strategy='first_fit' is invalid"),
        ({"max_length": 1}, "max_length=1 is invalid"),
        ({"packing": True, "max_length": None}, "packing needs max_length"),
        ({"eval_packing": True, "max_length": None}, "packing needs max_length"),
        ({"dataset_text_field": ""}, "dataset_text_field is empty"),
        ({"truncation_mode": "middle"}, "truncation_mode='middle' is invalid"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of=0 is invalid"),
        ({"pad_to_multiple_of": "eight"}, "pad_to_multiple_of='eight' is invalid"),
        ({"dataset_kwargs": {"skip_prepare": True}}, r"dataset_kwargs has unknown keys \['skip_prepare'\]"),
        ({"dataset_kwargs": "{not json"}, "dataset_kwargs='{not json' is not valid JSON"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef=-1.0 is invalid"),
        ({"gradient_checkpointing_kwargs": {"selective": True}}, r"gradient_checkpointing_kwargs=\{'selective': True\}.*not offered: drop"),
    ],
)
def test_config_rejects_invalid_value(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SFTConfig(**overrides)


def _trainer(tiny_model, tokenizer, make_config, data, **overrides):
    return SFTTrainer(model=tiny_model, args=make_config(**overrides), train_dataset=data, processing_class=tokenizer)


def test_trainer_rejects_unknown_columns(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match=r"columns \['answer', 'question'\].*'messages'"):
        _trainer(tiny_model, tiny_tokenizer, make_config, Dataset.from_dict({"question": ["a"], "answer": ["b"]}))


def test_trainer_rejects_empty_dataset(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match="train_dataset is empty"):
        _trainer(tiny_model, tiny_tokenizer, make_config, Dataset.from_dict({"text": []}))


def test_trainer_rejects_missing_dataset(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        _trainer(tiny_model, tiny_tokenizer, make_config, None)


def test_trainer_rejects_non_string_text_naming_the_row(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match="train_dataset row 1: 'text' is NoneType"):
        _trainer(tiny_model, tiny_tokenizer, make_config, [{"text": "hello"}, {"text": None}])


def test_trainer_rejects_conversation_without_assistant(tiny_model, tiny_tokenizer, make_config):
    data = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, {"messages": [{"role": "user", "content": "hi"}]}]
    with pytest.raises(ConfigError, match="train_dataset row 1: assistant_only_loss=True but the conversation has no assistant turn"):
        _trainer(tiny_model, tiny_tokenizer, make_config, data, assistant_only_loss=True)


def test_trainer_rejects_template_that_is_not_prefix_preserving_without_markers(tiny_model, tiny_tokenizer, make_config):
    """Without {% generation %} markers, a template that renders an earlier turn differently once more turns follow is refused."""
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if loop.last %} (last){% endif %}<|im_end|>\n{%- endfor %}"
        "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
    )
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and"}, {"role": "assistant", "content": "so"}]
    with pytest.raises(ConfigError, match="train_dataset row 0: assistant_only_loss=True and the chat template has no .* renders turn 1 differently"):
        _trainer(tiny_model, tokenizer, make_config, [{"messages": turns}], assistant_only_loss=True)


def test_trainer_rejects_completion_only_loss_without_prompt_completion(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="completion_only_loss=True needs prompt/completion data"):
        _trainer(tiny_model, tiny_tokenizer, make_config, tiny_datasets["text"], completion_only_loss=True)


def test_trainer_rejects_assistant_only_loss_on_text(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="assistant_only_loss=True needs conversational data"):
        _trainer(tiny_model, tiny_tokenizer, make_config, tiny_datasets["text"], assistant_only_loss=True)


def test_trainer_rejects_mixed_prompt_completion_types(tiny_model, tiny_tokenizer, make_config):
    data = [{"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"}]
    with pytest.raises(ConfigError, match="row 0: 'prompt' and 'completion' must both be strings or both be message lists"):
        _trainer(tiny_model, tiny_tokenizer, make_config, data)


def test_trainer_rejects_malformed_messages(tiny_model, tiny_tokenizer, make_config):
    with pytest.raises(ConfigError, match="row 0: 'messages' must be a non-empty list"):
        _trainer(tiny_model, tiny_tokenizer, make_config, [{"messages": [{"text": "hi"}]}])


def test_trainer_rejects_dataset_truncated_to_no_labels(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    with pytest.raises(ConfigError, match="no label token after truncation to max_length=2"):
        _trainer(tiny_model, tiny_tokenizer, make_config, tiny_datasets["prompt_completion"], max_length=2)


def test_trainer_rejects_a_peft_model_with_a_peft_config(tiny_model, tiny_tokenizer, tiny_datasets, make_config):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"model is already a PeftModel and peft_config was given: merge and unload"):
        SFTTrainer(model=get_peft_model(tiny_model, lora), args=make_config(), train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer, peft_config=lora)


def test_trainer_rejects_wrong_args_type(tiny_model, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="args is a str: pass a SFTConfig"):
        SFTTrainer(model=tiny_model, args="sft.yaml", train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer)


def test_trainer_converts_plain_training_arguments_like_trl(tiny_model, tiny_tokenizer, tiny_datasets, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=1, report_to="none")
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer)
    assert type(trainer.args).__name__ == "SFTConfig"
    assert (trainer.args.learning_rate, trainer.args.output_dir, trainer.args.max_length) == (3e-4, str(tmp_path), 1024)


def test_spec_module_imports_no_torch():
    code = "import sys, posttrain_sft._spec, posttrain_sft.config; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
