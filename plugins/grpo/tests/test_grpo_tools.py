"""GRPO with tools and environments (TRL 1.16's tools= / environment_factory=), through the core's ToolCallingRollout.

The environment classes and tool functions below are TRL's documentation examples (docs/source/grpo_trainer.md,
"Agent Training"), unchanged; only the import is posttrain's.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from posttrain import ConfigError, RolloutEngine
from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
from posttrain.testing.scripted import ScriptedToolTurns
from posttrain.testing.tiny_model import build_model, build_tokenizer


# ----------------------------------------------------------------------------- TRL's documentation examples, unchanged
def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


async def async_add(a: int, b: int) -> int:
    """
    Asynchronously adds two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The sum of the two integers.
    """
    return a + b


class IncrementEnv:
    # Reserved methods
    def reset(self, **kwargs) -> str | None:  # required; called at the start of each rollout
        self.counter = 0
        self.target = random.randint(1, 6)  # self-sample the task
        return f"Increment the counter by {self.target}."  # returned string becomes the prompt

    def get_reward(self) -> float:  # optional: the environment scores itself from its own state
        return float(self.counter == self.target)

    # Public methods (exposed as tools)
    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


class DatasetIncrementEnv:
    def reset(self, target, **kwargs) -> None:  # the row's `target` column arrives as a keyword argument
        self.counter = 0
        self.target = target

    def get_reward(self) -> float:
        return float(self.counter == self.target)

    def increment(self, step: int) -> int:
        """
        Increment the internal counter.

        Args:
            step: Value to add to the counter.

        Returns:
            The updated counter value.
        """
        self.counter += step
        return self.counter


def format_reward(completions, **kwargs):  # trainer-owned: scores the completion text
    return [float(any(m.get("tool_calls") for m in c)) for c in completions]


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def _config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4, max_completion_length=24, max_steps=2,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", max_tool_calling_iterations=2)
    values.update(overrides)
    return GRPOConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _call_ids(tok, name, **arguments):
    text = '<tool_call>\n' + json.dumps({"name": name, "arguments": arguments}) + '\n</tool_call><|im_end|>'
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- tests
def test_trl_environment_without_a_dataset_trains(tok, tmp_path):
    """TRL's IncrementEnv, no train_dataset: reset() writes the prompt, get_reward() is the reward, increment() a tool."""
    random.seed(0)
    args = _config(tmp_path)
    trainer = GRPOTrainer(model=build_model(tok), args=args, processing_class=tok, environment_factory=IncrementEnv)
    assert trainer.reward_func_names == ["IncrementEnv"] and trainer.reward_weights.tolist() == [1.0]
    trainer.train()
    logged = _metrics(args.output_dir)
    assert {"tools/call_frequency", "tools/failure_frequency", "tools/mean_turns", "rewards/IncrementEnv/mean"} <= set(logged[0])


def test_trl_tools_and_dataset_environment_with_a_reward_function(tok, tmp_path):
    """tools=[multiply, async_add] beside TRL's dataset-driven environment and a trainer-owned reward; the scripted policy calls tools."""
    from datasets import Dataset

    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Increment the counter to {i}."}] for i in range(1, 7)],
                                 "target": list(range(1, 7))})
    seen = {}

    def env_state(completions, environments, **kwargs):  # reward functions receive the episodes' environments
        seen["counters"] = [e.counter for e in environments]
        seen["completions"] = completions
        return [0.0] * len(completions)

    turns = [_call_ids(tok, "increment", step=2), _call_ids(tok, "async_add", a=2, b=3), tok("done<|im_end|>", add_special_tokens=False)["input_ids"]]
    args = _config(tmp_path, max_completion_length=200, max_tool_calling_iterations=3, reward_weights=[1.0, 0.5])
    trainer = GRPOTrainer(model=build_model(tok), reward_funcs=[format_reward, env_state], args=args, train_dataset=dataset, processing_class=tok,
                          tools=[multiply, async_add], environment_factory=DatasetIncrementEnv,
                          rollout_engine=RolloutEngine(ScriptedToolTurns(tok, turns, logprob=-0.7)))
    assert trainer.reward_func_names == ["format_reward", "env_state", "DatasetIncrementEnv"]
    assert trainer.reward_weights.tolist() == [1.0, 0.5, 1.0]  # reward_weights covers reward_funcs; the environment's weight is 1
    trainer.train()
    logged = _metrics(args.output_dir)
    assert logged[0]["tools/call_frequency"] == 2.0 and logged[0]["tools/failure_frequency"] == 0.0 and logged[0]["tools/mean_turns"] == 3.0
    assert logged[0]["rewards/format_reward/mean"] == 1.0
    assert seen["counters"] == [2] * 4
    roles = [m["role"] for m in seen["completions"][0]]
    assert roles == ["assistant", "tool", "assistant", "tool", "assistant"] and seen["completions"][0][3]["content"] == "5"
    # completion lengths count the model-written tokens only (as TRL's)
    assert logged[0]["completions/mean_length"] == sum(map(len, turns))


