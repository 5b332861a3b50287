"""GRPO options beyond TRL (posttrain-grpo 3.2): DAPO dynamic sampling, Clip-Cov / KL-Cov, REINFORCE++-baseline, IcePop.

Each is checked against a float64 derivation written here from the paper's formula (not from our
code): equal up to summation order, so 1e-10 relative holds on any machine while a wrong formula
(an error of order 1e-2 or more) cannot hide. Runs on tiny models, a few steps each.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random

import pytest
import torch
from grpo_helpers import FixedBackend, low_token_fraction

from posttrain import RolloutBatch, RolloutEngine, slice_rollout
from posttrain_grpo.config import GRPOConfig
from posttrain_grpo.trainer import (GRPOTrainer, compute_group_advantages, concat_rollouts, covariance_token_mask, informative_groups,
                                   standardize_advantages)


def _config(tmp_path, **overrides) -> GRPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return GRPOConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip() and "loss" in json.loads(line)]


def half_constant_reward(prompts, completion_ids, **kwargs):
    """1.0 for every completion of an 'even' prompt (a group without signal), the low-token fraction otherwise."""
    low = low_token_fraction(completion_ids)
    return [1.0 if "even" in p else r for p, r in zip(prompts, low)]


def position_reward(completion_ids, **kwargs):
    """A reward that always differs within a group of 4 (its position), so no group is ever dropped."""
    return [float(i % 4) + low for i, low in enumerate(low_token_fraction(completion_ids))]


@pytest.fixture
def parity_prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"{'even' if i % 2 == 0 else 'odd'} prompt {i}" for i in range(16)]})


# ----------------------------------------------------------------------------- DAPO dynamic sampling
def test_informative_groups_and_concat_rollouts():
    rewards = torch.tensor([[1.0], [1.0], [0.0], [1.0], [float("nan")], [0.5], [0.2], [0.2]], dtype=torch.float64)
    assert informative_groups(rewards, torch.ones(1, dtype=torch.float64), 2).tolist() == [False, True, False, False]  # NaN: one scored
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # equal weighted sums (1, 1) with weights (1, 1); different with (1, 2)
    assert informative_groups(two, torch.tensor([1.0, 1.0]), 2).tolist() == [False]
    assert informative_groups(two, torch.tensor([1.0, 2.0]), 2).tolist() == [True]
    rollout = RolloutBatch([[1], [1], [2], [2]], [[5, 6], [7], [8], [9, 10, 11]], [[-1.0, -2.0], [-3.0], [-4.0], [-5.0, -6.0, -7.0]],
                           [False, True, False, False], policy_version=3, extras={"reward_kwargs": {"x": [0, 1, 2, 3]}, "shared": "s"})
    parts = [slice_rollout(rollout, slice(2, 4)), slice_rollout(rollout, slice(0, 2))]
    joined = concat_rollouts(parts)
    assert joined.completion_ids == [[8], [9, 10, 11], [5, 6], [7]] and joined.truncated == [False, False, False, True]
    assert joined.extras == {"reward_kwargs": {"x": [2, 3, 0, 1]}, "shared": "s"} and joined.policy_versions == [3] * 4


def test_dynamic_sampling_trains_only_groups_with_signal(tiny_model, tiny_tokenizer, parity_prompts, tmp_path):
    """Half the prompts give constant rewards: every trained step has no zero-std group and needed extra rounds."""
    args = _config(tmp_path, max_steps=3, dynamic_sampling=True)
    GRPOTrainer(model=tiny_model, reward_funcs=half_constant_reward, args=args, train_dataset=parity_prompts, processing_class=tiny_tokenizer).train()
    metrics = _metrics(args.output_dir)
    assert len(metrics) == 3
    for m in metrics:
        assert m["frac_reward_zero_std"] == 0.0 and m["dynamic_sampling/filled_groups"] == 0.0
        assert m["dynamic_sampling/num_gen_batches"] >= 1.0
    assert any(m["dynamic_sampling/kept_fraction"] < 1.0 for m in metrics)  # some groups were dropped
    assert sum(m["dynamic_sampling/num_gen_batches"] for m in metrics) > 3  # and replaced from further prompts


def test_dynamic_sampling_cap_fills_the_step_with_dropped_groups(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    args = _config(tmp_path, max_steps=1, dynamic_sampling=True, max_num_gen_batches=3)
    GRPOTrainer(model=tiny_model, reward_funcs=lambda completion_ids, **kw: [0.5] * len(completion_ids), args=args,
                train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    (m,) = _metrics(args.output_dir)
    assert m["dynamic_sampling/num_gen_batches"] == 3.0 and m["dynamic_sampling/kept_fraction"] == 0.0
    assert m["dynamic_sampling/filled_groups"] == 2.0 and m["frac_reward_zero_std"] == 1.0 and m["loss"] == 0.0


def test_dynamic_sampling_without_dropped_groups_is_the_plain_run(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """No group is ever dropped: the same rollouts (same seeds, same prompts), bit-identical losses."""
    losses = []
    for on in (False, True):
        args = _config(tmp_path / str(on), max_steps=2, dynamic_sampling=on)
        GRPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=position_reward, args=args, train_dataset=prompt_dataset,
                    processing_class=tiny_tokenizer).train()
        losses.append([m["loss"] for m in _metrics(args.output_dir)])
    assert losses[0] == losses[1]


def test_dynamic_sampling_resume_is_exact(tiny_model, tiny_tokenizer, parity_prompts, tmp_path):
    """The extra prompts come from the checkpointed prompt source: a run resumed at step 2 logs the same steps 3-4."""
    tiny_model.double()
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, dynamic_sampling=True, beta=0.04)
    args = _config(tmp_path, **common)
    GRPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=half_constant_reward, args=args, train_dataset=parity_prompts,
                processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, **common, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
    GRPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=half_constant_reward, args=resumed_args, train_dataset=parity_prompts,
                processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["dynamic_sampling/num_gen_batches"] == full[step]["dynamic_sampling/num_gen_batches"]
        assert resumed[step]["reward"] == full[step]["reward"]


def sparse_reward_recorder(low: int = 3, high: int = 19, first: int = 2):
    """A sparse 0/1 verifiable reward: 1 if one of a completion's first ``first`` token ids is in [low, high).

    On the tiny random model (512 ids) a token hits the range with p ~ 1/32, so ~12% of completions score 1 and
    most groups of 4 start all-0. Returns ``(reward_func, per_step)``: ``per_step[step]`` collects every reward
    computed at that step, the dropped groups included, so its mean is the policy's unbiased reward (the logged
    ``reward`` of a dynamic-sampling run is over the kept groups only, which always contain a 1).
    """
    per_step: dict[int, list[float]] = {}

    def sparse_low_start(completion_ids, trainer_state=None, **kwargs):
        rewards = [1.0 if any(low <= t < high for t in c[:first]) else 0.0 for c in completion_ids]
        per_step.setdefault(trainer_state.global_step, []).extend(rewards)
        return rewards

    return sparse_low_start, per_step


def _first_and_last_five(per_step: dict[int, list[float]]) -> tuple[float, float]:
    means = [sum(per_step[s]) / len(per_step[s]) for s in sorted(per_step)]
    return sum(means[:5]) / 5, sum(means[-5:]) / 5


@pytest.fixture
def learning_prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})


def test_dynamic_sampling_learns_a_sparse_reward(tiny_tokenizer, learning_prompts, tmp_path):
    """Learning (DAPO dynamic sampling): on a sparse 0/1 reward where about half the groups of a plain run are
    all-0, the option trains on informative groups only (zero-std fraction exactly 0 at every step, no filled
    groups) and the policy's reward rises (mean over every generated completion, first 5 vs last 5 of 25 steps).

    Measured (seed 0, OMP_NUM_THREADS=1 and 2 alike): dynamic sampling 0.110 -> 0.456, zero-std fraction 0;
    the same run without the option 0.125 -> 0.250, zero-std fraction 0.50 of the groups trained on. Seeds 1, 2:
    +0.483 / +0.307 with the option vs +0.175 / +0.138 without, zero-std fraction 0.46 / 0.49 without.
    """
    from posttrain.testing.tiny_model import build_model

    runs = {}
    for on in (True, False):
        reward, per_step = sparse_reward_recorder()
        args = _config(tmp_path / str(on), per_device_train_batch_size=16, num_generations=4, max_completion_length=2, max_steps=25,
                       learning_rate=1e-2, seed=0, dynamic_sampling=on)
        GRPOTrainer(model=build_model(tiny_tokenizer, seed=0), reward_funcs=reward, args=args, train_dataset=learning_prompts,
                    processing_class=tiny_tokenizer).train()
        metrics = _metrics(args.output_dir)
        assert len(metrics) == 25 and len(per_step) == 25
        before, after = _first_and_last_five(per_step)
        zero_std = sum(m["frac_reward_zero_std"] for m in metrics) / len(metrics)
        runs[on] = dict(before=before, after=after, zero_std=zero_std, metrics=metrics)
        print(f"GRPO dynamic_sampling={on}: reward (all generated) {before:.3f} -> {after:.3f}; zero-std fraction trained on {zero_std:.2f}; "
              f"generation rounds {sum(m.get('dynamic_sampling/num_gen_batches', 1.0) for m in metrics):.0f}")
    on, off = runs[True], runs[False]
    assert all(m["frac_reward_zero_std"] == 0.0 and m["dynamic_sampling/filled_groups"] == 0.0 for m in on["metrics"])
    assert sum(m["dynamic_sampling/num_gen_batches"] for m in on["metrics"]) > 25  # all-0 groups were dropped and replaced
    assert off["zero_std"] > 0.3  # the same task without the option trains on many all-0 groups (measured 0.46-0.50)
    assert on["after"] > on["before"] + 0.15  # measured +0.346 (seeds 1, 2: +0.483, +0.307)
    assert on["after"] - on["before"] > off["after"] - off["before"]  # per step it learns faster (measured +0.35 vs +0.13)


# ----------------------------------------------------------------------------- Clip-Cov / KL-Cov: learning and entropy
@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_covariance_regularization_learns_and_keeps_entropy(tiny_tokenizer, learning_prompts, tmp_path, mode):
    """Learning (Cui et al. 2025): with Clip-Cov / KL-Cov the reward of the usual tiny task (fraction of low token ids,
    as test_grpo_trainer.py::test_reward_rises_on_a_verifiable_task) still rises, and the policy's entropy at the end
    (mean of the last 5 steps) stays well above the run without the option: the paper's claim.

    Ratios scaled to this batch: the paper's 2e-4 / 2e-3 select max(1, floor(r * T)) = 1 token of a T ~ 128-token
    micro-batch, which measurably does nothing here (final entropy 1.36 / 1.45 vs 1.45 without); 0.05 selects ~6
    (selected_fraction ~0.04-0.05). KL-Cov's penalty |log pi - log pi_old| is 0 with a zero gradient in a rollout's
    first update, so it acts only from a second update of the same rollout (the paper's PPO mini-batch epochs):
    num_iterations=2 here, and the run without the option uses it too.

    Measured (seed 0; OMP_NUM_THREADS=1 / 2): clip_cov reward 0.119 -> 0.878, final entropy 3.46 vs 1.45 without
    (both thread counts); kl_cov reward 0.108 -> 0.613 / 0.533, final entropy 4.15 / 4.83 vs 2.75 / 2.72 without.
    Seeds 1, 2: entropy gap >= 2.1 (clip_cov) and >= 0.79 (kl_cov), reward rise >= 0.73 / >= 0.39.
    """
    from posttrain.testing.tiny_model import build_model

    iterations = 2 if mode == "kl_cov" else 1
    option = dict(cov_regularization=mode, **({"clip_cov_ratio": 0.05} if mode == "clip_cov" else {"kl_cov_ratio": 0.05}))
    runs = {}
    for name, overrides in (("plain", {}), (mode, option)):
        args = _config(tmp_path / name, per_device_train_batch_size=16, num_generations=8, max_completion_length=8, max_steps=30,
                       learning_rate=3e-2, seed=0, num_iterations=iterations, **overrides)
        GRPOTrainer(model=build_model(tiny_tokenizer, seed=0), reward_funcs=low_token_fraction, args=args, train_dataset=learning_prompts,
                    processing_class=tiny_tokenizer).train()
        metrics = _metrics(args.output_dir)
        rewards, entropies = [m["reward"] for m in metrics], [m["entropy"] for m in metrics]
        runs[name] = dict(before=sum(rewards[:5]) / 5, after=sum(rewards[-5:]) / 5, entropy=sum(entropies[-5:]) / 5, metrics=metrics)
        print(f"GRPO {name} (num_iterations={iterations}): reward {runs[name]['before']:.3f} -> {runs[name]['after']:.3f}; "
              f"entropy {sum(entropies[:5]) / 5:.2f} -> {runs[name]['entropy']:.2f}")
    plain, regularized = runs["plain"], runs[mode]
    selected = [m[f"{mode}/selected_fraction"] for m in regularized["metrics"]]
    # the option acted on a few tokens at most steps (Clip-Cov: none at steps 1-2, no covariance in [1, 5] yet; measured 28 / 30 steps)
    assert max(selected) <= 0.06 and sum(f > 0.0 for f in selected) >= 20, selected
    assert regularized["after"] > regularized["before"] + (0.35 if mode == "clip_cov" else 0.2)  # measured +0.76 / +0.43 or more
    assert plain["after"] > plain["before"] + 0.5  # the contrast run learned too (its entropy fell by learning, not by accident)
    assert regularized["entropy"] > plain["entropy"] + (1.0 if mode == "clip_cov" else 0.5)  # measured gap 2.01 / 1.40 or more


# ----------------------------------------------------------------------------- REINFORCE++-baseline
def test_reinforce_pp_baseline_advantages_follow_the_paper():
    """Hu et al. 2025: A' = r - mean_group(r); A = (A' - mean_batch A') / std_batch(A') (Bessel, + 1e-4 as every std here)."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, 1, generator=gen, dtype=torch.float64)
    centered_ours, _ = compute_group_advantages(rewards.clone(), torch.ones(1, dtype=torch.float64), 4, "none", "sum_then_normalize")
    ours = standardize_advantages(centered_ours, rewards)
    r = rewards[:, 0].tolist()
    centered = [r[i] - sum(r[(i // 4) * 4 : (i // 4) * 4 + 4]) / 4 for i in range(12)]
    mean = sum(centered) / 12
    std = math.sqrt(sum((a - mean) ** 2 for a in centered) / 11)
    expected = torch.tensor([(a - mean) / (std + 1e-4) for a in centered], dtype=torch.float64)
    # float64 throughout (posttrain.nanstd forms its Bessel factor in the input's dtype since core 1.7); a wrong
    # normalization (population std, group std, no centering) is off by >= 4e-2 here
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- losses on a fixed batch (float64 derivations)
@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2).double()
    ref_model = copy.deepcopy(model)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in ref_model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05)
    prompts = Dataset.from_dict({"prompt": ["a b", "c d e"]})
    gen = torch.Generator().manual_seed(0)
    b, plen, clen = 6, 4, 7
    prompt_ids = torch.randint(3, 400, (b, plen), generator=gen)
    completion_ids = torch.randint(3, 400, (b, clen), generator=gen)
    completion_mask = torch.ones(b, clen, dtype=torch.long)
    for i, n in enumerate([7, 3, 5, 1, 6, 4]):
        completion_mask[i, n:] = 0
    batch = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids, "completion_mask": completion_mask}
    return dict(tok=tok, model=model, ref_model=ref_model, prompts=prompts, batch=batch,
                advantages=torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.1], dtype=torch.float64))


