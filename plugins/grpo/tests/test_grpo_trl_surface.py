"""GRPO's TRL surface: TrainingArguments, evaluate(), callbacks, log_history, data formats, TRL 1.16's extra features and their errors."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from grpo_helpers import FixedBackend, low_token_fraction

from posttrain import ConfigError, RolloutEngine
from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.trainer import GRPOTrainer, off_policy_mask


def _config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none",
                  gradient_checkpointing=False)
    values.update(overrides)
    return GRPOConfig(**values)


def _trainer(tiny_model, tiny_tokenizer, data, tmp_path, reward_funcs=low_token_fraction, engine=None, **overrides):
    return GRPOTrainer(model=tiny_model, reward_funcs=reward_funcs, args=_config(tmp_path, **overrides), train_dataset=data,
                       processing_class=tiny_tokenizer, rollout_engine=engine)


# ------------------------------------------------------------------ trainer surface
def test_training_arguments_are_converted_like_trl(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=3e-4, max_steps=1, report_to="none")
    trainer = GRPOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert type(trainer.args) is GRPOConfig
    assert (trainer.args.learning_rate, trainer.args.output_dir, trainer.args.num_generations) == (3e-4, str(tmp_path), 8)


def test_evaluate_a_dataset_and_a_dict_of_datasets(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, per_device_eval_batch_size=2)
    metrics = trainer.evaluate(eval_dataset=prompt_dataset.select(range(4)))
    assert {"eval_loss", "eval_reward", "eval_rewards/low_token_fraction/mean", "eval_completions/mean_length"} <= set(metrics)
    assert 0.0 <= metrics["eval_reward"] <= 1.0
    both = trainer.evaluate(eval_dataset={"a": prompt_dataset.select(range(2)), "b": prompt_dataset.select(range(2, 4))})
    assert {"eval_a_loss", "eval_b_loss", "eval_a_reward", "eval_b_reward"} <= set(both)
    assert trainer.state.log_history[-1]["eval_b_reward"] == both["eval_b_reward"]


def test_one_eval_generation_gives_zero_advantages_and_loss(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, num_generations_eval=1)
    metrics = trainer.evaluate(eval_dataset=prompt_dataset.select(range(3)))
    assert metrics["eval_loss"] == 0.0 and metrics["eval_completions/mean_length"] > 0


def test_callbacks_get_step_end_and_log_events(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.events = []

        def on_step_end(self, args, state, control, **kwargs):
            self.events.append(("step_end", state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.events.append(("log", "reward" in logs or "train_runtime" in logs))

    recorder = Recorder()
    GRPOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset,
                processing_class=tiny_tokenizer, callbacks=[recorder]).train()
    assert ("step_end", 1) in recorder.events and ("step_end", 2) in recorder.events
    assert [e for e in recorder.events if e[0] == "log"] == [("log", True)] * 3  # two steps and the summary


def test_summary_row_carries_the_final_metrics_like_trl(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, reward_weights=None)
    trainer.train()
    last, final_step = trainer.state.log_history[-1], trainer.state.log_history[-2]
    assert {"train_runtime", "train_loss"} <= set(last)
    for key in ("reward", "rewards/low_token_fraction/mean", "rewards/low_token_fraction/std", "frac_reward_zero_std", "entropy"):
        assert last[key] == final_step[key]


def test_model_tags(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path)
    assert {"trl", "grpo"} <= set(trainer.model.model_tags)


# ------------------------------------------------------------------ data formats
def test_pre_tokenized_prompt_ids(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    ids = [tiny_tokenizer(f"what is {i} + {i}")["input_ids"] for i in range(8)]
    seen = []

    def reward(prompts, completion_ids, **kwargs):
        seen.extend(prompts)
        return low_token_fraction(completion_ids)

    trainer = _trainer(tiny_model, tiny_tokenizer, Dataset.from_dict({"prompt_ids": ids}), tmp_path, reward_funcs=reward, max_steps=1)
    assert trainer._prompt_ids(trainer.train_dataset[0]) == ids[0]
    trainer.train()
    assert all(p.startswith("what is") for p in seen)  # the decoded prompt goes to the reward functions


def test_iterable_dataset_is_materialized_for_max_steps(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset, IterableDataset

    stream = IterableDataset.from_generator(lambda: ({"prompt": f"prompt {i}"} for i in range(1000)))
    trainer = _trainer(tiny_model, tiny_tokenizer, stream, tmp_path, max_steps=3)
    assert isinstance(trainer.train_dataset, Dataset) and len(trainer.train_dataset) == 3 * 2  # 3 steps x 2 prompts
    eval_stream = IterableDataset.from_generator(lambda: ({"prompt": f"q {i}"} for i in range(3)))
    assert "eval_loss" in trainer.evaluate(eval_dataset=eval_stream)


def test_list_of_rows_becomes_a_dataset(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    trainer = _trainer(tiny_model, tiny_tokenizer, [{"prompt": f"p {i}", "solution": str(i)} for i in range(4)], tmp_path)
    assert isinstance(trainer.train_dataset, Dataset) and trainer.train_dataset.column_names == ["prompt", "solution"]


# ------------------------------------------------------------------ metrics
def test_frac_reward_zero_std_counts_the_rows_of_zero_std_groups(tiny_model, tiny_tokenizer, tmp_path):
    """Regression: is_std_zero is per row and was sliced as per group, so the metric read the first group's rows only."""
    from datasets import Dataset

    data = Dataset.from_dict({"prompt": ["constant reward", "varied reward"], "kind": ["constant", "varied"]})

    def reward(completion_ids, kind, **kwargs):  # one group has identical rewards, the other does not
        return [1.0 if k == "constant" else float(len(c)) + 0.1 * i for i, (c, k) in enumerate(zip(completion_ids, kind))]

    trainer = _trainer(tiny_model, tiny_tokenizer, data, tmp_path, reward_funcs=reward, engine=RolloutEngine(FixedBackend()))
    micro_batches = trainer._generate_and_score([data[0], data[1]], trainer.args.seed)
    names, values = micro_batches[0]["rollout_metric_names"], micro_batches[0]["rollout_metric_values"]
    assert values[names.index("frac_reward_zero_std")].item() == 0.5  # the old slicing gave 1.0 (or 0.0 in the other order)


