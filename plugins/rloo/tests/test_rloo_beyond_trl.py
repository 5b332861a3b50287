"""RLOO options beyond TRL (posttrain-rloo 3.2): DAPO dynamic sampling and the rollout correction (IcePop preset).

Derivations written here from the papers, in float64 on tiny models (see test_grpo_beyond_trl.py for GRPO's).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import pytest
import torch
from rloo_helpers import FixedBackend, low_token_fraction

from posttrain import RolloutBatch, RolloutEngine
from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.trainer import RLOOTrainer


def _config(tmp_path, **overrides) -> RLOOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", beta=0.0)
    values.update(overrides)
    return RLOOConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [m for m in (json.loads(line) for line in fh if line.strip()) if "loss" in m]


def half_constant_reward(prompts, completion_ids, **kwargs):
    """1.0 for every completion of an 'even' prompt (a group without signal), the low-token fraction otherwise."""
    return [1.0 if "even" in p else r for p, r in zip(prompts, low_token_fraction(completion_ids))]


@pytest.fixture
def parity_prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{'even' if i % 2 == 0 else 'odd'} prompt {i}" for i in range(16)]})


def test_dynamic_sampling_trains_only_groups_with_signal(tiny_model, tiny_tokenizer, parity_prompts, tmp_path):
    args = _config(tmp_path, max_steps=3, dynamic_sampling=True)
    RLOOTrainer(model=tiny_model, reward_funcs=half_constant_reward, args=args, train_dataset=parity_prompts, processing_class=tiny_tokenizer).train()
    metrics = _metrics(args.output_dir)
    assert len(metrics) == 3
    assert all(m["frac_reward_zero_std"] == 0.0 and m["dynamic_sampling/filled_groups"] == 0.0 for m in metrics)
    assert sum(m["dynamic_sampling/num_gen_batches"] for m in metrics) > 3


def test_dynamic_sampling_resume_is_exact(tiny_model, tiny_tokenizer, parity_prompts, tmp_path):
    tiny_model.double()
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, dynamic_sampling=True, beta=0.04)
    args = _config(tmp_path, **common)
    RLOOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=half_constant_reward, args=args, train_dataset=parity_prompts,
                processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, **common, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    RLOOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=half_constant_reward, args=resumed_args, train_dataset=parity_prompts,
                processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["dynamic_sampling/num_gen_batches"] == full[step]["dynamic_sampling/num_gen_batches"]


def sparse_reward_recorder(low: int = 3, high: int = 19, first: int = 2):
    """A sparse 0/1 verifiable reward: 1 if one of a completion's first ``first`` token ids is in [low, high).

    On the tiny random model (512 ids) ~12% of completions score 1, so most groups of 4 start all-0. Returns
    ``(reward_func, per_step)``: ``per_step[step]`` collects every reward computed at that step, dropped groups
    included, so its mean is the policy's unbiased reward (a dynamic-sampling run logs ``reward`` over kept groups).
    """
    per_step: dict[int, list[float]] = {}

    def sparse_low_start(completion_ids, trainer_state=None, **kwargs):
        rewards = [1.0 if any(low <= t < high for t in c[:first]) else 0.0 for c in completion_ids]
        per_step.setdefault(trainer_state.global_step, []).extend(rewards)
        return rewards

    return sparse_low_start, per_step


def test_dynamic_sampling_learns_a_sparse_reward(tiny_tokenizer, tmp_path):
    """Learning (DAPO dynamic sampling on RLOO): on a sparse 0/1 reward where about half the groups of a plain run
    are all-0, the option trains on informative groups only (zero-std fraction exactly 0 at every step) and the
    policy's reward (mean over every generated completion) rises, first 5 vs last 5 of 25 steps.

    Measured (seed 0, OMP_NUM_THREADS=1 and 2 alike): dynamic sampling 0.110 -> 0.444, zero-std fraction 0;
    without the option 0.125 -> 0.250, zero-std fraction 0.50. Seeds 1, 2: +0.496 / +0.309 with the option vs
    +0.175 / +0.138 without (zero-std fraction 0.46 / 0.49).
    """
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    runs = {}
    for on in (True, False):
        reward, per_step = sparse_reward_recorder()
        args = _config(tmp_path / str(on), per_device_train_batch_size=16, num_generations=4, max_completion_length=2, max_steps=25,
                       learning_rate=1e-2, seed=0, dynamic_sampling=on)
        RLOOTrainer(model=build_model(tiny_tokenizer, seed=0), reward_funcs=reward, args=args, train_dataset=prompts,
                    processing_class=tiny_tokenizer).train()
        metrics = _metrics(args.output_dir)
        assert len(metrics) == 25 and len(per_step) == 25
        means = [sum(per_step[s]) / len(per_step[s]) for s in sorted(per_step)]
        before, after = sum(means[:5]) / 5, sum(means[-5:]) / 5
        zero_std = sum(m["frac_reward_zero_std"] for m in metrics) / len(metrics)
        runs[on] = dict(before=before, after=after, zero_std=zero_std, metrics=metrics)
        print(f"RLOO dynamic_sampling={on}: reward (all generated) {before:.3f} -> {after:.3f}; zero-std fraction trained on {zero_std:.2f}; "
              f"generation rounds {sum(m.get('dynamic_sampling/num_gen_batches', 1.0) for m in metrics):.0f}")
    on, off = runs[True], runs[False]
    assert all(m["frac_reward_zero_std"] == 0.0 and m["dynamic_sampling/filled_groups"] == 0.0 for m in on["metrics"])
    assert sum(m["dynamic_sampling/num_gen_batches"] for m in on["metrics"]) > 25  # all-0 groups were dropped and replaced
    assert off["zero_std"] > 0.3  # the same task without the option trains on many all-0 groups (measured 0.46-0.50)
    assert on["after"] > on["before"] + 0.15  # measured +0.333 (seeds 1, 2: +0.496, +0.309)
    assert on["after"] - on["before"] > off["after"] - off["before"]  # per step it learns faster (measured +0.33 vs +0.13)


class MismatchedBackend(FixedBackend):
    """FixedBackend whose sampler log-probs are seeded draws in [-8, -4]: far from and near the policy's (~ -6)."""

    def generate(self, prompt_ids, sampling):
        batch = super().generate(prompt_ids, sampling)
        rng = random.Random(7)
        return RolloutBatch(batch.prompt_ids, batch.completion_ids, [[rng.uniform(-8.0, -4.0) for _ in c] for c in batch.completion_ids],
                            batch.truncated, policy_version=batch.policy_version)