def _manual_logps(model, batch):
    """Per-token completion log-probs, written out: log_softmax of the full logits, gathered (float64)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, batch["prompt_ids"].shape[1] - 1 : -1]
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def _trainer(fixed, tmp_path, **overrides):
    args = _config(tmp_path, per_device_train_batch_size=6, num_generations=2, max_completion_length=7, **overrides)
    return GRPOTrainer(model=fixed["model"], reward_funcs=low_token_fraction, args=args, train_dataset=fixed["prompts"],
                       processing_class=fixed["tok"], rollout_engine=RolloutEngine(FixedBackend()))


def _cov(logps, adv, mask):
    """The paper's token covariance, in plain Python: (logp - mean logp)(A - mean A) over the completion tokens."""
    cells = [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]
    mean_l = sum(float(logps[i, j]) for i, j in cells) / len(cells)
    mean_a = sum(float(adv[i]) for i, _ in cells) / len(cells)
    return {(i, j): (float(logps[i, j]) - mean_l) * (float(adv[i]) - mean_a) for i, j in cells}


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_covariance_regularization_matches_the_paper(fixed, tmp_path, mode):
    """Cui et al. 2025 on the dapo loss: Clip-Cov detaches the gradient of randomly drawn tokens with covariance in
    [lb, ub]; KL-Cov adds coef * |log pi - log pi_old| on the top-k covariance tokens. Loss and gradients vs the derivation."""
    ratio = 0.3 if mode == "clip_cov" else 0.25
    overrides = dict(cov_regularization=mode, loss_type="dapo", epsilon_high=0.28)
    overrides.update(dict(clip_cov_ratio=ratio, clip_cov_lb=-0.05, clip_cov_ub=2.0) if mode == "clip_cov" else dict(kl_cov_ratio=ratio, kl_cov_coef=0.7))
    trainer = _trainer(fixed, tmp_path, **overrides)
    model, batch, adv = fixed["model"], dict(fixed["batch"]), fixed["advantages"]
    mask = batch["completion_mask"]
    with torch.no_grad():
        old = _manual_logps(model, batch) + torch.randn(mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.1
    batch.update(advantages=adv, old_per_token_logps=old * mask, num_completion_tokens=int(mask.sum()), cov_seed=1234)
    model.zero_grad()
    loss, metrics = trainer.compute_loss(model, batch, torch.tensor(float(mask.sum())))
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the derivation
    model.zero_grad()
    logps = _manual_logps(model, batch)
    cov = _cov(logps.detach(), adv, mask)
    count = len(cov)
    k = max(1, int(ratio * count))
    if mode == "kl_cov":
        selected = set(sorted(cov, key=lambda c: -cov[c])[:k])
    else:
        candidates = [c for c in sorted(cov) if -0.05 <= cov[c] <= 2.0]
        order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(1234)).tolist()
        selected = {candidates[i] for i in order[:k]}
    total = 0.0
    for (i, j) in cov:
        r = torch.exp(logps[i, j] - old[i, j])
        a = float(adv[i])
        term = -torch.min(r * a, torch.clamp(r, 1 - 0.2, 1 + 0.28) * a)
        if (i, j) in selected:
            term = term.detach() if mode == "clip_cov" else term + 0.7 * (logps[i, j] - old[i, j]).abs()
        total = total + term
    expected = total / count
    expected.backward()
    print(f"{mode}: {len(selected)} of {count} tokens selected; loss ours={loss.item():.10f} derivation={expected.item():.10f}")
    assert selected and len(selected) < count
    assert metrics[f"{mode}/selected_fraction"].item() == pytest.approx(len(selected) / count)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    for n, p in model.named_parameters():
        assert (ours[n] - p.grad).norm() <= 1e-8 * p.grad.norm() + 1e-14, n
    # the selection changes the gradient (the option is not a no-op on this batch)
    plain = _trainer(fixed, tmp_path / "plain", loss_type="dapo", epsilon_high=0.28)
    model.zero_grad()
    plain.compute_loss(model, batch, torch.tensor(float(mask.sum())))[0].backward()
    assert any((ours[n] - p.grad).norm() > 1e-6 * p.grad.norm() for n, p in model.named_parameters())