def test_reward_functions_can_log_metrics_and_completion_columns(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    def reward(completions, log_extra, log_metric, **kwargs):
        log_extra("first_chars", [c[:3] for c in completions])
        log_metric("custom_accuracy", 0.75)
        return [float(len(c)) for c in completions]

    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, reward_funcs=reward, log_completions=True, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["custom_accuracy"] == 0.75
    assert len(trainer._logs["extra"]["first_chars"]) == 8
    import pandas as pd

    table = pd.read_parquet(os.path.join(trainer.args.output_dir, "completions", "completions_00001.parquet"))
    assert {"prompt", "completion", "reward", "first_chars", "advantage"} <= set(table.columns) and len(table) == 8


def test_all_none_rewards_warn_with_the_row(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, caplog):
    def none_reward(completions, **kwargs):
        return [None] * len(completions)

    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, reward_funcs=none_reward, max_steps=1)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "All reward functions returned None for the following kwargs:" in caplog.text and "'solution'" in caplog.text


def test_sequence_level_ratio_with_a_token_summed_loss_warns(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, importance_sampling_level="sequence", loss_type="dapo")
    assert "weights each sequence by its completion length" in caplog.text


# ------------------------------------------------------------------ TRL 1.16 loss features
def test_get_high_entropy_mask_keeps_the_top_quantile_of_unpadded_tokens(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path)
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(trainer.get_high_entropy_mask(entropies, mask, 0.8), expected)
    assert not trainer.get_high_entropy_mask(entropies, torch.zeros_like(mask), 0.5).any()


def test_off_policy_mask_drops_negative_advantage_high_kl_sequences():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    logps = torch.tensor([[-2.0, -2.0, -50.0], [-0.5, -0.5, -0.5], [-2.0, -2.0, -2.0]])  # KL to sampling logps 0: 2 (padding ignored), 0.5, 2
    advantages = torch.tensor([[-1.0], [-1.0], [1.0]])
    kept = off_policy_mask(advantages, logps, torch.zeros(3, 3), mask, 1.0)
    assert kept.flatten().tolist() == [0.0, 1.0, 1.0]
    assert torch.equal(GRPOTrainer.get_off_policy_mask(advantages, logps, torch.zeros(3, 3), mask, 1.0), kept)


