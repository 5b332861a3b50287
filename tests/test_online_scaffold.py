"""The online scaffold's reward statistics (posttrain._online): group mean/std, leave-one-out baseline, judge pairs.

Equivalence with GRPO's and RLOO's own advantage functions runs in float64, so the tolerance can be tight on any machine.
"""

from __future__ import annotations

import pytest
import torch

from posttrain import RewardFunctionJudge, group_statistics, leave_one_out_baseline, pair_preferences_to_chosen_rejected

TIGHT = {"rtol": 1e-12, "atol": 1e-12}  # float64: the two code paths differ at most by a few ulps


def _rewards(num_groups: int = 6, group_size: int = 4, seed: int = 0) -> torch.Tensor:
    """Random float64 rewards with the corner cases: an unscorable row, a group with one scorable row, an all-NaN group, a flat group."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randn(num_groups * group_size, generator=gen, dtype=torch.float64)
    rewards[1] = torch.nan  # group 0: three scorable
    rewards[group_size : 2 * group_size - 1] = torch.nan  # group 1: one scorable
    rewards[2 * group_size : 3 * group_size] = torch.nan  # group 2: none
    rewards[3 * group_size : 4 * group_size] = 0.5  # group 3: zero std
    return rewards


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_group_statistics_equals_grpo_compute_group_advantages(scale_rewards):
    grpo = pytest.importorskip("posttrain_grpo.trainer")
    group_size = 4
    rewards = _rewards(group_size=group_size)
    advantages, is_std_zero = grpo.compute_group_advantages(rewards.unsqueeze(1), torch.ones(1, dtype=torch.float64), group_size, scale_rewards, "sum_then_normalize")
    mean, std = group_statistics(rewards, group_size)
    assert mean.shape == std.shape == rewards.shape and mean.dtype == std.dtype == torch.float64
    ours = rewards - mean
    if scale_rewards == "group":
        ours = ours / (std + 1e-4)
    torch.testing.assert_close(torch.nan_to_num(ours, nan=0.0), advantages, **TIGHT)
    torch.testing.assert_close(torch.isclose(std, torch.zeros_like(std)), is_std_zero)


def test_group_statistics_is_the_unbiased_mean_and_std_of_each_group():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(15, generator=gen, dtype=torch.float64)
    mean, std = group_statistics(rewards, 5)
    grouped = rewards.view(3, 5)
    torch.testing.assert_close(mean, grouped.mean(dim=1).repeat_interleave(5), **TIGHT)
    torch.testing.assert_close(std, grouped.std(dim=1, unbiased=True).repeat_interleave(5), **TIGHT)
    # NaN rows are left out; fewer than two scorable rows -> NaN std; none -> NaN mean
    mean, std = group_statistics(_rewards(), 4)
    torch.testing.assert_close(mean[:4], _rewards()[[0, 2, 3]].mean().expand(4), **TIGHT)
    torch.testing.assert_close(std[:4], _rewards()[[0, 2, 3]].std().expand(4), **TIGHT)
    assert torch.isnan(std[4:8]).all() and not torch.isnan(mean[4:8]).any() and torch.isnan(mean[8:12]).all()
    assert (std[12:16] == 0).all()


def test_leave_one_out_baseline_equals_rloo_compute_rloo_advantages():
    rloo = pytest.importorskip("posttrain_rloo.trainer")
    for group_size in (2, 4):
        rewards = _rewards(group_size=group_size, seed=group_size)
        advantages, _ = rloo.compute_rloo_advantages(rewards.unsqueeze(1), torch.ones(1, dtype=torch.float64), group_size, normalize_advantages=False)
        baseline = leave_one_out_baseline(rewards, group_size)
        assert baseline.shape == rewards.shape and baseline.dtype == torch.float64
        torch.testing.assert_close(torch.nan_to_num(rewards - baseline, nan=0.0), advantages, **TIGHT)


def test_leave_one_out_baseline_is_the_mean_of_the_others():
    gen = torch.Generator().manual_seed(2)
    rewards = torch.randn(12, generator=gen, dtype=torch.float64)
    baseline = leave_one_out_baseline(rewards, 3)
    expected = [sum(rewards[g * 3 + j].item() for j in range(3) if j != i) / 2 for g in range(4) for i in range(3)]
    torch.testing.assert_close(baseline, torch.tensor(expected, dtype=torch.float64), **TIGHT)
    with_nan = _rewards()
    baseline = leave_one_out_baseline(with_nan, 4)
    assert torch.isnan(baseline[1]) and torch.isnan(baseline[4:12]).all()  # unscorable row; single-scorable and empty groups
    torch.testing.assert_close(baseline[0], (with_nan[2] + with_nan[3]) / 2, **TIGHT)


def test_bad_input_is_one_line():
    with pytest.raises(ValueError, match=r"group_statistics: 10 rewards do not split into groups of group_size=4; pass all the completions"):
        group_statistics(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=r"group_size=0 must be an integer >= 1"):
        group_statistics(torch.zeros(4), 0)
    with pytest.raises(ValueError, match=r"rewards must be a 1-d floating-point tensor \(N,\), got a 2-d torch.float32 tensor"):
        group_statistics(torch.zeros(4, 1), 2)
    with pytest.raises(ValueError, match=r"got a 1-d torch.int64 tensor"):
        leave_one_out_baseline(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"leave_one_out_baseline: group_size=1 must be an integer >= 2"):
        leave_one_out_baseline(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"preferences\[1\]=2; a pairwise judge answers 0 \(first\), 1 \(second\) or -1"):
        pair_preferences_to_chosen_rejected([0, 2])
    with pytest.raises(ValueError, match="layout='pairs' must be one of"):
        pair_preferences_to_chosen_rejected([0], layout="pairs")
    with pytest.raises(ValueError, match="undecided='tie' must be one of"):
        pair_preferences_to_chosen_rejected([0], undecided="tie")


# ----------------------------------------------------------------------------- preferences -> chosen / rejected


def test_pair_preferences_to_chosen_rejected_layouts_and_undecided_pairs():
    prefs = [0, 1, -1]
    chosen, rejected, keep = pair_preferences_to_chosen_rejected(prefs)  # halves: pair i = rows i, 3 + i
    assert chosen.tolist() == [0, 4, 2] and rejected.tolist() == [3, 1, 5] and keep.tolist() == [True, True, False]
    assert chosen.dtype == rejected.dtype == torch.long and keep.dtype == torch.bool
    chosen, rejected, keep = pair_preferences_to_chosen_rejected(prefs, layout="interleaved", undecided="second")  # pair i = rows 2i, 2i+1
    assert chosen.tolist() == [0, 3, 5] and rejected.tolist() == [1, 2, 4] and keep.all()
    chosen, rejected, _ = pair_preferences_to_chosen_rejected(torch.tensor(prefs), undecided="first")
    assert chosen.tolist() == [0, 4, 2] and rejected.tolist() == [3, 1, 5]
    empty = pair_preferences_to_chosen_rejected([])
    assert all(t.numel() == 0 for t in empty)


def test_a_reward_judge_with_undecided_first_reproduces_trl_online_dpo_chosen_rejected():
    """TRL 1.16 OnlineDPOTrainer.training_step (trl/experimental/online_dpo/online_dpo_trainer.py): the reward rule, ties to the first."""
    gen = torch.Generator().manual_seed(3)
    batch_size = 16
    rewards = torch.randint(0, 3, (2 * batch_size,), generator=gen).double()  # small integers: ties occur
    # TRL's lines, verbatim
    first_half, second_half = rewards.split(batch_size)
    mask = first_half >= second_half
    batch_range = torch.arange(batch_size)
    chosen_indices = batch_range + (~mask * batch_size)
    rejected_indices = batch_range + (mask * batch_size)
    assert (first_half == second_half).any() and (first_half != second_half).any()
    # the same through a reward-function judge over the pairs (row i, row B + i) and the scaffold
    table = {f"c{i}": rewards[i].item() for i in range(2 * batch_size)}
    judge = RewardFunctionJudge([lambda completions, **kw: [table[c] for c in completions]])
    pairs = [[f"c{i}", f"c{batch_size + i}"] for i in range(batch_size)]
    prefs = judge.judge(["p"] * batch_size, pairs)
    chosen, rejected, keep = pair_preferences_to_chosen_rejected(prefs, layout="halves", undecided="first")
    assert torch.equal(chosen, chosen_indices) and torch.equal(rejected, rejected_indices) and keep.all()
    # dropping the ties instead keeps exactly the decided pairs, whose chosen reward is the higher
    chosen, rejected, keep = pair_preferences_to_chosen_rejected(prefs)
    assert torch.equal(keep, first_half != second_half) and (rewards[chosen[keep]] > rewards[rejected[keep]]).all()
