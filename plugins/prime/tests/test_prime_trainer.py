"""PRIME trainer: training both models, learning, the PRM learning the outcome, online filtering, gradient accumulation,
exact resume of the policy AND the PRM with its optimizer, validation errors, examples/prime.yaml through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from prime_helpers import FixedBackend, low_token_fraction

import posttrain
from posttrain import ConfigError
from posttrain.testing import warning_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("prime", allow_experimental=True)
    yield


def _classes():
    from posttrain.experimental.prime import PRIMEConfig, PRIMETrainer

    return PRIMEConfig, PRIMETrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=2,
                  learning_rate=1e-2, prm_learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_train_changes_the_policy_and_the_prm_not_the_reference(tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, max_steps=3, num_iterations=2, eval_strategy="steps", eval_steps=3)
    trainer = _classes()[1](model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                            eval_dataset=prompt_dataset.select(range(2)), processing_class=tiny_tokenizer)
    ref_before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    out = trainer.train()
    assert {"eval_loss", "eval_prm_loss", "eval_reward", "eval_prm/excess_ce"} <= set(out.metrics)
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"policy {name} did not change"
    for name, p in trainer.prm.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"PRM {name} did not change"
    for name, p in trainer.ref_model.named_parameters():
        assert torch.equal(ref_before[name], p.detach()), f"reference {name} changed"
    logged = _metrics(args.output_dir)
    expected = {"loss", "prm_loss", "reward", "prm/accuracy", "prm/implicit_reward_mean", "prm/reward_margin", "prm/kl_to_ref", "prm/excess_ce", "frac_filtered",
                "entropy", "clip_ratio/region_mean", "completions/mean_length"}
    assert expected <= set(logged[0]), expected - set(logged[0])
    assert os.path.isfile(os.path.join(args.output_dir, "prm", "config.json"))  # the final PRM, loadable with from_pretrained


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the outcome reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=4, max_completion_length=8, max_steps=30, learning_rate=3e-2,
                   prm_learning_rate=1e-2, beta=0.05)
    _classes()[1](model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer).train()
    rewards = [m["reward"] for m in _metrics(args.output_dir)]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"PRIME learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}")
    assert warning_events(args.output_dir) == []
    assert after > before + 0.15


def test_the_implicit_prm_learns_the_outcome(tiny_tokenizer, tmp_path):
    """The PRM alone (policy frozen: learning_rate=0, so the outcome labels keep one distribution): scored on each step's fresh
    rollouts BEFORE it trains on them, its excess cross-entropy KL(label || sigmoid(beta * log pi_prm/pi_ref)) falls."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=4, max_completion_length=8, max_steps=20, learning_rate=0.0,
                   prm_learning_rate=1e-2, beta=0.5)
    _classes()[1](model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer).train()
    logged = _metrics(args.output_dir)
    excess, rewards = [m["prm/excess_ce"] for m in logged], [m["reward"] for m in logged]
    before, after = sum(excess[:5]) / 5, sum(excess[-5:]) / 5
    print(f"PRIME PRM: held-out excess cross-entropy first 5 steps {before:.4f} -> last 5 steps {after:.4f} (reward {rewards[0]:.3f} .. {rewards[-1]:.3f})")
    assert after < 0.7 * before


def test_online_filter_drops_prompts_outside_the_accuracy_range(tiny_tokenizer, prompt_dataset, tmp_path):
    """accuracy_filter_range: a prompt whose mean outcome is outside [low, high] gets no advantage and no PRM loss."""
    from posttrain import RolloutEngine
    from posttrain.testing.tiny_model import build_model

    args = _config(tmp_path, accuracy_filter_range=[0.5, 0.8])
    trainer = _classes()[1](model=build_model(tiny_tokenizer).double(), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                            processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend(vocab=130)))
    rows = [trainer.train_dataset[i] for i in range(2)]
    (batch,) = trainer._generate_and_score(rows, seed=0)
    means = []  # each prompt's mean outcome, recomputed from the unpadded completions
    for g in range(2):
        ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(batch["completion_ids"][g * 4:(g + 1) * 4].tolist(), batch["completion_mask"][g * 4:(g + 1) * 4].tolist())]
        means.append(sum(low_token_fraction(ids)) / 4)
    expected_keep = torch.tensor([0.5 <= m <= 0.8 for m in means]).repeat_interleave(4).float()
    assert 0 < expected_keep.sum() < 8, means  # one group kept, one dropped (fixed rollouts)
    assert torch.equal(batch["keep"], expected_keep), (means, batch["keep"])
    assert torch.all(batch["advantages"][expected_keep == 0] == 0)
    losses, _ = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items()}, num_items_in_batch=8)
    assert torch.isfinite(losses["prm"]) and torch.isfinite(losses["model"])


