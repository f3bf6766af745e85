"""Group-relative advantages: one scalar per completion, relative to its own group.

Rewards arrive flat, ``[N]`` with ``N = num_prompts * group_size`` and the ``group_size``
completions of one prompt contiguous (rows ``g*G .. g*G + G - 1``). A NaN reward means "no reward"
(every reward function returned None for that completion): it is left out of its group's
statistics and its advantage is 0.

Two estimators, chosen by name from ``ADVANTAGE_ESTIMATORS``, give the *centred* reward:

- ``"grpo"``: ``r_i - mean_g`` (DeepSeekMath),
- ``"rloo"``: ``r_i - mean of the other valid rewards of the group`` (REINFORCE leave-one-out),
  which equals ``n/(n-1) * (r_i - mean_g)`` for a group with ``n`` valid rewards,

then ``scale_rewards`` (TRL's knob) divides it:

- ``"group"`` (``True``): by ``std_g + 1e-4``, the unbiased (Bessel) std of the group,
- ``"batch"``: by ``std_batch + 1e-4``, the unbiased std of every valid reward of the batch:
  ``rewards``, or ``batch_rewards`` when given (the rewards of every rank: TRL's global batch std),
- ``"none"`` (``False``): not at all (Dr. GRPO),
- ``"rank"`` (grpokit's): the rewards are first replaced by their rank within the group (1 = the
  lowest valid reward, ties share their mean rank), then centred, then divided by ``(n - 1) / 2``
  for ``n`` valid rewards: a group of distinct rewards spans [-1, 1] evenly, whatever the size of
  the gaps between them (a judge's ordering, or a reward model whose tiny score gaps the std
  normalisation would blow up). Any monotone transform of the rewards gives the same advantages.

A group whose valid rewards are all equal, or that has fewer than two valid rewards, carries no
signal: all its advantages are exactly 0 under every mode.

TRL's ``multi_objective_aggregation="normalize_then_sum"`` (GDPO) is ``normalize_then_sum``:
each reward function normalised within its group first, the weighted sum then normalised over
the batch.
"""

from __future__ import annotations

from typing import Callable

import torch

STD_EPS = 1e-4
"""Added to the std before dividing, as TRL: ``(r - mean) / (std + 1e-4)``."""

SCALE_REWARDS = ("group", "batch", "none", "rank")


def _valid_count_and_mean(r: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group count ``n`` [P] and mean [P] of the valid entries of ``r`` [P, G]."""
    n = valid.sum(dim=1)
    total = torch.where(valid, r, 0.0).sum(dim=1)
    return n, total / n.clamp(min=1)


def grpo_centered(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """GRPO baseline: ``r_i - mean_g`` over the valid rewards of the group.

    Args:
        rewards: [P, G] rewards, NaN where invalid.
        valid: [P, G] bool, ``~isnan(rewards)``.
    Returns:
        [P, G] centred rewards, 0 where invalid.
    """
    _, mean = _valid_count_and_mean(rewards, valid)
    return torch.where(valid, rewards - mean[:, None], 0.0)


def rloo_centered(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RLOO baseline: ``r_i - (sum_g - r_i) / (n - 1)``, the mean of the *other* valid rewards.

    Args:
        rewards: [P, G] rewards, NaN where invalid.
        valid: [P, G] bool, ``~isnan(rewards)``.
    Returns:
        [P, G] centred rewards, 0 where invalid or where the group has fewer than 2 valid rewards.
    """
    n, mean = _valid_count_and_mean(rewards, valid)
    total = (mean * n)[:, None]
    others_mean = (total - rewards) / (n[:, None] - 1).clamp(min=1)
    return torch.where(valid & (n[:, None] >= 2), rewards - others_mean, 0.0)


ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "grpo": grpo_centered,
    "rloo": rloo_centered,
}
"""name -> ``fn(rewards [P, G] with NaN, valid [P, G] bool) -> centred [P, G]``."""


def _normalize_scale_rewards(scale_rewards: str | bool) -> str:
    if isinstance(scale_rewards, bool):  # TRL < 0.22 took a bool
        return "group" if scale_rewards else "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: use one of {SCALE_REWARDS} (or True/False).")
    return scale_rewards


def _bessel_std(values: torch.Tensor, valid: torch.Tensor, dim: int | None) -> torch.Tensor:
    """Unbiased std of the valid entries (0 when fewer than 2), reduced over ``dim`` (None = all)."""
    dims = tuple(range(values.dim())) if dim is None else (dim,)
    n = valid.sum(dim=dims, keepdim=True)
    mean = torch.where(valid, values, 0.0).sum(dim=dims, keepdim=True) / n.clamp(min=1)
    sq = torch.where(valid, (values - mean) ** 2, 0.0).sum(dim=dims, keepdim=True)
    return torch.sqrt(sq / (n - 1).clamp(min=1))