def test_tool_tokens_carry_no_loss(tok, tmp_path):
    """Loss, KL and ratios use completion_mask * tool_mask: the old / reference log-probs at tool tokens do not matter."""
    turns = [_call_ids(tok, "multiply", a=6, b=7), tok("42<|im_end|>", add_special_tokens=False)["input_ids"]]
    model = build_model(tok, dtype=torch.float64)
    args = _config(tmp_path, max_completion_length=200, beta=0.1, num_iterations=2, loss_type="grpo")
    rows = [{"prompt": [{"role": "user", "content": "what is 6 times 7"}]}, {"prompt": [{"role": "user", "content": "6 x 7 ="}]}]
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [float(i) for i in range(len(completions))]], args=args,
                          train_dataset=rows, processing_class=tok, tools=[multiply], rollout_engine=RolloutEngine(ScriptedToolTurns(tok, turns, logprob=-0.7)))
    (batch, *_) = trainer._generate_and_score(rows[:1], seed=0)
    tool = batch["tool_mask"]
    assert tool.shape == batch["completion_mask"].shape and 0 < int(tool.sum()) < int(batch["completion_mask"].sum())
    assert batch["num_completion_tokens"] == int(tool.sum())

    def loss(b):
        return trainer.compute_loss(trainer.model, b, torch.tensor(float(len(b["completion_ids"]))))[0]

    base = loss(batch)
    outside = (batch["completion_mask"] * (1 - tool)).bool()
    changed = dict(batch, old_per_token_logps=batch["old_per_token_logps"].masked_fill(outside, -3.0),
                   ref_per_token_logps=batch["ref_per_token_logps"].masked_fill(outside, 2.0))
    assert torch.equal(loss(changed), base)
    inside = dict(batch, old_per_token_logps=batch["old_per_token_logps"] - 0.3 * tool)  # the model-written tokens do matter
    assert not torch.equal(loss(inside), base)
    no_tools = {k: v for k, v in batch.items() if k != "tool_mask"}
    assert not torch.equal(loss(no_tools), base)  # without the mask the tool tokens would be trained on
    assert torch.equal(loss(dict(no_tools, completion_mask=batch["completion_mask"])), loss(dict(batch, tool_mask=torch.ones_like(tool))))


def test_bad_tool_setups_are_one_line(tok, tmp_path):
    def no_doc(a):
        return a

    with pytest.raises(ConfigError, match="^tool 'no_doc': its schema cannot be built"):
        GRPOTrainer(model=build_model(tok), reward_funcs=[format_reward], args=_config(tmp_path), train_dataset=[{"prompt": "x"}],
                    processing_class=tok, tools=[no_doc])
    with pytest.raises(ConfigError, match="rollout_func= both generate the completions"):
        GRPOTrainer(model=build_model(tok), reward_funcs=[format_reward], args=_config(tmp_path), train_dataset=[{"prompt": "x"}],
                    processing_class=tok, tools=[multiply], rollout_func=lambda prompts, trainer: {})

    class NoReward:
        def reset(self, **kwargs):
            return "go"

    with pytest.raises(ConfigError, match="^No reward source provided"):
        GRPOTrainer(model=build_model(tok), args=_config(tmp_path), processing_class=tok, environment_factory=NoReward)
    with pytest.raises(ConfigError, match="set max_steps > 0"):
        GRPOTrainer(model=build_model(tok), args=_config(tmp_path, max_steps=-1), processing_class=tok, environment_factory=IncrementEnv)
    with pytest.raises(ConfigError, match="requires a `train_dataset` with an .environment. column"):
        GRPOTrainer(model=build_model(tok), args=_config(tmp_path), processing_class=tok, environment_factory={"a": IncrementEnv})
