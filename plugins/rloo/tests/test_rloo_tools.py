"""RLOO with tools and environments (``tools=`` / ``environment_factory=``, the core's ToolCallingRollout; GRPO's contract).

The episodes come from a scripted rollout backend that writes fixed model turns (what a trained
model would write: a random tiny model never calls a tool); the tools, the environment, the chat
template, the parsing, the tool execution, the rewards and the RLOO updates are the real ones. The
loss checks run in float64 on one fixed micro-batch.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

from posttrain import ConfigError, RolloutBatch, RolloutEngine, completion_logps, tool_schema
from posttrain.testing.tiny_model import build_model, build_tokenizer
from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.trainer import RLOOTrainer, compute_rloo_advantages


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


class GuessEnv:
    """A TRL-style environment: ``reset(**row)`` starts an episode, ``guess`` is its tool, ``get_reward`` its reward."""

    def __init__(self):
        self.target, self.solved, self.resets = None, False, []

    def reset(self, **row):
        self.target, self.solved = int(row["target"]), False
        self.resets.append(row)
        return " (the number is small)"

    def guess(self, n: int) -> str:
        """Guess the hidden number.

        Args:
            n: The guess.
        """
        self.solved = n == self.target
        return "correct" if self.solved else ("higher" if n < self.target else "lower")

    def get_reward(self) -> float:
        return 1.0 if self.solved else 0.0


def calculator_used(completions, a, b, **kwargs):
    """1.0 when the episode's messages hold the calculator's correct result (completions are message lists)."""
    return [float(any(m["role"] == "tool" and m.get("name") == "add" and m["content"] == str(x + y) for m in c)) for c, x, y in zip(completions, a, b)]


class ScriptedAgent:
    """A rollout backend writing scripted model turns: an episode's first turn either calls both tools or answers
    directly (alternating over the batch, so each group of 2 has one of each); every later turn answers "ok".

    The turn number is read from the context: each tool round adds two ``<|im_start|>`` headers.
    """

    policy_version = 0
    samples_from_policy = False

    def __init__(self, tok):
        self.tok = tok
        self.header = tok.convert_tokens_to_ids("<|im_start|>")

    def _turn(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]

    def generate(self, prompt_ids, sampling, model_inputs=None):
        out = []
        for i, p in enumerate(prompt_ids):
            if list(p).count(self.header) == 3:  # first turn: the system (tools), user and assistant headers
                a, b, target = (int(x) for x in re.search(r"what is (\d+) \+ (\d+) (\d+)", self.tok.decode(p)).groups())
                if i % 2 == 0:
                    turn = (f'<tool_call>\n{{"name": "add", "arguments": {{"a": {a}, "b": {b}}}}}\n</tool_call>\n'
                            f'<tool_call>\n{{"name": "guess", "arguments": {{"n": {target}}}}}\n</tool_call>')
                else:
                    turn = "no idea"
            else:
                turn = "ok"
            out.append(self._turn(turn)[: sampling.max_tokens])
        return RolloutBatch([list(p) for p in prompt_ids], out, [[-0.5] * len(c) for c in out], [False] * len(out),
                            policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


def _rows(n: int = 8) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"what is {i} + {i + 1} {i % 3} ?"}], "a": i, "b": i + 1, "target": i % 3} for i in range(n)]


def _config(tmp_path, **overrides) -> RLOOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=256, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", beta=0.0,
                  max_tool_calling_iterations=2, use_cpu=True, bf16=False, gradient_checkpointing=False)
    values.update(overrides)
    return RLOOConfig(**values)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def test_rloo_trains_with_a_calculator_tool_and_an_environment(tok, tmp_path):
    model = build_model(tok)
    before = copy.deepcopy(model.state_dict())
    args = _config(tmp_path)
    trainer = RLOOTrainer(model=model, reward_funcs=[calculator_used], args=args, train_dataset=_rows(), processing_class=tok,
                          rollout_engine=RolloutEngine(ScriptedAgent(tok)), tools=[add], environment_factory=GuessEnv)
    assert trainer.reward_func_names == ["calculator_used", "GuessEnv"] and trainer.reward_weights.tolist() == [1.0, 1.0]
    trainer.train()

    with open(os.path.join(args.output_dir, "metrics.jsonl")) as fh:
        logs = [m for m in (json.loads(line) for line in fh if line.strip()) if "loss" in m]
    assert len(logs) == 2
    for m in logs:  # per group: one episode calls add + guess (2 calls, 2 model turns), the other answers at once
        assert m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.0
        assert m["tools/mean_turns"] == 1.5 and m["tools/turn_limit_ratio"] == 0.0
        assert m["rewards/calculator_used/mean"] == 0.5 and m["rewards/GuessEnv/mean"] == 0.5
        assert m["frac_reward_zero_std"] == 0.0 and torch.isfinite(torch.tensor(m["loss"]))
    # the environments were reset with the whole row, and the policy moved
    pool = trainer.tool_rollout._pools[None]
    assert any(r.get("target") is not None and "prompt" in r for env in pool for r in env.resets)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


class TaskEnv:
    """An environment that writes each task itself (no train_dataset): ``reset`` returns the question; ``guess`` is its only tool."""

    episodes = 0

    def __init__(self):
        self.target, self.solved = None, False

    def reset(self, **row):
        TaskEnv.episodes += 1
        self.target, self.solved = TaskEnv.episodes % 3, False
        return f"what is 1 + 2 {self.target} ?"

    def guess(self, n: int) -> str:
        """Guess the hidden number.

        Args:
            n: The guess.
        """
        self.solved = n == self.target
        return "correct" if self.solved else "wrong"

    def get_reward(self) -> float:
        return 1.0 if self.solved else 0.0


def test_environment_alone_writes_the_tasks_and_is_the_reward(tok, tmp_path):
    """No train_dataset, no reward_funcs: the environment's reset() writes each prompt and get_reward() is the only reward."""
    args = _config(tmp_path, max_steps=1)
    trainer = RLOOTrainer(model=build_model(tok), args=args, processing_class=tok, rollout_engine=RolloutEngine(ScriptedAgent(tok)),
                          environment_factory=TaskEnv)
    assert trainer.reward_func_names == ["TaskEnv"] and len(trainer.train_dataset) == 2  # one step's prompts
    trainer.train()
    with open(os.path.join(args.output_dir, "metrics.jsonl")) as fh:
        (m,) = [m for m in (json.loads(line) for line in fh if line.strip()) if "loss" in m]
    # the scripted tool-calling episode also calls add, which this environment lacks: one failed call of two
    assert m["rewards/TaskEnv/mean"] == 0.5 and m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.5