def within_group_ranks(r: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[groups, G] rewards -> their ranks among the valid ones of their row (1 = lowest; ties share
    their mean rank); NaN where not valid. [0.1, 0.5, 0.5, 2.0] -> [1, 2.5, 2.5, 4]."""
    a, b = r.unsqueeze(2), r.unsqueeze(1)                    # [groups, G, 1], [groups, 1, G]
    others = valid.unsqueeze(1) & valid.unsqueeze(2)         # both valid
    lower = ((b < a) & others).sum(2).to(r.dtype)
    tied = ((b == a) & others).sum(2).to(r.dtype) - 1        # not counting itself
    return torch.where(valid, 1 + lower + tied / 2, torch.nan)


def groups_with_signal(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """[groups] bool: at least two valid (non-NaN) rewards that differ, i.e. a group whose
    advantages are not all 0. The one definition of "a group with signal": DAPO's dynamic
    sampling keeps these, and `frac_reward_zero_std` is the fraction of the others."""
    groups = rewards.view(-1, g)
    valid = ~torch.isnan(groups)
    high = torch.where(valid, groups, -torch.inf).amax(1)
    low = torch.where(valid, groups, torch.inf).amin(1)
    return (valid.sum(1) >= 2) & (high > low)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_rewards: str | bool = "group",
    estimator: str = "grpo",
    batch_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages relative to each prompt's group of completions.

    ``A_i = centred_i / (std + 1e-4)`` where ``centred_i`` is ``r_i - mean_g`` (``"grpo"``) or
    ``r_i - mean_{g, j != i}`` (``"rloo"``) and ``std`` is the Bessel std of the group
    (``scale_rewards="group"``), of all valid rewards passed (``"batch"``), or absent (``"none"``:
    ``A_i = centred_i``). NaN rewards are left out of means and stds and get ``A_i = 0``; groups
    whose valid rewards are all equal, or that have fewer than 2 valid rewards, get ``A = 0``.

    Args:
        rewards: [N] float rewards, ``N = num_prompts * group_size``, each group contiguous; NaN =
            no reward. Must otherwise be finite.
        group_size: G, completions per prompt.
        scale_rewards: ``"group" | "batch" | "none" | "rank"``, or TRL's old booleans (True = "group",
            False = "none").
        estimator: a key of ``ADVANTAGE_ESTIMATORS`` (``"grpo"`` or ``"rloo"``).
        batch_rewards: the rewards whose std ``"batch"`` divides by (default ``rewards``): pass
            every rank's rewards to divide by the global batch's std.
    Returns:
        [N] advantages, dtype at least float32, same device as ``rewards``.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}.")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"len(rewards)={rewards.numel()} is not a multiple of group_size={group_size}.")
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: use one of {sorted(ADVANTAGE_ESTIMATORS)}.")
    mode = _normalize_scale_rewards(scale_rewards)

    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group_size)
    valid = ~torch.isnan(r)
    informative = groups_with_signal(r.view(-1), group_size).unsqueeze(1)
    if mode == "rank":
        r = within_group_ranks(r, valid)
    centred = ADVANTAGE_ESTIMATORS[estimator](r, valid)

    if mode == "group":
        centred = centred / (_bessel_std(r, valid, dim=1) + STD_EPS)
    elif mode == "batch":
        pool = r if batch_rewards is None else batch_rewards.to(r.dtype).reshape(-1)
        centred = centred / (_bessel_std(pool, ~torch.isnan(pool), dim=None) + STD_EPS)
    elif mode == "rank":
        centred = centred / ((valid.sum(dim=1, keepdim=True) - 1).clamp(min=1) / 2)

    # No signal in a group with < 2 valid rewards or equal valid rewards: exactly 0, not round-off.
    return torch.where(valid & informative, centred, 0.0).view(-1)


def normalize_then_sum(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """GDPO's first half (TRL's ``multi_objective_aggregation="normalize_then_sum"``): every
    reward function normalised within its group, then summed with its weight.

    ``s_i = sum_k w_k (r_{i,k} - mean_g r_k) / (std_g r_k + 1e-4)`` (Bessel std over the group's
    valid values; a NaN reward of function k leaves k out of ``s_i``); ``s_i`` is NaN where every
    function returned None. The second half is ``batch_normalized(s)``.

    Args:
        rewards_per_func: [N, K] rewards, NaN = none, groups of ``group_size`` rows contiguous.
        weights: [K] reward weights.
        group_size: G.
    Returns:
        [N] summed normalised rewards (NaN where unscorable).
    """
    n, k = rewards_per_func.shape
    if n % group_size:
        raise ValueError(f"{n} rows are not a multiple of group_size={group_size}.")
    r = rewards_per_func.to(torch.promote_types(rewards_per_func.dtype, torch.float32)).view(-1, group_size, k)
    valid = ~torch.isnan(r)
    count = valid.sum(dim=1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / count.clamp(min=1)
    if group_size > 1:
        std = torch.sqrt(torch.where(valid, (r - mean) ** 2, 0.0).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1))
        std = torch.where(count >= 2, std, torch.nan)
    else:
        std = torch.zeros_like(mean)
    normalised = ((r - mean) / (std + STD_EPS)).view(-1, k)
    summed = torch.nansum(normalised * weights.to(normalised.dtype)[None, :], dim=1)
    return torch.where(valid.view(-1, k).any(dim=1), summed, torch.nan)


def batch_normalized(rewards: torch.Tensor, batch_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """``A_i = (r_i - mean) / (std + 1e-4)`` with the mean and Bessel std of every valid reward of
    the batch (``batch_rewards`` when given: every rank's), NaN rewards giving ``A_i = 0``: GDPO's
    second half."""
    pool = (rewards if batch_rewards is None else batch_rewards).to(torch.promote_types(rewards.dtype, torch.float32))
    pool = pool.reshape(-1)
    valid = ~torch.isnan(pool)
    mean = torch.where(valid, pool, 0.0).sum() / valid.sum().clamp(min=1)
    std = _bessel_std(pool, valid, dim=None).reshape(())
    out = (rewards.to(pool.dtype) - mean) / (std + STD_EPS)
    return torch.nan_to_num(out, nan=0.0)