def test_entropy_bonus_is_coef_times_mean_entropy(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, entropy_coef=0.5, engine=RolloutEngine(FixedBackend()))
    batch = trainer._generate_and_score([prompt_dataset[i] for i in range(2)], trainer.args.seed)[0]
    trainer.model.train()
    loss, metrics = trainer.compute_loss(trainer.model, batch, torch.tensor(float(trainer.count_items(batch))))
    # one float32 subtraction of two values of order 1 (a few ulps, eps32 = 1.2e-7) against one multiplication: 1e-6 covers it
    torch.testing.assert_close(metrics["policy_loss"] - loss.detach(), 0.5 * metrics["entropy"], rtol=1e-5, atol=1e-6)
    loss.backward()  # the bonus is differentiable
    assert metrics["entropy_coef"].item() == 0.5


def test_adaptive_entropy_moves_the_coefficient_every_step_and_resumes(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, max_steps=3, entropy_coef=0.01, use_adaptive_entropy=True,
                       entropy_target=50.0, entropy_coef_delta=0.005)
    trainer.train()
    assert trainer.entropy_coef == pytest.approx(0.01 + 3 * 0.005)
    assert trainer.state_dict()["entropy_coef"] == pytest.approx(0.025)
    assert trainer.state.log_history[0]["policy_loss"] == trainer.state.log_history[0]["loss"]  # step 1: no entropy measured yet


def test_sync_ref_model_mixes_the_policy_into_the_reference(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, beta=0.1, sync_ref_model=True, ref_model_sync_steps=1,
                       ref_model_mixup_alpha=0.5, max_steps=1)
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, p in trainer.ref_model.named_parameters():
        torch.testing.assert_close(p, 0.5 * before[name] + 0.5 * policy[name].detach())
    assert "ref_model" in trainer.state_dict()  # a moving reference is checkpointed


def test_router_aux_loss_is_off_for_a_dense_model(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path)
    assert trainer.aux_loss_enabled is False


def test_cast_lm_head_to_fp32_reference_keeps_its_own_head(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, beta=0.1, cast_lm_head_to_fp32=True)
    head, ref_head = trainer.model.get_output_embeddings(), trainer.ref_model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and ref_head.forward.__self__ is ref_head
    hidden = torch.randn(2, head.in_features, dtype=torch.bfloat16)
    assert head(hidden).dtype == torch.float32


# ------------------------------------------------------------------ generation
def test_pad_to_multiple_of_pads_prompts_and_completions(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, pad_to_multiple_of=16)
    batch = trainer._generate_and_score([prompt_dataset[i] for i in range(2)], trainer.args.seed)[0]
    assert batch["prompt_ids"].shape[1] % 16 == 0 and batch["completion_ids"].shape[1] % 16 == 0


def test_generation_kwargs_override_sampling_and_warn_about_the_rest(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.warns(UserWarning, match=r"generation_kwargs \['num_beams'\] are ignored"):
        trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, generation_kwargs={"top_k": 5, "num_beams": 2})
    assert trainer._sampling["top_k"] == 5


