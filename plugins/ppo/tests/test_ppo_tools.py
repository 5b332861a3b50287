"""PPO with tools and environments (posttrain's tools= / environment_factory=, GRPO's contract through the core's ToolCallingRollout).

GAE over the model-written tokens only: ``compute_tool_advantages`` compresses each row's model tokens into a prefix,
runs ``compute_advantages`` on it and scatters the results back; tool positions are padding for ``ppo_losses``.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from posttrain import ConfigError, RolloutEngine
from posttrain.testing.scripted import ScriptedToolTurns
from posttrain.testing.tiny_model import build_model, build_reward_model, build_tokenizer


# ----------------------------------------------------------------------------- tools and environments (TRL's documentation examples)
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


class IncrementEnv:
    def reset(self, **kwargs) -> str | None:  # no train_dataset: reset() writes the task
        self.counter = 0
        self.target = random.randint(1, 6)
        return f"Increment the counter by {self.target}."

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


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def _config(tmp_path, **overrides):
    from posttrain_ppo.config import PPOConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, response_length=200, max_steps=2, num_ppo_epochs=1,
                  learning_rate=1e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False,
                  temperature=1.0, max_tool_calling_iterations=2)
    values.update(overrides)
    return PPOConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row]


def _call_ids(tok, name, **arguments):
    text = "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call><|im_end|>"
    return tok(text, add_special_tokens=False)["input_ids"]


# as in plugins/grpo/tests/test_grpo_tools.py (unchanged)
def _calculator_trainer(tok, tmp_path, dtype=None, **overrides):
    from posttrain_ppo.trainer import PPOTrainer

    seen = {}

    def answer_reward(completions, **kwargs):  # reward functions receive the episodes' messages
        seen["completions"] = completions
        return [float(c[-1]["content"] == "42") + 0.25 * i for i, c in enumerate(completions)]  # unequal scores

    turns = [_call_ids(tok, "multiply", a=6, b=7), tok("42<|im_end|>", add_special_tokens=False)["input_ids"]]
    rows = [{"prompt": [{"role": "user", "content": f"what is 6 times 7? ({i})"}]} for i in range(8)]
    trainer = PPOTrainer(args=_config(tmp_path, **overrides), processing_class=tok, model=build_model(tok, dtype=dtype),
                         value_model=build_reward_model(tok, dtype=dtype, seed=1), reward_funcs=[answer_reward], train_dataset=rows,
                         tools=[multiply], rollout_engine=RolloutEngine(ScriptedToolTurns(tok, turns, logprob=-0.7)), allow_experimental=True)
    return trainer, rows, turns, seen


# ----------------------------------------------------------------------------- training runs
def test_ppo_trains_with_a_calculator_tool(opt_in, tok, tmp_path):
    """tools=[multiply] with a separate critic: 2 steps, tools/* logged, rewards read the episodes' messages, lengths count model tokens."""
    trainer, _, turns, seen = _calculator_trainer(tok, tmp_path)
    assert trainer.tools == [multiply]
    trainer.train()
    logged = _metrics(trainer.args.output_dir)
    assert [row["step"] for row in logged] == [1, 2]
    first = logged[0]
    assert first["tools/call_frequency"] == 1.0 and first["tools/failure_frequency"] == 0.0 and first["tools/mean_turns"] == 2.0
    assert first["tools/turn_limit_ratio"] == 0.0 and first["completions/mean_length"] == sum(map(len, turns))
    assert first["val/num_eos_tokens"] == 4.0  # every episode's last model turn ends with <|im_end|>
    assert [m["role"] for m in seen["completions"][0]] == ["assistant", "tool", "assistant"] and seen["completions"][0][1]["content"] == "42"
    assert all(torch.isfinite(torch.tensor([row["loss"], row["critic_loss"]])).all() for row in logged)


def test_ppo_trains_with_a_trl_environment_and_no_dataset(opt_in, tok, tmp_path):
    """TRL's IncrementEnv, no train_dataset and no reward function: reset() writes the prompt, get_reward() is the only reward (the value head)."""
    from posttrain_ppo.trainer import PPOTrainer

    random.seed(0)
    turns = [_call_ids(tok, "increment", step=3), tok("done<|im_end|>", add_special_tokens=False)["input_ids"]]
    args = _config(tmp_path, value_head=True)
    trainer = PPOTrainer(args=args, processing_class=tok, model=build_model(tok), environment_factory=IncrementEnv,
                         rollout_engine=RolloutEngine(ScriptedToolTurns(tok, turns, logprob=-0.7)), allow_experimental=True)
    assert trainer.reward_func_names == ["IncrementEnv"] and trainer.reward_weights.tolist() == [1.0]
    assert [t.__name__ for t in trainer.tools] == ["increment"]
    trainer.train()
    logged = _metrics(args.output_dir)
    assert len(logged) == 2
    for row in logged:
        assert row["tools/call_frequency"] == 1.0 and row["tools/mean_turns"] == 2.0
        assert row["objective/scores"] == row["rewards/IncrementEnv/mean"]  # the environment's reward is the score (weight 1)
        assert 0.0 <= row["objective/scores"] <= 1.0


# ----------------------------------------------------------------------------- the algorithm
def _random_batch(seed: int):
    """Float64 rollout tensors of 4 episodes, width 9 (8 completion columns + the padding column the trainer appends).

    m = model-written, t = tool, . = padding:
        row 0: m m t t t m m . .   (tool round in the middle)
        row 1: m m m m m m . . .   (no tool call)
        row 2: m t t t t t t m .   (last model token in the last completion column: its T+1 is the appended column)
        row 3: m m m t t . . . .   (the episode ends with inserted tokens, e.g. cut by the budget)
    """
    layout = ["mmtttmm..", "mmmmmm...", "mttttttm.", "mmmtt...."]
    completion_mask = torch.tensor([[c != "." for c in row] for row in layout], dtype=torch.long)
    tool_mask = torch.tensor([[c == "m" for c in row] for row in layout], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    shape = completion_mask.shape
    logprobs = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    ref = logprobs + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    scores = torch.randn(shape[0], generator=g, dtype=torch.float64)
    return logprobs, ref, values, scores, completion_mask, tool_mask


GAE_SETTINGS = {
    "k1": dict(kl_coef=0.05, kl_estimator="k1", whiten_rewards=False, gamma=1.0, lam=0.95),
    "k3_whiten_discount": dict(kl_coef=0.2, kl_estimator="k3", whiten_rewards=True, gamma=0.9, lam=0.8),
}


@pytest.mark.parametrize("name", sorted(GAE_SETTINGS))
def test_gae_over_model_tokens_equals_compute_advantages_without_the_tool_tokens(opt_in, name):
    """Float64: at model tokens (and the state after the last one) the advantages / returns / values equal compute_advantages run by hand
    on the rows with the tool tokens removed; tool positions are padding (advantage, return, value 0; both padding masks set)."""
    from posttrain_ppo.trainer import INVALID_LOGPROB, compute_advantages, compute_tool_advantages

    kw = GAE_SETTINGS[name]
    logprobs, ref, values, scores, completion_mask, tool_mask = _random_batch(seed=3)
    out = compute_tool_advantages(logprobs, ref, values, scores, completion_mask, tool_mask, **kw)

    # by hand: each row's model-token columns, then the column after its last model token (the state the score lands on)
    model = (completion_mask * tool_mask).bool()
    keep = []
    for i in range(len(model)):
        cols = model[i].nonzero().flatten().tolist()
        keep.append(cols + [cols[-1] + 1])
    width = max(len(k) for k in keep) - 1  # the most model tokens of a row
    hand = [torch.zeros(len(keep), width, dtype=torch.float64) for _ in range(3)]
    for i, cols in enumerate(keep):
        cols = cols[:width]
        for tensor, source in zip(hand, (logprobs, ref, values)):
            tensor[i, : len(cols)] = source[i, cols]
    hand_mask = torch.tensor([[j < len(k) - 1 for j in range(width)] for k in keep], dtype=torch.long)
    expected = compute_advantages(*hand, scores, hand_mask, **kw)

    tolerance = dict(rtol=1e-12, atol=1e-12)  # the same float64 ops on the same numbers: equal up to summation order (in practice exact)
    for i, cols in enumerate(keep):
        n_model = len(cols) - 1
        slots = cols[: width + (n_model < width)]  # the T+1 slot exists unless the row fills the compressed width
        for key in ("advantages", "returns", "values", "rewards", "kl"):
            torch.testing.assert_close(out[key][i, slots], expected[key][i, : len(slots)], **tolerance, msg=f"{key} row {i}")
        assert not out["padding_mask"][i, cols[:n_model]].any() and out["padding_mask_p1"][i, slots].logical_not().all()
        others = [j for j in range(model.shape[1]) if j not in slots]
        for key in ("advantages", "returns", "values"):
            assert (out[key][i, others] == 0).all(), (key, i)
        assert out["padding_mask"][i, others].all() and out["padding_mask_p1"][i, others].all()
        assert (out["logprobs"][i, others] == INVALID_LOGPROB).all()
        assert out["padding_mask"][i, cols[-1]]  # the state after the last model token: value terms only
    assert (out["advantages"][completion_mask.bool() & ~model] == 0).all()  # every tool token: no advantage

    # without tool tokens (all ones) it is compute_advantages itself, bit for bit
    plain = compute_advantages(logprobs[:, :8], ref[:, :8], values[:, :8], scores, completion_mask[:, :8], **kw)
    ones = compute_tool_advantages(logprobs, ref, values, scores, completion_mask, torch.ones_like(tool_mask), **kw)
    for key in plain:
        assert torch.equal(ones[key][:, :8], plain[key]), key

    # the state after a last model token in the last column needs the appended padding column
    with pytest.raises(ValueError, match="row 2's last model token is in the last of the 8 columns.*append one padding column"):
        compute_tool_advantages(logprobs[:, :8], ref[:, :8], values[:, :8], scores, completion_mask[:, :8], tool_mask[:, :8], **kw)


def test_tool_positions_carry_no_loss(opt_in, tok, tmp_path):
    """Float64 trainer: old log-probs, reference log-probs and values at tool positions change neither the rollout's advantages / returns
    nor the PPO loss; at a model token they do. The tool tokens stay in the forwards (context), outside every loss term."""
    trainer, rows, _, _ = _calculator_trainer(tok, tmp_path, dtype=torch.float64, kl_coef=0.1, whiten_rewards=True, num_ppo_epochs=1)
    base = trainer._rollout(rows[:4], seed=0)
    tool = base["completion_mask"].bool() & base["padding_mask"]  # completion tokens the model did not write
    assert tool.any() and base["completion_ids"].shape[1] == int(base["completion_mask"].sum(1).max()) + 1  # the appended padding column
    forwards = trainer._rollout_forwards

    def perturbed(where, delta):
        def wrapped(batch, sampling_logps):
            old, ref, values = forwards(batch, sampling_logps)
            w = where.to(old.dtype)
            return old - delta * w, ref + 2 * delta * w, values + 5 * delta * w
        trainer._rollout_forwards = wrapped
        try:
            return trainer._rollout(rows[:4], seed=0)
        finally:
            trainer._rollout_forwards = forwards

    def loss(batch):
        losses, _ = trainer._losses(trainer.model, batch)
        return losses["model"] + losses["critic"]

    keys = ("advantages", "returns", "old_logprobs", "old_values", "padding_mask", "padding_mask_p1")
    changed = perturbed(tool.double(), 1.0)
    for key in keys:
        assert torch.equal(changed[key], base[key]), key
    assert torch.equal(loss(changed), loss(base))

    model_token = torch.zeros_like(tool, dtype=torch.float64)
    model_token[0, 0] = 1.0  # the first model-written token
    assert not torch.equal(perturbed(model_token, 1.0)["advantages"], base["advantages"])

    # prefix semantics (the no-tools rule) would train on the tool tokens: a different loss
    last = (~base["padding_mask"]).long().cumsum(1).argmax(1)  # (N,) last model column
    prefix = torch.arange(tool.shape[1]).unsqueeze(0) > last.unsqueeze(1)
    assert not torch.equal(loss(dict(base, padding_mask=prefix)), loss(base))


def test_bad_tool_setups_are_one_line(opt_in, tok, tmp_path):
    from posttrain_ppo.config import PPOConfig
    from posttrain_ppo.trainer import PPOTrainer

    def no_doc(a):
        return a

    rows = [{"prompt": [{"role": "user", "content": "x"}]}]
    with pytest.raises(ConfigError, match="^tool 'no_doc': its schema cannot be built"):
        PPOTrainer(args=_config(tmp_path), processing_class=tok, model=build_model(tok), value_model=build_reward_model(tok),
                   reward_funcs=[lambda completions, **kw: [0.0] * len(completions)], train_dataset=rows, tools=[no_doc], allow_experimental=True)

    class NoReward:
        def reset(self, **kwargs):
            return "go"

    with pytest.raises(ConfigError, match="^No reward source provided"):
        PPOTrainer(args=_config(tmp_path, value_head=True), processing_class=tok, model=build_model(tok), environment_factory=NoReward,
                   allow_experimental=True)
    with pytest.raises(ConfigError, match="set max_steps > 0"):
        PPOTrainer(args=_config(tmp_path, max_steps=-1, value_head=True), processing_class=tok, model=build_model(tok),
                   environment_factory=IncrementEnv, allow_experimental=True)
    with pytest.raises(ConfigError, match="requires a `train_dataset` with an 'environment' column"):
        PPOTrainer(args=_config(tmp_path, value_head=True), processing_class=tok, model=build_model(tok), environment_factory={"a": IncrementEnv},
                   allow_experimental=True)
    with pytest.raises(ConfigError, match="max_tool_calling_iterations=-1 is invalid"):
        PPOConfig(output_dir=str(tmp_path), max_tool_calling_iterations=-1)
    with pytest.raises(ConfigError, match="tool_call_timeout=0 is invalid"):
        PPOConfig(output_dir=str(tmp_path), tool_call_timeout=0)