def _kl_scenario(tok, tmp_path):
    """A trainer with beta > 0, a reference that differs from the policy and the per-token IS correction (the scripted
    sampler is not the policy: its log-prob is -0.5 per written token); one step's micro-batches."""
    torch.manual_seed(0)
    model = build_model(tok).double()
    args = _config(tmp_path, beta=0.5, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
                   vllm_importance_sampling_clip_max=1e9)
    trainer = RLOOTrainer(model=model, reward_funcs=[calculator_used], args=args, train_dataset=_rows(),
                          processing_class=tok, rollout_engine=RolloutEngine(ScriptedAgent(tok)), tools=[add], environment_factory=GuessEnv)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    return trainer, trainer._generate_and_score(_rows(4), seed=3)


def test_kl_penalty_and_importance_ratios_cover_model_written_tokens_only(tok, tmp_path):
    trainer, batches = _kl_scenario(tok, tmp_path)
    assert all("tool_mask" in b for b in batches)
    assert any(((b["tool_mask"] == 0) & (b["completion_mask"] == 1)).any() for b in batches)  # some inserted tool tokens
    diff = [b["old_per_token_logps"] - b["ref_per_token_logps"] for b in batches]
    masked_kl = torch.cat([(d * b["completion_mask"] * b["tool_mask"]).sum(-1) for d, b in zip(diff, batches)])
    full_kl = torch.cat([(d * b["completion_mask"]).sum(-1) for d, b in zip(diff, batches)])
    rewards = torch.tensor([[1.0, 1.0] if i % 2 == 0 else [0.0, 0.0] for i in range(8)])  # (N, F): the tool-calling episode of each group scores 1 twice
    weights = trainer.reward_weights
    expected, _ = compute_rloo_advantages(rewards, weights, 2, False, None, masked_kl, 0.5)
    unmasked, _ = compute_rloo_advantages(rewards, weights, 2, False, None, full_kl, 0.5)
    got = torch.cat([b["advantages"] for b in batches])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got - unmasked).abs().max() > 1e-3  # the tool tokens would have moved the penalty
    kl_metric = float(masked_kl.sum()) / sum(b["num_completion_tokens"] for b in batches)
    assert batches[0]["rollout_metric_values"][batches[0]["rollout_metric_names"].index("kl")] == pytest.approx(kl_metric, rel=1e-9)

    # the trainer/sampler IS ratio pi_old / pi_sampler: exp(log pi_old + 0.5) at written tokens, exactly 1 at inserted ones
    for b in batches:
        written = (b["completion_mask"] * b["tool_mask"]).bool()
        inserted = (b["completion_mask"] * (1 - b["tool_mask"])).bool()
        ratio = b["importance_sampling_ratio"]
        torch.testing.assert_close(ratio[written], torch.exp(b["old_per_token_logps"][written] + 0.5), rtol=1e-12, atol=0.0)
        assert torch.all(ratio[inserted] == 1.0)