def test_rollout_func_generates_and_feeds_extra_keys_to_the_rewards(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    calls = []

    def rollout_func(prompts, trainer):
        calls.append(list(prompts))
        ids = [trainer.processing_class(p)["input_ids"] for p in prompts]
        return {"prompt_ids": ids, "completion_ids": [[5, 6, 7]] * len(prompts), "logprobs": [[-1.0] * 3] * len(prompts),
                "env_score": [float(i % 2) for i in range(len(prompts))]}

    def reward(env_score, **kwargs):
        return env_score

    trainer = GRPOTrainer(model=tiny_model, reward_funcs=reward, args=_config(tmp_path, max_steps=1), train_dataset=prompt_dataset,
                          processing_class=tiny_tokenizer, rollout_func=rollout_func)
    trainer.train()
    assert len(calls[0]) == 8 and calls[0][0] == calls[0][3]  # one prompt per completion, each repeated num_generations times
    assert trainer.state.log_history[0]["reward"] == 0.5

    trainer.rollout_func = lambda prompts, trainer: {"prompt_ids": [[1]], "completion_ids": [[2]]}
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        trainer._generate(["prompt"])


# ------------------------------------------------------------------ validation errors (one test each)
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(steps_per_generation=4), "steps_per_generation=4 is not offered"),
        (dict(pad_to_multiple_of="eight"), "pad_to_multiple_of='eight' is invalid"),
        (dict(pad_to_multiple_of=0), "pad_to_multiple_of=0 is invalid"),
        (dict(off_policy_mask_threshold=-1.0), "off_policy_mask_threshold=-1.0 is invalid"),
        (dict(entropy_coef_min=0.5, entropy_coef_max=0.1), "entropy_coef_min=0.5 > entropy_coef_max=0.1"),
        (dict(entropy_coef_delta=-0.1), "entropy_coef_delta=-0.1 is invalid"),
        (dict(ref_model_mixup_alpha=1.5), "ref_model_mixup_alpha=1.5 is invalid"),
        (dict(ref_model_sync_steps=0), "ref_model_sync_steps=0 is invalid"),
        (dict(log_completions_hub_repo="me/completions"), "log_completions_hub_repo='me/completions' is set but log_completions=False"),
        (dict(auto_find_batch_size=True), "auto_find_batch_size=True is not supported by GRPO"),
        (dict(num_generations_eval=0), "num_generations_eval=0 is invalid"),
        (dict(vllm_mode="remote"), "vllm_mode='remote' is invalid"),
    ],
)
def test_new_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_config_aliases_like_trl(tmp_path):
    assert _config(tmp_path, pad_to_multiple_of="8").pad_to_multiple_of == 8
    assert _config(tmp_path, pad_to_multiple_of="auto").pad_to_multiple_of is None
    assert _config(tmp_path, scale_rewards=False).scale_rewards == "none"
    with pytest.warns(FutureWarning, match="vllm_importance_sampling_cap is deprecated"):
        assert _config(tmp_path, vllm_importance_sampling_cap=2.0).vllm_importance_sampling_clip_max == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(train_dataset=None), "`train_dataset` is required"),
        (dict(reward_funcs=None), "No reward source provided"),
        (dict(tools=[len]), r"^tool 'len': its schema cannot be built"),
        (dict(environment_factory=object), r"^environment_factory: object has no reset\(\) method"),
        (dict(optimizers=(object(), None)), r"optimizers=\(optimizer, scheduler\) is not supported"),
        (dict(reward_funcs=[low_token_fraction, low_token_fraction], reward_processing_classes=[None]), r"reward processing classes \(1\) must match the number of reward functions \(2\)"),
    ],
)
def test_trainer_argument_errors(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, kwargs, match):
    values = dict(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    values.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        GRPOTrainer(**values)


def test_sync_ref_model_errors(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="sync_ref_model=True but beta=0.0"):
        _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, sync_ref_model=True)
    with pytest.raises(ConfigError, match="sync_ref_model=True is not supported with PEFT"):
        GRPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=_config(tmp_path, sync_ref_model=True, beta=0.1),
                    train_dataset=prompt_dataset, processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_router_aux_loss_coef_on_a_dense_model_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="is not a Mixture-of-Experts model"):
        _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, router_aux_loss_coef=0.01)


def test_peft_model_with_peft_config_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ConfigError, match="model is already a PeftModel and peft_config was given"):
        GRPOTrainer(model=model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset,
                    processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4))


def test_tool_call_messages_and_a_tools_column_are_rendered(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}{% if m.tool_calls %}CALL {{ m.tool_calls[0].function.name }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    schema = {"type": "function", "function": {"name": "multiply", "description": "a * b", "parameters": {"type": "object", "properties": {}}}}
    prompt = [
        {"role": "user", "content": "3 * 4?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 4}}}]},
        {"role": "tool", "content": "12"},
    ]
    data = Dataset.from_list([{"prompt": prompt, "tools": [schema]}] * 4)
    trainer = GRPOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, max_steps=1), train_dataset=data, processing_class=tokenizer)
    text = tokenizer.decode(trainer._prompt_ids(trainer.train_dataset[0]))
    assert text.startswith("TOOLS:multiply") and "CALL multiply" in text and "tool: 12" in text and text.endswith("assistant:")
    trainer.train()
