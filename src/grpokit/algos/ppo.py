"""PPO for language models (the RLHF recipe), as pure tensor functions.

One completion is an episode: state ``s_t`` = prompt + the first ``t`` completion tokens, action
``a_t`` = token ``t``. Per completion ``i`` and active token ``t`` (``mask == 1``; completions are
right-padded, so the active tokens of a row are a prefix):

- reward (Ziegler et al. 2019; TRL's PPOTrainer): ``r_t = -kl_coef * kl_t``, plus the scalar
  score of the completion on its last active token (``ppo_token_rewards``);
- TD error ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_{T} = 0`` past the last token;
- GAE (Schulman et al. 2016): ``A_t = delta_t + gamma * lam * A_{t+1}``, i.e.
  ``A_t = sum_l (gamma * lam)^l * delta_{t+l}``; returns ``R_t = A_t + V_t`` (``gae_advantages``);
- advantages whitened over the batch's active tokens (``masked_whiten``);
- value loss ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``
  (``clipped_value_loss``); the policy loss is ``algos.losses.policy_loss`` with per-token
  advantages (PPO's clipped surrogate is the same clip objective GRPO uses).

No config objects, no ``.item()``, no distributed calls.
"""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8
"""Added to the variance before the inverse square root, as TRL's ``masked_whiten``."""


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask == 1`` (0 when nothing is active); any shape, 0-dim result."""
    active = mask.bool()
    return torch.where(active, values, 0.0).sum() / active.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / sqrt(var + 1e-8)`` over the active entries, TRL's ``masked_whiten``.

    ``var`` is the unbiased (Bessel) variance of the active entries. ``shift_mean=False`` adds the
    mean back (scale only; TRL whitens rewards this way). Inactive entries come back as 0.

    Args:
        values: [B, T] (any shape) float tensor.
        mask: same shape, 1 (or True) on the entries that count. At least 2 must be active.
    Returns:
        whitened tensor of the same shape, 0 where ``mask == 0``.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape.")
    active = mask.bool()
    n = active.sum()
    mean = masked_mean(values, active)
    var = torch.where(active, (values - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
    out = (values - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(active, out, 0.0)


def ppo_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl_t`` on every active token, ``+ score`` on the last one.

    Args:
        scores: [B] scalar reward of each completion (must be finite).
        kl: [B, T] per-token KL estimate between the sampling policy and the reference
            (``k1 = logp_old - logp_ref`` in the RLHF recipe); ignored where ``mask == 0``.
        mask: [B, T] right-padded completion mask (active tokens are a prefix of each row).
        kl_coef: KL coefficient (>= 0).
    Returns:
        [B, T] rewards, 0 on padding. A row with no active token gets no score.
    """
    if kl.shape != mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)}, kl {tuple(kl.shape)} and mask {tuple(mask.shape)} "
                         "must be [B], [B, T], [B, T].")
    active = mask.bool()
    rewards = torch.where(active, -kl_coef * kl, 0.0)
    lengths = active.sum(-1)
    last = (lengths - 1).clamp(min=0)
    has_tokens = (lengths > 0).to(rewards.dtype)
    return rewards.scatter_add(1, last[:, None], (scores.to(rewards.dtype) * has_tokens)[:, None])


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over the completion tokens.

    ``delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1}``, where ``m`` is the mask: the episode ends
    after the last active token (``V`` and ``A`` beyond it count as 0, whatever the padding holds).

    Args:
        rewards: [B, T] per-token rewards (``ppo_token_rewards``).
        values: [B, T] value estimates ``V(s_t)`` of the state before each token (detached).
        mask: [B, T] completion mask, active tokens a prefix of each row.
        gamma: discount; lam: GAE lambda.
    Returns:
        ``(advantages, returns)``, both [B, T], ``returns = advantages + values``; both 0 on padding.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [B, T].")
    m = mask.to(values.dtype)
    r = rewards * m
    v = values.detach() * m
    steps = rewards.shape[1]
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    reversed_adv = []
    for t in reversed(range(steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = (delta + gamma * lam * next_adv) * m[:, t]
        reversed_adv.append(adv_t)
        next_value, next_adv = v[:, t], adv_t
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, (advantages + v) * m


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, *, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss per token (TRL; OpenAI's lm-human-preferences).

    ``l = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)``: a value prediction may
    not profit from moving more than ``c`` away from the one made at sampling time.

    Args:
        values: [B, T] current value predictions (carry the gradient).
        old_values: [B, T] predictions at sampling time (constant).
        returns: [B, T] GAE returns (constant).
        cliprange_value: ``c`` (>= 0).
    Returns:
        ``(per_token_loss [B, T], clipped [B, T] bool)``; ``clipped`` flags tokens where the clipped
        branch is the larger one (TRL's ``vf_clipfrac``). Aggregate with ``aggregate_loss``.
    """
    if not (values.shape == old_values.shape == returns.shape):
        raise ValueError("values, old_values and returns must have the same shape.")
    old, ret = old_values.detach(), returns.detach()
    clipped_values = old + torch.clamp(values - old, -cliprange_value, cliprange_value)
    unclipped_loss = (values - ret) ** 2
    clipped_loss = (clipped_values - ret) ** 2
    return 0.5 * torch.max(unclipped_loss, clipped_loss), clipped_loss > unclipped_loss


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var[R - V] / Var[R]`` over the active tokens (1: perfect critic, 0: no better than a
    constant, < 0: worse). A diagnostic, detached; NaN when the returns have no variance."""
    active = mask.bool()
    v, r = values.detach(), returns.detach()
    var_r = masked_mean((r - masked_mean(r, active)) ** 2, active)
    diff = r - v
    var_d = masked_mean((diff - masked_mean(diff, active)) ** 2, active)
    return 1 - var_d / var_r
