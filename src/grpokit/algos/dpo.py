"""Preference losses on (chosen, rejected) pairs: DPO (sigmoid) and IPO, as pure tensor functions.

For a pair with prompt ``x``, chosen ``y_w`` and rejected ``y_l``, and sequence log-probabilities
``pi_w = log pi_theta(y_w | x)``, ``ref_w = log pi_ref(y_w | x)`` (likewise ``pi_l``, ``ref_l``):

    h = (pi_w - ref_w) - (pi_l - ref_l)          the margin of the log-ratios

- ``"sigmoid"`` (DPO, Rafailov et al. 2023): ``l = -log sigmoid(beta * h)``; with
  ``label_smoothing = e`` (conservative DPO, TRL's meaning) ``l = -(1 - e) log sigmoid(beta h)
  - e log sigmoid(-beta h)``. Sequence log-probs are *sums* over the completion tokens.
- ``"ipo"`` (IPO, Azar et al. 2023): ``l = (h - 1 / (2 beta))^2``; as in TRL, the sequence
  log-probs are token *means* (``DPO_AVERAGE_LOGPS["ipo"] = True``).

The implicit rewards ``beta * (pi - ref)`` of chosen and rejected are returned detached, for
metrics (TRL's ``rewards/chosen``, ``rewards/rejected``; accuracy = chosen > rejected).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Sum (or mean, ``average=True``) of the per-token log-probs [B, T] over ``mask == 1`` -> [B]."""
    if token_logps.shape != mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} differ in shape.")
    active = mask.bool()
    total = torch.where(active, token_logps, 0.0).sum(-1)
    return total / active.sum(-1).clamp(min=1) if average else total


def sigmoid_loss(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """``-(1 - e) * log sigmoid(beta * h) - e * log sigmoid(-beta * h)`` per pair [B]."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)


def ipo_loss(margin: torch.Tensor, *, beta: float, label_smoothing: float) -> torch.Tensor:
    """``(h - 1 / (2 * beta))^2`` per pair [B]; ``label_smoothing`` must be 0."""
    if label_smoothing != 0:
        raise ValueError("label_smoothing applies to the sigmoid loss only; set it to 0 for ipo.")
    return (margin - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"sigmoid": sigmoid_loss, "ipo": ipo_loss}
"""loss_type -> ``fn(margin [B], *, beta, label_smoothing) -> per-pair loss [B]``."""

DPO_AVERAGE_LOGPS: dict[str, bool] = {"sigmoid": False, "ipo": True}
"""loss_type -> whether its sequence log-probs are token means (True) or sums (False), as TRL."""


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and the implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] sequence log-probs under the policy (with
            grad); sums for ``"sigmoid"``, token means for ``"ipo"`` (see ``DPO_AVERAGE_LOGPS``).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (constants).
        beta: > 0; the strength of the implicit KL to the reference (DPO) / the target margin
            ``1 / (2 beta)`` (IPO).
        loss_type: ``"sigmoid"`` or ``"ipo"``.
        label_smoothing: ``e`` in [0, 0.5), sigmoid only.
    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are
        ``beta * (pi - ref)``, detached.
    """
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {sorted(DPO_LOSSES)}.")
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0.")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5).")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError("the four log-prob tensors must all be [B].")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    losses = DPO_LOSSES[loss_type](chosen_ratio - rejected_ratio, beta=beta, label_smoothing=label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def best_worst_pairs(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Online preference pairs from GRPO-style groups: per group, its best completion is chosen and
    its worst rejected (first index on ties). NaN rewards (no reward) take no part; a group with
    fewer than 2 valid rewards, or whose valid rewards are all equal, gives no pair.

    Args:
        rewards: [N] rewards, ``N = num_prompts * group_size``, each group contiguous.
        group_size: G.
    Returns:
        ``(chosen, rejected)``: [P] long indices into ``rewards`` of the P groups with a spread.
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size >= 2; got {tuple(rewards.shape)}, "
                         f"group_size={group_size}.")
    r = rewards.view(-1, group_size)
    valid = ~torch.isnan(r)
    best = torch.where(valid, r, -torch.inf).argmax(1)
    worst = torch.where(valid, r, torch.inf).argmin(1)
    high = torch.where(valid, r, -torch.inf).amax(1)
    low = torch.where(valid, r, torch.inf).amin(1)
    keep = (valid.sum(1) >= 2) & (high > low)
    offset = torch.arange(r.shape[0], device=r.device) * group_size
    return (offset + best)[keep], (offset + worst)[keep]
