"""The online scaffold's reward statistics: plain functions from rewards to baselines and preference pairs.

An online method scores ``N`` completions (``num_generations`` consecutive rows per prompt), then
turns the rewards into a baseline or into chosen / rejected pairs; these functions are that step,
shared so that methods keep only their own logic:

* :func:`group_statistics`: per-group mean and std broadcast back to rows (GRPO, Dr. GRPO, DAPO).
* :func:`leave_one_out_baseline`: the mean of the *other* rows of the group (RLOO).
* :func:`pair_preferences_to_chosen_rejected`: a pairwise judge's answers as chosen / rejected row
  indices (Online DPO, XPO, Nash-MD).

Rewards are ``(N,)`` floating tensors in which ``NaN`` marks an unscorable completion (every reward
function returned ``None``); statistics skip those rows, as GRPO's and RLOO's always have.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

__all__ = ["group_statistics", "leave_one_out_baseline", "nanstd", "pair_preferences_to_chosen_rejected"]


def _grouped(owner: str, rewards: Any, group_size: Any, *, minimum: int = 1) -> torch.Tensor:
    """``rewards`` viewed as ``(N / group_size, group_size)``, or one line naming the problem and the fix."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        got = f"a {rewards.dim()}-d {rewards.dtype} tensor" if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"{owner}: rewards must be a 1-d floating-point tensor (N,), got {got}; pass e.g. RewardResult.total.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < minimum:
        raise ValueError(f"{owner}: group_size={group_size!r} must be an integer >= {minimum} (the completions per prompt, num_generations).")
    if rewards.numel() % group_size:
        raise ValueError(
            f"{owner}: {rewards.numel()} rewards do not split into groups of group_size={group_size}; "
            "pass all the completions of each prompt, group_size consecutive rows per prompt."
        )
    return rewards.reshape(-1, group_size)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Return the Bessel-corrected standard deviation of ``x`` ignoring NaNs (NaN where fewer than 2 values).

    Args:
        x: A floating tensor.
        dim: The dimension to reduce (None: all).
        keepdim: Keep the reduced dimension.

    Returns:
        The std (a 0-d tensor when ``dim`` is None).
    """
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True).to(variance.dtype)  # in x's dtype: a float64 std stays float64-exact
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def group_statistics(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the mean and std of each group of ``group_size`` consecutive rewards, broadcast back to its rows.

    The std is the unbiased (Bessel-corrected, ``N - 1``) one, as GRPO's (TRL's ``torch.std`` /
    ``nanstd``). ``NaN`` rewards (unscorable completions) are left out of their group's statistics;
    a group with no scorable reward has a NaN mean, one with fewer than two a NaN std.
    GRPO's group advantage is ``(rewards - mean) / (std + 1e-4)``.

    Args:
        rewards: ``(N,)`` floating-point rewards, ``group_size`` consecutive rows per prompt.
        group_size: Completions per prompt (``num_generations``).

    Returns:
        ``(mean (N,), std (N,))`` in the dtype of ``rewards``.

    Raises:
        ValueError: ``rewards`` is not a 1-d floating tensor, ``group_size < 1``, or ``N`` is not a
            multiple of ``group_size``.
    """
    grouped = _grouped("group_statistics", rewards, group_size)  # (N/G, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)  # (N,)
    std = nanstd(grouped, dim=1).repeat_interleave(group_size)  # (N,)
    return mean, std


def leave_one_out_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Return each reward's leave-one-out baseline: the mean of the *other* rewards of its group (RLOO).

    ``b_i = (sum_{j in group, j != i} r_j) / (k - 1)`` where ``k`` counts the group's scorable
    (non-NaN) rewards. The baseline is NaN for an unscorable row and for a group with a single
    scorable reward (no other to compare with). RLOO's advantage is ``rewards - baseline``.

    Args:
        rewards: ``(N,)`` floating-point rewards, ``group_size`` consecutive rows per prompt.
        group_size: Completions per prompt (``num_generations``), at least 2.

    Returns:
        ``(N,)`` baselines in the dtype of ``rewards``.

    Raises:
        ValueError: ``rewards`` is not a 1-d floating tensor, ``group_size < 2``, or ``N`` is not a
            multiple of ``group_size``.
    """
    grouped = _grouped("leave_one_out_baseline", rewards, group_size, minimum=2)  # (N/G, G)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (N/G, 1)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (N/G, G): mean of the others
    return baselines.reshape(-1)


_LAYOUTS = ("halves", "interleaved")
_UNDECIDED = ("drop", "first", "second")


def pair_preferences_to_chosen_rejected(
    preferences: Sequence[int] | torch.Tensor, *, layout: str = "halves", undecided: str = "drop", device: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn a pairwise judge's preferences over ``B`` pairs into chosen / rejected row indices of the ``2B`` completions.

    Args:
        preferences: ``B`` answers of a judge: ``0`` (the pair's first completion is better),
            ``1`` (the second is) or ``-1`` (the judge cannot tell).
        layout: Where the pairs sit among the ``2B`` completion rows: ``"halves"`` -- pair ``i`` is
            rows ``i`` and ``B + i`` (TRL's ``OnlineDPOTrainer``, which generates the batch twice);
            ``"interleaved"`` -- rows ``2i`` and ``2i + 1`` (two consecutive generations per prompt,
            the grouped layout of :func:`group_statistics` with ``group_size=2``).
        undecided: What a ``-1`` becomes: ``"drop"`` -- the pair is left out (``keep`` is False;
            its chosen / rejected are the first / second row, to be masked by the caller);
            ``"first"`` -- the first completion is chosen (TRL 1.16's reward rule
            ``first >= second`` on ties); ``"second"`` -- the second is chosen (TRL's judge path,
            ``mask = rank == 0``, did this).
        device: Device of the returned tensors (default: the CPU, or that of a tensor input).

    Returns:
        ``(chosen (B,), rejected (B,), keep (B,))``: int64 row indices into the ``2B`` completions
        and a bool mask of the pairs to train on (all True unless ``undecided="drop"``).

    Raises:
        ValueError: A preference other than -1, 0 or 1 (naming its index), or an unknown
            ``layout`` / ``undecided``.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"pair_preferences_to_chosen_rejected: layout={layout!r} must be one of {list(_LAYOUTS)}.")
    if undecided not in _UNDECIDED:
        raise ValueError(f"pair_preferences_to_chosen_rejected: undecided={undecided!r} must be one of {list(_UNDECIDED)}.")
    if isinstance(preferences, torch.Tensor):
        device = preferences.device if device is None else device
        values = preferences.reshape(-1).tolist()
    else:
        values = list(preferences)
    for i, p in enumerate(values):
        if isinstance(p, bool) or p not in (-1, 0, 1):
            raise ValueError(
                f"pair_preferences_to_chosen_rejected: preferences[{i}]={p!r}; a pairwise judge answers 0 (first), 1 (second) or -1 (cannot tell)."
            )
    prefs = torch.tensor(values, dtype=torch.long, device=device).reshape(-1)  # (B,)
    undecided_rows = prefs == -1
    keep = ~undecided_rows if undecided == "drop" else torch.ones_like(undecided_rows)
    second_wins = (prefs == 1) | (undecided_rows & (undecided == "second"))  # (B,)
    b = prefs.numel()
    pair = torch.arange(b, dtype=torch.long, device=device)
    first, second = (pair, pair + b) if layout == "halves" else (2 * pair, 2 * pair + 1)
    chosen = torch.where(second_wins, second, first)
    rejected = torch.where(second_wins, first, second)
    return chosen, rejected, keep