def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, prompt_dataset, tmp_path):
    """Same fixed rollouts: per-device batch 8 x GA 1 and 1 x 8 update the policy AND the PRM the same (float64).

    The advantages (baselines, returns, whitening) are computed over the whole step before it is split, and both losses
    are sums over sequences / the step's sequences. The stored float32 log-probs, scored in different batch shapes, can
    round differently (~1e-7 relative): each tensor's update is compared by relative norm to 1e-5.
    """
    from posttrain import RolloutEngine
    from prime_helpers import perturbed_copy
    from posttrain.testing.tiny_model import build_model

    params = []
    for bs, ga in ((8, 1), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0,
                       prm_learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, beta=0.5)
        model = build_model(tiny_tokenizer).double()
        trainer = _classes()[1](model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer,
                                rollout_engine=RolloutEngine(FixedBackend()), prm_model=perturbed_copy(model, scale=0.05, seed=2))
        trainer.train()
        params.append({**{("policy", n): p.detach().clone() for n, p in model.named_parameters()},
                       **{("prm", n): p.detach().clone() for n, p in trainer.prm.named_parameters()}})
    initial_policy = build_model(tiny_tokenizer).double()
    initial = {**{("policy", n): p.detach() for n, p in initial_policy.named_parameters()},
               **{("prm", n): p.detach() for n, p in perturbed_copy(initial_policy, scale=0.05, seed=2).named_parameters()}}
    worst = 0.0
    for key in params[0]:
        update_a, update_b = params[0][key] - initial[key], params[1][key] - initial[key]
        assert update_a.norm() > 0, key
        rel = ((update_a - update_b).norm() / update_a.norm()).item()
        assert rel <= 1e-5, f"{key}: the updates differ by {rel:.2e} relative"
        worst = max(worst, rel)
    print(f"PRIME GA 8x1 vs 1x8: worst relative update difference (policy and PRM) {worst:.2e}")


def test_resume_reproduces_the_policy_and_the_prm(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse), resume: steps 4-5 log the same policy and PRM losses, and end with the same PRM (float64)."""
    import copy

    tiny_model.double()
    args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2)
    full_trainer = _classes()[1](model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                                 processing_class=tiny_tokenizer)
    full_trainer.train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    full_prm = {n: p.detach().clone() for n, p in full_trainer.prm.named_parameters()}
    assert os.path.isdir(os.path.join(args.output_dir, "checkpoint-3", "prm"))
    resumed_args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    resumed_trainer = _classes()[1](model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset,
                                    processing_class=tiny_tokenizer)
    resumed_trainer.train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12, abs=1e-15), step
        assert resumed[step]["prm_loss"] == pytest.approx(full[step]["prm_loss"], rel=1e-12), step
        assert resumed[step]["reward"] == full[step]["reward"]
    for name, p in resumed_trainer.prm.named_parameters():
        torch.testing.assert_close(p.detach(), full_prm[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(num_generations=1, per_device_train_batch_size=4), "num_generations=1 is invalid"),
        (dict(per_device_train_batch_size=6), r"num_generations=4 does not divide"),
        (dict(beta=0.0), "beta=0.0 is invalid"),
        (dict(prm_learning_rate=-1.0), "prm_learning_rate=-1.0 is invalid"),
        (dict(accuracy_filter_range=[0.8, 0.2]), r"accuracy_filter_range=\[0.8, 0.2\] is invalid"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_peft_is_refused_in_one_line(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="peft_config is not supported by PRIME"):
        _classes()[1](model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset,
                      processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))


def test_example_yaml_trains_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "cli")
    code = main(["train", "prime", "--config", "examples/prime.yaml", "--allow-experimental", "prime", "--model_name_or_path", tiny_model_dir,
                 "--output_dir", out, "--max_steps", "3", "--save_strategy", "no"])
    assert code in (0, None)
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]


def test_advantages_leave_dropped_rows_out_of_baselines_and_whitening():
    from posttrain_prime.trainer import compute_prime_advantages

    r = [torch.tensor([0.1, 0.2], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64), torch.tensor([9.0, 9.0], dtype=torch.float64)]
    outcome, keep = torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64), torch.tensor([True, True, False])
    adv = compute_prime_advantages(r + [torch.tensor([0.0], dtype=torch.float64)], torch.cat([outcome, torch.zeros(1, dtype=torch.float64)]),
                                   torch.cat([keep, torch.tensor([False])]), 2, whiten=False)
    # group 0: b_0 = mean(r_1) = 0.3, b_1 = mean(r_0) = 0.15; outcome RLOO +1 / -1; group 1 fully dropped: zeros
    torch.testing.assert_close(adv[0], torch.tensor([(0.1 - 0.3) + (0.2 - 0.3) + 1.0, (0.2 - 0.3) + 1.0], dtype=torch.float64))
    torch.testing.assert_close(adv[1], torch.tensor([(0.3 - 0.15) - 1.0], dtype=torch.float64))
    assert adv[2].eq(0).all() and adv[3].eq(0).all()
    white = compute_prime_advantages(r + [torch.tensor([0.0], dtype=torch.float64)], torch.cat([outcome, torch.zeros(1, dtype=torch.float64)]),
                                     torch.cat([keep, torch.tensor([False])]), 2, whiten=True)
    kept = torch.cat([white[0], white[1]])
    assert abs(kept.mean().item()) < 1e-12 and white[2].eq(0).all()  # whitened over the kept tokens only
