"""Parity with TRL 1.16's RLOOTrainer: same tiny weights, batch and hyperparameters give the same loss and gradients.

The ``# Copied from`` blocks shared with GRPO are checked for every plugin by tests/test_copied_blocks.py.
Both trainers run on the CPU.

Tolerances. Both sides run float32: TRL's fused LM head computes its log-probs in float32 whatever
the model's dtype (float64 weights would only move the difference onto TRL's side); we score chunks of
hidden states against the LM head, with other reduction orders. Each token log-prob then carries a
rounding error of a few float32 ulps of log(V) ~ 6 (eps32 = 1.2e-7), ~1e-6 absolute; the sequence
ratios exp(sum logp - old) carry ~1e-5 relative at most (<= 7 tokens), and the loss, a mean of terms
of order |advantage| <= 1.2 with both signs, ~1e-6 absolute however much they cancel: the loss agrees
to 1e-5 relative plus 1e-6 absolute (measured on this CPU: equal). Gradients are compared
per tensor by the norm of the difference relative to their own norm, to 1e-5 (measured: <= 4e-7),
never entry by entry: entries near zero are all rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from rloo_helpers import low_token_fraction

trl = pytest.importorskip("trl")

from posttrain_rloo.config import RLOOConfig  # noqa: E402
from posttrain_rloo.trainer import RLOOTrainer, compute_rloo_advantages, per_token_logps_and_entropies  # noqa: E402

B, MAX_LEN = 6, 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2)
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    trl_args = trl.RLOOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, report_to="none", use_cpu=True,
                              per_device_train_batch_size=B, num_generations=2, max_completion_length=MAX_LEN, beta=0.0)
    trl_trainer = trl.RLOOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=trl_args, train_dataset=prompts, processing_class=tok)
    ours_args = RLOOConfig(output_dir=str(tmp_path_factory.mktemp("ours")), per_device_train_batch_size=B, num_generations=2,
                           max_completion_length=MAX_LEN, report_to="none", save_strategy="no", beta=0.0)
    ours = RLOOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=ours_args, train_dataset=prompts, processing_class=tok)
    gen = torch.Generator().manual_seed(0)
    prompt_lens, completion_lens = [3, 5, 5, 2, 4, 5], [7, 3, 1, 5, 7, 4]
    batch = {k: torch.zeros(B, w, dtype=torch.long) for k, w in (("prompt_ids", 5), ("prompt_mask", 5), ("completion_ids", MAX_LEN), ("completion_mask", MAX_LEN))}
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        batch["prompt_ids"][i, 5 - p :] = torch.randint(3, 400, (p,), generator=gen)
        batch["prompt_mask"][i, 5 - p :] = 1
        batch["completion_ids"][i, :c] = torch.randint(3, 400, (c,), generator=gen)
        batch["completion_mask"][i, :c] = 1
    with torch.no_grad():
        current, _ = per_token_logps_and_entropies(model, batch, 1.0, compute_entropy=False)
    mask = batch["completion_mask"].float()
    old = (current + torch.randn(current.shape, generator=torch.Generator().manual_seed(3)) * 0.05) * mask
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.1])
    return dict(trl=trl_trainer, ours=ours, batch=batch, old=old)


@pytest.mark.parametrize("overrides", [dict(), dict(epsilon=0.05, epsilon_high=0.08), dict(temperature=0.7)], ids=["default", "asymmetric_clip", "temperature"])
def test_loss_and_gradients_match_trl(setup, overrides):
    from trl.trainer.utils import add_fused_lm_head

    args = RLOOConfig(output_dir=setup["ours"].args.output_dir, per_device_train_batch_size=B, num_generations=2, max_completion_length=MAX_LEN,
                      report_to="none", save_strategy="no", beta=0.0, **overrides)
    t, ours = setup["trl"], setup["ours"]
    t.epsilon_low, t.epsilon_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
    add_fused_lm_head(t.model, temperature=args.temperature, outputs=("log_probs", "entropy"))  # TRL fixes T at init
    ours.args = args
    batch, mask = setup["batch"], setup["batch"]["completion_mask"].float()
    t.model.zero_grad()
    ours.model.zero_grad()
    trl_loss = t._compute_loss(t.model, dict(batch, old_logps=(setup["old"] * mask).sum(1)))
    our_loss, metrics = ours.compute_loss(ours.model, dict(batch, old_per_token_logps=setup["old"]), torch.tensor(float(B)))
    print(f"RLOO {overrides}: ours={our_loss.item():.8f} trl={trl_loss.item():.8f} rel {abs(our_loss.item() - trl_loss.item()) / abs(trl_loss.item()):.1e}")
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)  # see the module docstring
    trl_loss.backward()
    our_loss.backward()
    trl_grads = dict(t.model.named_parameters())
    worst = 0.0
    for name, p in ours.model.named_parameters():
        theirs = trl_grads[name].grad
        assert theirs.norm() > 0, name
        rel = ((p.grad - theirs).norm() / theirs.norm()).item()
        assert rel <= 1e-5, f"{name}: |ours - trl| / |trl| = {rel:.2e}"  # see the module docstring
        worst = max(worst, rel)
    print(f"worst relative gradient difference: {worst:.2e}")
    assert {"entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} <= set(metrics)



def _exact_nanstd(x, dim=None, keepdim=False):
    """TRL's nanstd with its Bessel factor count / (count - 1) in x's dtype (TRL takes it in float32: ~1e-8 relative in
    float64). posttrain's nanstd computes it in the input's dtype since core 1.7, so the transcription does too."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True).to(x.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def _trl_advantages(rewards_per_func, weights, num_generations, normalize, clip_range, kl, beta, nanstd_fn=None):
    """TRL 1.16's RLOO advantage block (rloo_trainer.py, _generate_and_score_completions), transcribed."""
    from trl.trainer.utils import nanstd as trl_nanstd

    nanstd = trl_nanstd if nanstd_fn is None else nanstd_fn

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    if clip_range:
        rewards = rewards.clamp(min=clip_range[0], max=clip_range[1])
    if beta != 0.0:
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (scorable_counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("clip_range, beta", [(None, 0.0), ((-0.5, 0.5), 0.05)])
def test_advantages_match_trl_formula(normalize, clip_range, beta):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 2, generator=gen, dtype=torch.float64)  # float64: the two transcriptions may order their ops differently
    rewards[1, 0] = torch.nan  # one function returned None
    rewards[5] = torch.nan  # unscorable completion
    rewards[6:8] = torch.nan  # a group with no scorable completion... and its partner
    kl = torch.rand(12, generator=gen, dtype=torch.float64)
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    ours, _ = compute_rloo_advantages(rewards.clone(), weights, 3, normalize, clip_range, kl, beta)
    theirs = _trl_advantages(rewards.clone(), weights, 3, normalize, clip_range, kl, beta, nanstd_fn=_exact_nanstd)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    trl_own = _trl_advantages(rewards.clone(), weights, 3, normalize, clip_range, kl, beta)
    torch.testing.assert_close(ours, trl_own, rtol=1e-6, atol=1e-9)  # TRL's float32 Bessel factor: ~1e-8 relative


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([[1.0], [2.0], [4.0]])
    advantages, _ = compute_rloo_advantages(rewards, torch.ones(1), 3, False)
    torch.testing.assert_close(advantages, torch.tensor([1.0 - 3.0, 2.0 - 2.5, 4.0 - 1.5]))