def test_k2_kl_estimator_matches_its_formula(fixed, tmp_path):
    trainer = _trainer(fixed, tmp_path, kl_estimator="k2", beta=0.3, loss_type="grpo", use_bias_correction_kl=False)
    model, batch = fixed["model"], dict(fixed["batch"])
    mask = batch["completion_mask"].double()
    with torch.no_grad():
        ref = _manual_logps(fixed["ref_model"], batch)
    batch.update(advantages=fixed["advantages"], ref_per_token_logps=ref, num_completion_tokens=int(mask.sum()))
    loss, metrics = trainer.compute_loss(model, batch, torch.tensor(6.0))
    logps = _manual_logps(model, batch)
    # on-policy ratio 1 (value), so the policy term is -A per token; k2 = (log pi - log pi_ref)^2 / 2
    per_token = -fixed["advantages"].unsqueeze(1) + 0.3 * 0.5 * (logps - ref) ** 2
    expected = ((per_token * mask).sum(1) / mask.sum(1)).sum() / 6
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    assert metrics["kl"].item() == pytest.approx(((0.5 * (logps - ref) ** 2 * mask).sum() / mask.sum()).item(), rel=1e-10)


# ----------------------------------------------------------------------------- IcePop on an engine whose log-probs differ
class MismatchedBackend(FixedBackend):
    """FixedBackend whose sampler log-probs are seeded draws in [-8, -4]: far from and near the policy's (~ -6)."""

    def generate(self, prompt_ids, sampling):
        batch = super().generate(prompt_ids, sampling)
        rng = random.Random(7)
        return RolloutBatch(batch.prompt_ids, batch.completion_ids, [[rng.uniform(-8.0, -4.0) for _ in c] for c in batch.completion_ids],
                            batch.truncated, policy_version=batch.policy_version)


