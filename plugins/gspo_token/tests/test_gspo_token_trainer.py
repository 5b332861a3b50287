"""GSPO-token trainer: the gate and TRL's names, learning, gradient-accumulation equivalence, exact resume, the paper
preset, the GSPO-token gradient identity, and validation errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from gspo_token_helpers import FixedBackend, low_token_fraction, perturbed_copy

import posttrain
from posttrain import ConfigError
from posttrain.testing import warning_events


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gspo_token", allow_experimental=True)
    yield


def _classes():
    from posttrain_gspo_token.config import GSPOTokenConfig
    from posttrain_gspo_token.trainer import GSPOTokenTrainer

    return GSPOTokenConfig, GSPOTokenTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_experimental_import_exports_trls_names():
    from posttrain.experimental.gspo_token import GRPOConfig, GRPOTrainer, GSPOTokenConfig, GSPOTokenTrainer

    assert GRPOTrainer is GSPOTokenTrainer and GRPOConfig is GSPOTokenConfig
    assert GSPOTokenConfig(output_dir="unused", report_to="none").importance_sampling_level == "sequence_token"


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the mean reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps."""
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_completion_length=8, max_steps=30, learning_rate=3e-2,
                   loss_type="grpo")
    trainer = _classes()[1](model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts,
                            processing_class=tiny_tokenizer)
    trainer.train()
    rewards = [m["reward"] for m in _metrics(args.output_dir)]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GSPO-token learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}")
    assert after > before + 0.15
    assert warning_events(args.output_dir) == []  # a healthy run raises no false alarm


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, prompt_dataset, tmp_path, loss_type):
    """Same fixed rollouts: per-device batch 8 x GA 1 and 1 x 8 give the same parameters after one step (float64, 1e-10)."""
    from posttrain import RolloutEngine
    from posttrain.testing.tiny_model import build_model

    params = []
    for bs, ga in ((8, 1), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, num_generations=8, max_steps=1,
                       learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, loss_type=loss_type, beta=0.1,
                       vllm_importance_sampling_correction=False)
        model = build_model(tiny_tokenizer).double()
        trainer = _classes()[1](model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                                processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend()))
        trainer.ref_model = trainer.loop.prepare_frozen(perturbed_copy(model))  # a reference that differs: the KL term has a gradient
        trainer.train()
        params.append({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
    initial = dict(build_model(tiny_tokenizer).double().named_parameters())
    for name in params[0]:
        assert not torch.equal(params[0][name], initial[name].detach())
        torch.testing.assert_close(params[0][name], params[1][name], rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2, so the sequence ratios differ from 1), resume: steps 4-5
    log the same losses and clip fractions (float64: a wrongly restored state moves the loss by far more than 1e-12)."""
    tiny_model.double()
    trainer_cls = _classes()[1]
    common = dict(max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04, loss_type="grpo", epsilon=0.01)
    args = _config(tmp_path, **common)
    trainer_cls(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, **common, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    trainer_cls(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset,
                processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["reward"] == full[step]["reward"]
        assert resumed[step]["clip_ratio/region_mean"] == full[step]["clip_ratio/region_mean"]


def test_token_weight_has_the_sequence_value_and_the_token_gradient(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """GSPO-token's weight equals GSPO's sequence ratio on every token, and with one advantage per sequence (unclipped)
    its gradient equals GSPO's (the paper's remark), while the token-level GRPO gradient differs."""
    from posttrain_gspo_token.trainer import importance_weights

    tiny_model.double()
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float64)
    logps = (torch.randn(2, 4, generator=gen, dtype=torch.float64) - 2).requires_grad_()
    old = logps.detach() + 0.05 * torch.randn(2, 4, generator=gen, dtype=torch.float64)
    advantages = torch.tensor([[1.0], [-0.7]], dtype=torch.float64)
    token_w = torch.exp(importance_weights(logps, old, mask, "sequence_token"))
    seq_w = torch.exp(importance_weights(logps, old, mask, "sequence"))
    torch.testing.assert_close(token_w * mask, seq_w.expand_as(mask) * mask, rtol=1e-15, atol=0)
    grads = {}
    for level in ("sequence_token", "sequence", "token"):
        w = torch.exp(importance_weights(logps, old, mask, level)).expand_as(mask)
        loss = -((w * advantages * mask).sum(-1) / mask.sum(-1)).mean()
        grads[level], = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(grads["sequence_token"], grads["sequence"], rtol=1e-12, atol=1e-15)
    assert not torch.allclose(grads["sequence_token"], grads["token"])


def test_paper_preset_sets_the_papers_hyperparameters(tmp_path):
    from posttrain_gspo_token._spec import SPEC

    overrides = SPEC.presets["gspo_token"].overrides
    args = _config(tmp_path, **overrides)
    assert (args.importance_sampling_level, args.loss_type, args.epsilon, args.epsilon_high, args.beta) == ("sequence_token", "grpo", 3e-4, 4e-4, 0.0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(loss_type="cispo"), "loss_type='cispo' is invalid: use one of grpo, dr_grpo, dapo, bnpo"),
        (dict(importance_sampling_level="tokens"), "importance_sampling_level='tokens' is invalid: use one of sequence_token, sequence, token"),
        (dict(num_generations=3), "num_generations=3 does not divide"),
        (dict(epsilon=0.0), "clipping ranges must be > 0"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_missing_reward_funcs_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="reward"):
        _classes()[1](model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