# ----------------------------------------------------------------------------- the loss on one fixed micro-batch (float64)
@pytest.fixture(scope="module")
def loss_setup(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(tok).double()
    trainer = RLOOTrainer(model=model, reward_funcs=[calculator_used], args=_config(tmp_path_factory.mktemp("loss"), beta=0.0, epsilon=0.2),
                          train_dataset=_rows(), processing_class=tok, rollout_engine=RolloutEngine(ScriptedAgent(tok)), tools=[add])
    gen = torch.Generator().manual_seed(2)
    b, p, c = 3, 5, 9
    batch = {
        "prompt_ids": torch.randint(3, 500, (b, p), generator=gen), "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(3, 500, (b, c), generator=gen), "completion_mask": torch.ones(b, c, dtype=torch.long),
        "advantages": torch.tensor([0.7, -0.4, 0.2], dtype=torch.float64),
    }
    batch["completion_mask"][2, 7:] = 0  # padding
    with torch.no_grad():
        current, _, _ = completion_logps(model, batch, 1.0)
    # old log-probs near the current ones: the sequence ratios stay inside the clip range, every token carries gradient
    batch["old_per_token_logps"] = current + 0.01 * torch.randn(current.shape, generator=gen, dtype=torch.float64)
    return trainer, model, batch


def _loss_and_grads(trainer, model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()}, 3)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_loss_with_an_all_ones_tool_mask_equals_the_loss_without(loss_setup):
    trainer, model, batch = loss_setup
    loss, grads = _loss_and_grads(trainer, model, batch)
    loss_ones, grads_ones = _loss_and_grads(trainer, model, {**batch, "tool_mask": torch.ones_like(batch["completion_mask"])})
    assert loss.abs() > 1e-6
    torch.testing.assert_close(loss_ones, loss, rtol=1e-12, atol=0.0)
    for g, h in zip(grads, grads_ones):
        torch.testing.assert_close(h, g, rtol=1e-12, atol=1e-15)


def test_tokens_outside_the_tool_mask_contribute_nothing_but_are_attended_to(loss_setup):
    trainer, model, batch = loss_setup
    tool_mask = torch.ones_like(batch["completion_mask"])
    tool_mask[0, 2:4] = 0  # an inserted tool response inside the first completion
    tool_mask[1, 5] = 0
    masked = {**batch, "tool_mask": tool_mask}
    loss, grads = _loss_and_grads(trainer, model, masked)

    shifted_old = batch["old_per_token_logps"].clone()
    shifted_old[0, 2:4] += 0.15  # the masked tokens' old log-probs (their share of the ratio)
    shifted_old[1, 5] -= 0.15
    loss_shifted, grads_shifted = _loss_and_grads(trainer, model, {**masked, "old_per_token_logps": shifted_old})
    torch.testing.assert_close(loss_shifted, loss, rtol=1e-12, atol=0.0)
    for g, h in zip(grads, grads_shifted):
        torch.testing.assert_close(h, g, rtol=1e-12, atol=1e-15)
    # without the mask the same change moves the loss: the check above is not vacuous
    plain, _ = _loss_and_grads(trainer, model, batch)
    plain_shifted, _ = _loss_and_grads(trainer, model, {**batch, "old_per_token_logps": shifted_old})
    assert (plain_shifted - plain).abs() > 1e-3  # measured 0.08

    # the masked tokens are still context (attention mask = completion_mask): changing one moves the later tokens' log-probs
    other_ids = batch["completion_ids"].clone()
    other_ids[0, 2] = (other_ids[0, 2] + 1) % 500 + 3
    loss_other_context, _ = _loss_and_grads(trainer, model, {**masked, "completion_ids": other_ids})
    assert (loss_other_context - loss).abs() > 1e-3  # measured 0.012


def test_tool_arguments_errors(tok, tmp_path):
    model = build_model(tok)

    def undocumented(x):
        return x

    with pytest.raises(ConfigError, match="undocumented"):
        RLOOTrainer(model=model, reward_funcs=[calculator_used], args=_config(tmp_path), train_dataset=_rows(), processing_class=tok,
                    tools=[undocumented])

    class NoReset:
        pass

    with pytest.raises(ConfigError, match="reset"):
        RLOOTrainer(model=model, reward_funcs=[calculator_used], args=_config(tmp_path), train_dataset=_rows(), processing_class=tok,
                    environment_factory=NoReset)

    class NoReward:
        def reset(self, **row):
            return None

    with pytest.raises(ConfigError, match="No reward source"):
        RLOOTrainer(model=model, args=_config(tmp_path), train_dataset=_rows(), processing_class=tok, environment_factory=NoReward)
    with pytest.raises(ConfigError, match="max_tool_calling_iterations"):
        _config(tmp_path, max_tool_calling_iterations=-1)
    with pytest.raises(ConfigError, match="tool_call_timeout"):
        _config(tmp_path, tool_call_timeout=0)
    assert tool_schema(add)["function"]["name"] == "add"
