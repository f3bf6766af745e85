"""Per-token estimators of KL(pi_theta || pi_ref) from log-probabilities of sampled tokens.

With ``x ~ pi_theta`` and ``log r = log pi_ref(x) - log pi_theta(x)`` (Schulman, "Approximating
KL divergence", 2020):

- ``k1 = -log r = logp - ref``: unbiased, high variance, can be negative;
- ``k2 = 0.5 * (log r)^2``: biased, low variance, >= 0;
- ``k3 = exp(log r) - log r - 1``: unbiased, low variance, >= 0 (DeepSeekMath's GRPO, TRL's).

"Unbiased" means ``E_{x ~ pi_theta}[k(x)] = KL(pi_theta || pi_ref)`` exactly.
"""

from __future__ import annotations

from typing import Callable

import torch


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``k1 = logp - ref``; elementwise, any shape."""
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``k2 = 0.5 * (logp - ref)^2``; elementwise, any shape."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """``k3 = exp(ref - logp) - (ref - logp) - 1``; elementwise, any shape, always >= 0."""
    log_r = ref_logps - logps
    return torch.exp(log_r) - log_r - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference.

    Args:
        logps: [B, T] log pi_theta of the sampled tokens (carries the gradient).
        ref_logps: [B, T] log pi_ref of the same tokens (treated as a constant).
        estimator: ``"k1" | "k2" | "k3"`` (see module docstring).
    Returns:
        [B, T] per-token estimate; padding positions are not masked here.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator={estimator!r}: use one of {sorted(KL_ESTIMATORS)}.")
    if logps.shape != ref_logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and ref_logps {tuple(ref_logps.shape)} differ in shape.")
    return KL_ESTIMATORS[estimator](logps, ref_logps.detach())
