"""A*-PO trainer: TRL's config fields and defaults, Stage 1 bookkeeping, training, learning, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from a2po_helpers import low_token_fraction

import posttrain
from posttrain import ConfigError, DataError


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("a2po", allow_experimental=True)
    yield


def _classes():
    from posttrain.experimental.a2po import A2POConfig, A2POTrainer

    return A2POConfig, A2POTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_completion_length=6, num_value_samples=4,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none",
                  gradient_checkpointing=False)
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_every_trl_config_field_exists_with_trls_default():
    trl_a2po = pytest.importorskip("trl.experimental.a2po")
    ours = {f.name: f for f in dataclasses.fields(_classes()[0])}

    def default(f):
        return f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)

    missing = [f.name for f in dataclasses.fields(trl_a2po.A2POConfig) if f.name not in ours]
    assert not missing
    differ = {f.name: (default(ours[f.name]), default(f)) for f in dataclasses.fields(trl_a2po.A2POConfig) if default(ours[f.name]) != default(f)}
    assert differ == {"output_dir": ("outputs/run", None), "disable_tqdm": (False, None)}  # posttrain.TrainingConfig's, as for every method


def test_train_logs_trls_metrics_and_changes_the_policy(tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_model

    _, A2POTrainer = _classes()
    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, max_steps=2)
    trainer = A2POTrainer(model=model, reward_funcs=[low_token_fraction], args=args, train_dataset=prompt_dataset, eval_dataset=prompt_dataset.select(range(4)),
                          processing_class=tiny_tokenizer)
    assert len(trainer._optimal_values) == 16  # Stage 1 ran for every distinct prompt (the eval prompts are among them)
    out = trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in model.named_parameters())
    logged = _metrics(args.output_dir)
    assert {"loss", "reward", "v_star", "implicit_reward", "advantage", "kl", "entropy", "completions/mean_length"} <= set(logged[0])
    assert "eval_loss" in out.metrics or "eval_reward" in trainer.evaluate()


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the mean reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps of one sample per prompt."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    _, A2POTrainer = _classes()
    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, max_completion_length=8, max_steps=30, learning_rate=3e-2, beta2=0.05)
    trainer = A2POTrainer(model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer)
    trainer.train()
    rewards = [m["reward"] for m in _metrics(args.output_dir)]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"A2PO learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}")
    assert after > before + 0.08  # measured 0.147 -> 0.275 (one sample per prompt learns slower than GRPO's groups)


def test_resume_reproduces_uninterrupted_losses_and_v_star(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 2, resume: steps 3-4 log the same losses (float64), with V* restored from the checkpoint."""
    import copy

    _, A2POTrainer = _classes()
    tiny_model.double()
    args = _config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4)
    first = A2POTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    first.train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    second = A2POTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    second._optimal_values = {k: v + 1.0 for k, v in second._optimal_values.items()}  # a wrong V*: the checkpoint's must replace it
    second.train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["v_star"] == full[step]["v_star"]
    assert second._optimal_values == first._optimal_values


def test_all_incorrect_prompts_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    _, A2POTrainer = _classes()

    def never(completions, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(DataError, match="filter_all_incorrect=False"):
        A2POTrainer(model=tiny_model, reward_funcs=never, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    trainer = A2POTrainer(model=tiny_model, reward_funcs=never, args=_config(tmp_path, filter_all_incorrect=False), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert len(trainer.train_dataset) == 16 and set(trainer._optimal_values.values()) == {0.0}


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_value_samples=0), "num_value_samples=0 is invalid"),
        (dict(beta1=0.0), "beta1=0.0 is invalid"),
        (dict(beta2=-1.0), "beta2=-1.0 is invalid"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(top_p=0.0), "top_p=0.0 is invalid"),
        (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights has 2 entries but reward_funcs has 1"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_missing_reward_funcs_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    _, A2POTrainer = _classes()
    with pytest.raises(ConfigError, match="A2PO needs reward functions"):
        A2POTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)


def test_dict_of_eval_datasets_prompt_text_keys_and_a_new_eval_dataset(tiny_model, tiny_tokenizer, tmp_path):
    """TRL's eval_dataset forms: a dict of splits gets V* for every split's prompts (keyed by prompt text) and
    metrics per split; a dataset first given to evaluate() before training gets V* then, after training a DataError."""
    from datasets import Dataset, DatasetDict

    _, A2POTrainer = _classes()
    train = Dataset.from_dict({"prompt": ["alpha", "beta", "gamma"]})
    conversational = Dataset.from_dict({"prompt": [[{"role": "user", "content": "delta"}]]})
    evals = DatasetDict({"plain": Dataset.from_dict({"prompt": ["gamma", "epsilon"]}), "chat": conversational})
    args = _config(tmp_path, per_device_train_batch_size=2, max_steps=1, num_value_samples=2, filter_all_incorrect=False)
    trainer = A2POTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=args, train_dataset=train, eval_dataset=evals, processing_class=tiny_tokenizer)
    chat_text = tiny_tokenizer.apply_chat_template(conversational[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert set(trainer.eval_dataset) == {"plain", "chat"}
    assert set(trainer._optimal_values) == {"alpha", "beta", "gamma", "epsilon", chat_text}  # 'gamma' (train and eval) estimated once
    metrics = trainer.evaluate()
    assert {"eval_plain_loss", "eval_chat_loss", "eval_plain_v_star"} <= set(metrics)
    fresh = trainer.evaluate(eval_dataset=Dataset.from_dict({"prompt": ["zeta"]}))  # before training: Stage 1 samples the reference
    assert "eval_loss" in fresh and "zeta" in trainer._optimal_values
    trainer.train()
    with pytest.raises(DataError, match="pass this dataset as eval_dataset"):
        trainer.evaluate(eval_dataset=Dataset.from_dict({"prompt": ["eta"]}))


def test_output_dir_is_positional_as_in_trl(tmp_path):
    """TRL's configs (TrainingArguments) take output_dir as their first positional argument; the rest stays keyword-only."""
    import inspect

    Config = _classes()[0]
    args = Config(str(tmp_path / "pos"), beta1=0.25)
    assert args.output_dir == str(tmp_path / "pos") and (args.beta1, args.beta2) == (0.25, 1e-3)
    assert list(inspect.signature(Config).parameters)[0] == "output_dir"
    with pytest.raises(TypeError, match="multiple values for argument 'output_dir'"):
        Config("a", output_dir="b")
    with pytest.raises(TypeError, match="only positional argument"):
        Config("a", "b")