def test_icepop_masks_tokens_outside_the_band(fixed, tmp_path):
    """Ling Team 2025 (IcePop): M(k) = k for alpha <= k <= beta else 0, k = pi_train(old) / pi_infer per token (alpha 0.5, beta 5)."""
    from posttrain_grpo._spec import SPEC

    icepop = SPEC.presets["icepop"].overrides
    args = _config(tmp_path, per_device_train_batch_size=6, num_generations=2, max_completion_length=6, **icepop)
    trainer = GRPOTrainer(model=fixed["model"], reward_funcs=low_token_fraction, args=args, train_dataset=fixed["prompts"],
                          processing_class=fixed["tok"], rollout_engine=RolloutEngine(MismatchedBackend()))
    (mb,) = trainer._generate_and_score([{"prompt": "a b"}, {"prompt": "c d e"}, {"prompt": "f"}], seed=0)
    mask = mb["completion_mask"].bool()
    rollout = MismatchedBackend().generate([trainer._prompt_ids({"prompt": p}) for p in ("a b", "c d e", "f")],
                                           type("S", (), {"n": 2, "max_tokens": 6})())
    with torch.no_grad():
        old = _manual_logps(fixed["model"].eval(), mb)
    inside = outside = 0
    for i, lps in enumerate(rollout.logprobs):
        for j, s in enumerate(lps):
            s = float(torch.tensor(s, dtype=torch.float32))  # engine log-probs travel as float32 tensors
            k = math.exp(float(old[i, j]) - s)
            expected = k if 0.5 <= k <= 5.0 else 0.0
            inside, outside = inside + (expected != 0.0), outside + (expected == 0.0)
            # 1e-6: rollout log-probs are kept as float32 (one rounding, ~1e-7); a wrong band or ratio is off by 100% or more
            assert float(mb["importance_sampling_ratio"][i, j]) == pytest.approx(expected, rel=1e-6, abs=1e-12), (i, j)
        assert mask[i, : len(lps)].all()
    print(f"IcePop: {inside} tokens kept, {outside} masked")
    assert inside and outside