@pytest.mark.parametrize("preset_or_mode", ["icepop", "sequence_mask"])
def test_rollout_correction_on_an_engine_whose_logprobs_differ(tiny_tokenizer, tmp_path, preset_or_mode):
    """IcePop (Ling Team 2025): token weight M(k) = k inside [0.5, 5], else 0, on each token's gradient of the sequence
    objective (value unchanged); sequence_mask: the sequence loss times exp(sum_t log pi_old - log pi_sampler) or 0.
    Loss and gradients vs a float64 derivation on a fixed rollout."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model
    from posttrain_rloo._spec import SPEC

    if preset_or_mode == "icepop":
        overrides = dict(SPEC.presets["icepop"].overrides)
        lo, hi = 0.5, 5.0
    else:
        overrides = dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=1e6)
        lo, hi = -math.inf, 1e6
    model = build_model(tiny_tokenizer, hidden_size=32, num_layers=2).double()
    args = _config(tmp_path, per_device_train_batch_size=6, num_generations=2, **overrides)
    trainer = RLOOTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=Dataset.from_dict({"prompt": ["a b", "c"]}),
                          processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(MismatchedBackend()))
    (mb,) = trainer._generate_and_score([{"prompt": "a b"}, {"prompt": "c d e"}, {"prompt": "f"}], seed=0)
    mask = mb["completion_mask"].double()
    rollout = MismatchedBackend().generate([trainer._prompt_ids({"prompt": p}) for p in ("a b", "c d e", "f")], type("S", (), {"n": 2, "max_tokens": 6})())
    sampler = torch.zeros_like(mask)
    for i, lps in enumerate(rollout.logprobs):
        sampler[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32).double()  # engine log-probs travel as float32
    model.zero_grad()
    loss, _ = trainer.compute_loss(model, dict(mb), torch.tensor(6.0))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the derivation: logps written out; pi_old and the advantages as the trainer produced them
    model.zero_grad()
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
    logits = model(input_ids=ids, attention_mask=torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)).logits[:, mb["prompt_ids"].shape[1] - 1 : -1]
    logps = torch.log_softmax(logits.double(), -1).gather(-1, mb["completion_ids"].unsqueeze(-1)).squeeze(-1)
    old = mb["old_per_token_logps"].double()  # pi_old as the trainer stored it (its no-grad forward at generation time)
    adv = mb["advantages"].double()
    if preset_or_mode == "icepop":
        k = torch.exp(old - sampler)
        w = torch.where((k >= lo) & (k <= hi), k, torch.zeros_like(k)) * mask
        surrogate = (logps.detach() + w * (logps - logps.detach())) * mask  # value log pi, gradient w * grad log pi
        ratio = torch.exp(surrogate.sum(1) - (old * mask).sum(1))
        seq_w = torch.ones_like(adv)
        print(f"IcePop on RLOO: {int(((w == 0) & (mask == 1)).sum())} of {int(mask.sum())} tokens masked")
    else:
        ratio = torch.exp(((logps - old) * mask).sum(1))
        s = torch.exp(((old - sampler) * mask).sum(1))
        seq_w = torch.where(s <= hi, s, torch.zeros_like(s))
        print(f"sequence_mask on RLOO: weights {seq_w.tolist()}")
    per_seq = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv) * seq_w
    expected = per_seq.sum() / 6
    expected.backward()
    # the per-sequence terms cancel (advantages sum to ~0), so the tolerance is relative to their magnitude: the stored pi_old,
    # sampler log-probs and IS weights are float32 (~1e-7 each); a wrong weight moves the loss by >= 1e-2 of it
    assert abs(loss.item() - expected.item()) <= 1e-6 * per_seq.abs().sum().item() / 6
    worst = max(((ours[n] - p.grad).norm() / p.grad.norm().clamp(min=1e-30)).item() for n, p in model.named_parameters() if p.grad.norm() > 0)
    print(f"worst relative gradient difference {worst:.1e}")
    assert worst <= 1e-5  # IS weights from float32 log-probs (a sequence weight exponentiates a sum of them: ~1e-6); a wrong weight moves gradients by >= 1e-2
