"""RLOO's TRL surface: TrainingArguments, evaluate(), callbacks, log_history, data formats, TRL 1.16's extra features and their errors.

The plumbing shared with GRPO (``# Copied from`` blocks) is tested in depth by GRPO's test_grpo_trl_surface.py;
these tests check it works on RLOO's loss and advantages too.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from rloo_helpers import FixedBackend, low_token_fraction

from posttrain import ConfigError, RolloutEngine
from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.trainer import RLOOTrainer


def _config(tmp_path, **overrides) -> RLOOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none",
                  gradient_checkpointing=False)
    values.update(overrides)
    return RLOOConfig(**values)


def _trainer(tiny_model, tiny_tokenizer, data, tmp_path, reward_funcs=low_token_fraction, engine=None, **overrides):
    return RLOOTrainer(model=tiny_model, reward_funcs=reward_funcs, args=_config(tmp_path, **overrides), train_dataset=data,
                       processing_class=tiny_tokenizer, rollout_engine=engine)


def test_training_arguments_are_converted_like_trl(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=1, report_to="none")
    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert type(trainer.args) is RLOOConfig
    assert (trainer.args.learning_rate, trainer.args.output_dir, trainer.args.beta) == (3e-4, str(tmp_path), 0.05)
    assert {"trl", "rloo"} <= set(trainer.model.model_tags)


def test_evaluate_a_dataset_and_a_dict_of_datasets(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, per_device_eval_batch_size=2)
    metrics = trainer.evaluate(eval_dataset=prompt_dataset.select(range(4)))
    assert {"eval_loss", "eval_reward", "eval_kl", "eval_rewards/low_token_fraction/mean"} <= set(metrics)
    both = trainer.evaluate(eval_dataset={"a": prompt_dataset.select(range(2)), "b": prompt_dataset.select(range(2, 4))})
    assert {"eval_a_loss", "eval_b_loss", "eval_a_reward", "eval_b_reward"} <= set(both)


def test_callbacks_and_summary_row(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset,
                          processing_class=tiny_tokenizer, callbacks=[recorder])
    trainer.train()
    assert recorder.steps == [1, 2] and len(recorder.logs) == 3
    last = trainer.state.log_history[-1]
    assert {"train_runtime", "train_loss"} <= set(last)
    assert last["rewards/low_token_fraction/mean"] == trainer.state.log_history[-2]["rewards/low_token_fraction/mean"]
    assert last["kl"] == trainer.state.log_history[-2]["kl"]


def test_pre_tokenized_prompt_ids_and_iterable_dataset(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset, IterableDataset

    ids = [tiny_tokenizer(f"what is {i} + {i}")["input_ids"] for i in range(8)]
    trainer = _trainer(tiny_model, tiny_tokenizer, Dataset.from_dict({"prompt_ids": ids}), tmp_path, max_steps=1)
    trainer.train()
    assert trainer._prompt_ids(trainer.train_dataset[1]) == ids[1]
    stream = IterableDataset.from_generator(lambda: ({"prompt": f"prompt {i}"} for i in range(1000)))
    trainer = _trainer(copy.deepcopy(tiny_model), tiny_tokenizer, stream, tmp_path, max_steps=2)
    assert len(trainer.train_dataset) == 2 * 2


def test_frac_reward_zero_std_is_per_group(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["constant reward", "varied reward"], "kind": ["constant", "varied"]})

    def reward(completion_ids, kind, **kwargs):
        return [1.0 if k == "constant" else float(len(c)) + 0.1 * i for i, (c, k) in enumerate(zip(completion_ids, kind))]

    trainer = _trainer(tiny_model, tiny_tokenizer, data, tmp_path, reward_funcs=reward, engine=RolloutEngine(FixedBackend()))
    batch = trainer._generate_and_score([data[0], data[1]], trainer.args.seed)[0]
    assert batch["rollout_metric_values"][batch["rollout_metric_names"].index("frac_reward_zero_std")].item() == 0.5


def test_sync_ref_model_mixes_the_policy_into_the_reference(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, sync_ref_model=True, ref_model_sync_steps=1,
                       ref_model_mixup_alpha=0.5, max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, p in trainer.ref_model.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[name] + 0.5 * policy[name].detach())


def test_pad_to_multiple_of_and_generation_kwargs(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.warns(UserWarning, match=r"generation_kwargs \['length_penalty'\] are ignored"):
        trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, pad_to_multiple_of=16,
                           generation_kwargs={"top_p": 0.9, "length_penalty": -0.1})
    batch = trainer._generate_and_score([prompt_dataset[i] for i in range(2)], trainer.args.seed)[0]
    assert batch["prompt_ids"].shape[1] % 16 == 0 and batch["completion_ids"].shape[1] % 16 == 0
    assert trainer._sampling["top_p"] == 0.9


def test_all_none_rewards_warn(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, caplog):
    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, reward_funcs=none_reward, max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(steps_per_generation=3), "steps_per_generation=3 is not offered"),
        (dict(pad_to_multiple_of=-8), "pad_to_multiple_of=-8 is invalid"),
        (dict(ref_model_mixup_alpha=-0.1), "ref_model_mixup_alpha=-0.1 is invalid"),
        (dict(ref_model_sync_steps=0), "ref_model_sync_steps=0 is invalid"),
        (dict(auto_find_batch_size=True), "auto_find_batch_size=True is not supported by RLOO"),
        (dict(num_generations_eval=0), "num_generations_eval=0 is invalid"),
        (dict(vllm_model_impl="hf"), "vllm_model_impl='hf' is invalid"),
    ],
)
def test_new_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_dataset=None), "`train_dataset` is required"),
        (dict(optimizers=(object(), None)), r"optimizers=\(optimizer, scheduler\) is not supported"),
        (dict(reward_funcs=[low_token_fraction], reward_processing_classes=[None, None]), r"reward processing classes \(2\) must match"),
    ],
)
def test_trainer_argument_errors(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, kwargs, match):
    values = dict(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    values.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        RLOOTrainer(**values)


def test_sync_ref_model_without_a_reference_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="sync_ref_model=True but beta=0.0"):
        _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, sync_ref_model=True, beta=0.0)


def test_duplicate_reward_function_names_get_suffixes(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, reward_funcs=[low_token_fraction, low_token_fraction])
    assert trainer.reward_func_names == ["low_token_fraction", "low_token_fraction_2"]
    assert trainer.reward_processing_classes == [None, None] and trainer.reward_weights.tolist() == [1.0, 1.0]
