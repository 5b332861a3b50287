"""GRPO with a replay buffer: the gate and TRL's names, the replay step against an independent computation, learning on a
binary reward, exact resume with a non-empty buffer, the paper preset, validation errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from grpo_replay_helpers import first_token_is_low, low_token_fraction

import posttrain
from posttrain import ConfigError, RolloutBatch
from posttrain.testing import warning_events


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("grpo_replay", allow_experimental=True)
    yield


def _classes():
    from posttrain_grpo_replay.config import GRPOWithReplayBufferConfig
    from posttrain_grpo_replay.trainer import GRPOWithReplayBufferTrainer

    return GRPOWithReplayBufferConfig, GRPOWithReplayBufferTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none",
                  gradient_checkpointing=False)
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_experimental_import_exports_trls_names():
    from posttrain.experimental.grpo_replay import GRPOWithReplayBufferConfig, GRPOWithReplayBufferTrainer, ReplayBuffer  # noqa: F401

    assert GRPOWithReplayBufferConfig(output_dir="unused", report_to="none").replay_buffer_size == 64  # TRL's default


def test_replay_buffers_high_variance_groups_and_replaces_zero_variance_ones(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Four groups of 2: groups 0 and 2 have reward variance, 1 and 3 none. The buffer gets 0 and 2 with score
    sum |A| * std (computed here independently, in float64), and 1 and 3 become buffered groups with their advantages."""
    trainer = _classes()[1](model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, num_generations=2, replay_buffer_size=3),
                            train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    rollout = RolloutBatch([[10 + g] for g in range(4) for _ in range(2)], [[100 + i, 5] for i in range(8)], [[-1.0, -2.0]] * 8, [False] * 8)
    rewards = torch.tensor([[1.0], [0.0], [0.5], [0.5], [0.2], [0.9], [0.3], [0.3]])
    advantages = torch.tensor([0.7, -0.7, 0.0, 0.0, -0.6, 0.6, 0.0, 0.0])
    new_rollout, new_advantages, metrics = trainer._replay(rollout, rewards, advantages, 2)

    stds = [torch.tensor([1.0, 0.0], dtype=torch.float64).std().item(), torch.tensor([0.2, 0.9], dtype=torch.float64).std().item()]
    expected = {0: 1.4 * stds[0], 2: 1.2 * stds[1]}  # group -> sum_i |A_i| * std
    heap = {entry[1]["prompt_ids"][0][0] - 10: entry[0] for entry in trainer.replay_buffer.heap}  # (score, data) pairs, as TRL
    assert sorted(heap) == [0, 2]
    for g, score in expected.items():
        assert heap[g] == pytest.approx(score, rel=1e-6)
    assert metrics == {"replay/buffer_size": 2.0, "replay/replaced_groups": 2.0}
    for g in (1, 3):  # replaced: their rows are now a buffered group's, with its advantages
        source = new_rollout.prompt_ids[2 * g][0] - 10
        assert source in (0, 2)
        assert new_rollout.completion_ids[2 * g : 2 * g + 2] == rollout.completion_ids[2 * source : 2 * source + 2]
        assert new_advantages[2 * g : 2 * g + 2].tolist() == advantages[2 * source : 2 * source + 2].tolist()
    for g in (0, 2):  # kept
        assert new_rollout.completion_ids[2 * g : 2 * g + 2] == rollout.completion_ids[2 * g : 2 * g + 2]

    # an empty buffer leaves zero-variance groups as they are (TRL failed here)
    empty = _classes()[1](model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path / "e", num_generations=2),
                          train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    flat = torch.tensor([[0.5]] * 8)
    same_rollout, same_advantages, metrics = empty._replay(rollout, flat, torch.zeros(8), 2)
    assert same_rollout is rollout and metrics["replay/replaced_groups"] == 0.0 and len(empty.replay_buffer) == 0


def test_reward_rises_on_a_binary_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning on a 0/1 reward, where all-equal groups are common (at the start some all 0, later some all 1) and get replaced."""
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_completion_length=4, max_steps=30, learning_rate=3e-2,
                   loss_type="grpo", replay_buffer_size=8)
    trainer = _classes()[1](model=build_model(tiny_tokenizer), reward_funcs=first_token_is_low, args=args, train_dataset=prompts,
                            processing_class=tiny_tokenizer)
    trainer.train()
    logged = _metrics(args.output_dir)
    rewards = [m["reward"] for m in logged]
    replaced = sum(m["replay/replaced_groups"] for m in logged)
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GRPO-replay learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}; {replaced:.0f} groups replayed")
    assert after > before + 0.3
    assert replaced > 0


def test_resume_restores_the_buffer_and_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 with a non-empty buffer (binary reward: groups are replaced), resume: steps 4-6 log the same
    losses and replay counts (float64: a missing buffer or generator state changes the replayed groups and the loss)."""
    tiny_model.double()
    trainer_cls = _classes()[1]
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, beta=0.04, num_generations=4, replay_buffer_size=4, learning_rate=3e-2,
                  max_completion_length=3)
    args = _config(tmp_path, **common)
    trainer_cls(model=copy.deepcopy(tiny_model), reward_funcs=first_token_is_low, args=args, train_dataset=prompt_dataset,
                processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    assert sum(full[s]["replay/replaced_groups"] for s in (4, 5, 6)) > 0, "no group was replayed after the checkpoint: the test shows nothing"
    resumed_args = _config(tmp_path, **common, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    trainer_cls(model=copy.deepcopy(tiny_model), reward_funcs=first_token_is_low, args=resumed_args, train_dataset=prompt_dataset,
                processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        for key in ("reward", "replay/buffer_size", "replay/replaced_groups"):
            assert resumed[step][key] == full[step][key], (step, key)


def test_paper_preset_sets_grpos_hyperparameters(tmp_path):
    from posttrain_grpo_replay._spec import SPEC

    args = _config(tmp_path, **SPEC.presets["grpo_replay"].overrides)
    assert (args.loss_type, args.scale_rewards, args.epsilon, args.beta, args.replay_buffer_size) == ("grpo", "group", 0.2, 0.04, 64)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(replay_buffer_size=-1), "replay_buffer_size=-1 is invalid"),
        (dict(num_generations=3), "num_generations=3 does not divide"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_buffer_off_is_plain_grpo(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _classes()[1](model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, replay_buffer_size=0),
                            train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert trainer.replay_buffer is None
    trainer.train()
    assert "replay/buffer_size" not in _metrics(trainer.args.output_dir)[0]
    assert warning_events(trainer.args.output_dir) == []
