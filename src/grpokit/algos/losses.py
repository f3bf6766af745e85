"""The GRPO policy objective and its family, as pure tensor functions.

Notation, per completion ``i`` and completion token ``t`` (only tokens with ``mask == 1`` count):

- ``r_{i,t} = exp(logp_{i,t} - old_{i,t})``, the importance ratio (token level), or the GSPO
  sequence ratio ``s_i = exp(mean_t(logp_{i,t} - old_{i,t}))`` given to every token of ``i``;
- ``A_i`` the advantage of completion ``i`` (or ``A_{i,t}`` if given per token).

A ``loss_type`` (TRL's names and meanings) picks a per-token objective from ``POLICY_LOSSES`` and
an aggregation from ``AGGREGATIONS``:

=========  ===========  ==============================================================
loss_type  per token    aggregation of ``l_{i,t}`` over the local batch of B rows
=========  ===========  ==============================================================
grpo       clip         ``mean_i (sum_t l_{i,t} / |o_i|)``  (local mean of sequence means)
bnpo       clip         ``sum_{i,t} l_{i,t} / sum_{i,t} mask``  (local token mean)
dr_grpo    clip         ``sum_{i,t} l_{i,t} / (num_sequences * max_completion_length)``
dapo       clip         ``sum_{i,t} l_{i,t} / num_items_in_batch``  (default local count)
cispo      cispo        as dapo
sapo       sapo         as grpo
luspo      clip         ``mean_i sum_t l_{i,t}``  (local mean of sequence sums; LUSPO)
vespo      vespo        as dapo
=========  ===========  ==============================================================

``num_items_in_batch`` is the active-token count of the whole accumulated batch over all ranks;
with it, the losses of the parts of a batch (micro-batches, ranks) *sum* to the whole-batch loss.
DDP averages gradients over ranks, so a trainer multiplies each rank's loss by the world size (or,
as TRL does, passes ``num_items_in_batch / world_size``). ``dr_grpo`` splits the same way when
``num_sequences`` is the global number of sequences. ``grpo``, ``sapo``, ``bnpo`` and ``luspo``
are by definition local means: a trainer divides them by the number of accumulation steps, as TRL does
(exact for grpo/sapo when the micro-batches hold equally many sequences).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import torch

from grpokit.algos.kl import kl_penalty

LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# Per-token objectives. Each factory binds its own knobs once and returns a function mapping
# (ratio [B,T], logps [B,T], advantages [B,T] or [B,1], **context) to the per-token loss [B,T]
# and a dict of [B,T] tensors averaged over active tokens into the stats: the clip flags by short
# name (low, high, dual: clip_ratio/<name>_mean), anything else by its full stat name.
# context: `active` [B,T] bool, `log_ratio` [B,T] (token-level logp - old, 0 off the mask) and
# `is_weights` ([B,T] or None). An objective with `absorbs_is_weights = True` uses is_weights
# itself (the caller then does not multiply by them).
# A factory's keyword-only parameters are its knobs: GRPOConfig fields of the same names, bound
# from the config by `make_policy_loss` (see `policy_loss_fields`). Adding an objective touches
# this file only: the factory, its POLICY_LOSSES entry and a LOSS_TYPES entry.
# ---------------------------------------------------------------------------------------------

TokenObjective = Callable[..., LossOutput]


def clip_loss(*, epsilon: float = 0.2, epsilon_high: float | None = None, delta: float | None = None,
              dual_clip: float | None = None) -> TokenObjective:
    """PPO clipped surrogate with clip-higher, a two-sided ratio cap and dual-clip.

    ``l = -min(r' * A, clip(r, 1 - epsilon, 1 + epsilon_high) * A)`` with ``r' = min(r, delta)``
    when ``delta`` is set (INTELLECT-2, TRL) else ``r' = r``; then, when ``dual_clip = c`` is set,
    ``l = min(l, -c * A)`` for ``A < 0`` (the loss of a negative-advantage token is capped at
    ``c * |A|``, Ye et al. 2020). ``epsilon_high`` None means ``epsilon``.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip={dual_clip} must be > 1.")
    eps_high = epsilon if epsilon_high is None else epsilon_high

    def objective(ratio, logps, advantages, **context):
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        loss = -torch.min(unclipped * advantages, clipped * advantages)
        negative = (advantages < 0).expand_as(ratio)
        flags = {
            "low": (ratio < 1 - epsilon) & negative,
            "high": (ratio > 1 + eps_high) & (advantages > 0).expand_as(ratio),
        }
        if dual_clip is not None:
            cap = -dual_clip * advantages
            flags["dual"] = negative & (loss > cap)
            loss = torch.where(negative, torch.min(loss, cap), loss)
        return loss, flags

    return objective


def cispo_loss(*, epsilon: float = 0.2, epsilon_high: float | None = None) -> TokenObjective:
    """CISPO (MiniMax-M1; TRL's ``loss_type="cispo"``): clip the IS weight, never the gradient.

    ``l = -sg[min(r, cap)] * A * logp``. As in TRL, the cap is ``epsilon_high`` taken as the
    absolute cap on the ratio (ScaleRL's epsilon_max, recommended 5.0), not ``1 + epsilon_high``;
    when ``epsilon_high`` is None the cap is ``epsilon`` (TRL's meaning: its epsilon_high defaults to
    epsilon). Every token keeps its gradient ``-sg[w] * A``.
    """
    cap = epsilon if epsilon_high is None else epsilon_high

    def objective(ratio, logps, advantages, **context):
        weight = torch.clamp(ratio, max=cap).detach()
        loss = -weight * advantages * logps
        return loss, {"high": (ratio > cap) & (advantages > 0).expand_as(ratio)}

    return objective


def sapo_loss(*, sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05) -> TokenObjective:
    """SAPO (Soft Adaptive Policy Optimization; TRL's ``loss_type="sapo"``): a soft gate, no clip.

    ``l = -f(r; tau) * A`` with ``f(r; tau) = sigmoid(tau * (r - 1)) * 4 / tau`` and
    ``tau = sapo_temperature_pos`` where ``A > 0`` else ``sapo_temperature_neg``. At ``r = 1``
    ``f = 2 / tau`` and ``df/dr = 1``, so the gradient is the plain policy gradient; it decays
    smoothly as ``r`` leaves 1.
    """
    def objective(ratio, logps, advantages, **context):
        tau = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg).to(ratio.dtype)
        gate = torch.sigmoid(tau * (ratio - 1)) * (4.0 / tau)
        return -gate * advantages, {}

    return objective


VESPO_LOG_FLOOR = math.log(1e-8)


def vespo_loss(*, vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0,
               vespo_lambda_neg: float = 2.0) -> TokenObjective:
    """VESPO (TRL's ``loss_type="vespo"``): a gamma-shaped weight of the sequence ratio.

    ``l = -sg[phi(w_i)] * A * logp`` with ``w_i = exp(clamp(sum_t clamp(log r_{i,t}, -20, 20)
    + sum_t clamp(log is_{i,t}, log 1e-8, 20), log 1e-8, 20))`` (the *sum* of token log-ratios,
    plus the sampler-mismatch log-weights when given) and ``phi(w) = exp(lam + k log w - lam w)``
    (``phi(1) = 1``; ``k, lam`` = the ``_pos`` knobs where ``A >= 0``, else ``_neg``; ``lam >= 1e-4``).
    Non-finite ``phi`` is 0. The sampler weights enter ``phi`` only (``absorbs_is_weights``).
    Stats: ``vespo/phi_seq_mean``.
    """
    def objective(ratio, logps, advantages, *, active, log_ratio, is_weights=None, **context):
        with torch.no_grad():
            seq = torch.where(active, log_ratio.clamp(-20.0, 20.0), 0.0).sum(-1, keepdim=True)
            if is_weights is not None:
                log_is = torch.log(is_weights.float()).clamp(VESPO_LOG_FLOOR, 20.0)
                seq = seq + torch.where(active, log_is, 0.0).sum(-1, keepdim=True)
            log_w = seq.clamp(VESPO_LOG_FLOOR, 20.0)
            positive = advantages >= 0
            k = torch.where(positive, vespo_k_pos, vespo_k_neg).to(log_w.dtype)
            lam = torch.where(positive, vespo_lambda_pos, vespo_lambda_neg).to(log_w.dtype).clamp(min=1e-4)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return -phi * advantages * logps, {"vespo/phi_seq_mean": phi.expand_as(logps)}

    objective.absorbs_is_weights = True  # type: ignore[attr-defined]  # a marker on the function object
    return objective


POLICY_LOSSES: dict[str, Callable[..., TokenObjective]] = {
    "clip": clip_loss,
    "cispo": cispo_loss,
    "sapo": sapo_loss,
    "vespo": vespo_loss,
}


def objective_knobs(name: str) -> tuple[str, ...]:
    """The knobs of the per-token objective `name`: its factory's keyword-only parameters."""
    parameters = inspect.signature(POLICY_LOSSES[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def token_objective(name: str, **knobs) -> TokenObjective:
    """The per-token objective `name` with `knobs` bound; each must be one of its own
    (`objective_knobs(name)`): another objective's knob is an error naming it."""
    foreign = sorted(set(knobs) - set(objective_knobs(name)))
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: not a knob of the {name!r} objective "
                         f"(its knobs: {', '.join(objective_knobs(name)) or 'none'}).")
    return POLICY_LOSSES[name](**knobs)


# ---------------------------------------------------------------------------------------------
# Aggregation: per-token loss [B,T] -> scalar, with explicit normalisers.
# ---------------------------------------------------------------------------------------------


def _masked_sum(per_token_loss: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return torch.where(active, per_token_loss, 0.0).sum()


def _sequence_count(active: torch.Tensor, num_sequences) -> torch.Tensor | int | float:
    return active.shape[0] if num_sequences is None else num_sequences


# Each aggregation takes the per-call normalisers `num_items_in_batch` and `num_sequences` (None:
# this batch's own) and, as keywords, the knobs its AGGREGATIONS entry declares.


def aggregate_grpo(per_token_loss, active, *, num_items_in_batch=None, num_sequences=None):
    """``mean_i (sum_t l_{i,t} / max(|o_i|, 1))`` over the B local rows: mean of sequence means."""
    per_sequence = torch.where(active, per_token_loss, 0.0).sum(-1) / active.sum(-1).clamp(min=1)
    return per_sequence.mean()


def aggregate_bnpo(per_token_loss, active, *, num_items_in_batch=None, num_sequences=None):
    """``sum_{i,t} l_{i,t} / max(sum mask, 1)``: token mean over this (local) batch."""
    return _masked_sum(per_token_loss, active) / active.sum().clamp(min=1)


def aggregate_dr_grpo(per_token_loss, active, *, num_items_in_batch=None, num_sequences=None,
                      max_completion_length: int | None = None):
    """``sum_{i,t} l_{i,t} / (num_sequences * max_completion_length)`` (Dr. GRPO; default B rows)."""
    if max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (the config's, not the padded T).")
    return _masked_sum(per_token_loss, active) / (_sequence_count(active, num_sequences) * max_completion_length)


def aggregate_dapo(per_token_loss, active, *, num_items_in_batch=None, num_sequences=None):
    """``sum_{i,t} l_{i,t} / num_items_in_batch`` (default: this batch's active-token count), >= 1."""
    if num_items_in_batch is None:
        normaliser = active.sum().clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        normaliser = num_items_in_batch.clamp(min=1)
    else:
        normaliser = max(num_items_in_batch, 1)
    return _masked_sum(per_token_loss, active) / normaliser


def aggregate_luspo(per_token_loss, active, *, num_items_in_batch=None, num_sequences=None):
    """``mean_i sum_t l_{i,t}`` over the B local rows: mean of sequence sums (LUSPO, TRL)."""
    return torch.where(active, per_token_loss, 0.0).sum(-1).mean()


class Aggregation(NamedTuple):
    """An aggregation's registration: the function, whether it is a local mean, and its knobs.

    `local_mean`: a mean over the local (micro-)batch by definition (TRL's meaning): the losses of
    the micro-batches are averaged (a trainer divides by the accumulation steps) and micro-batches
    must not be merged. Otherwise the aggregation carries global normalisers and the parts sum.
    `knobs`: the config fields it reads, passed to `fn` as keywords."""

    fn: Callable[..., torch.Tensor]
    local_mean: bool
    knobs: tuple[str, ...] = ()


AGGREGATIONS: dict[str, Aggregation] = {
    "grpo": Aggregation(aggregate_grpo, local_mean=True),
    "bnpo": Aggregation(aggregate_bnpo, local_mean=True),
    "dr_grpo": Aggregation(aggregate_dr_grpo, local_mean=False, knobs=("max_completion_length",)),
    "dapo": Aggregation(aggregate_dapo, local_mean=False),
    "luspo": Aggregation(aggregate_luspo, local_mean=True),
}


class LossType(NamedTuple):
    """A loss_type's registration: its per-token objective (a key of POLICY_LOSSES) and its
    aggregation (a key of AGGREGATIONS). The config fields it reads are `policy_loss_fields`."""

    objective: str
    aggregation: str


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType("clip", "grpo"),
    "bnpo": LossType("clip", "bnpo"),
    "dr_grpo": LossType("clip", "dr_grpo"),
    "dapo": LossType("clip", "dapo"),
    "cispo": LossType("cispo", "dapo"),
    "sapo": LossType("sapo", "grpo"),
    "luspo": LossType("clip", "luspo"),
    "vespo": LossType("vespo", "dapo"),
}
"""loss_type -> (key of POLICY_LOSSES, key of AGGREGATIONS), as TRL pairs them."""

IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
"""The ratio's level (`importance_sampling_level`): per token, or GSPO's per sequence."""


def shared_knobs() -> tuple[str, ...]:
    """The knobs every loss type reads (the ratio's level, the KL term, the off-policy mask):
    `make_policy_loss`'s own, the keyword-only parameters of `_bound_policy_loss`."""
    parameters = inspect.signature(_bound_policy_loss).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def policy_loss_fields(loss_type: str) -> tuple[str, ...]:
    """The config fields `loss_type` reads, in order: the shared knobs, its objective's, its
    aggregation's. `make_policy_loss(loss_type, **knobs)` takes these and no others."""
    objective, aggregation = _check_loss_type(loss_type)
    return shared_knobs() + objective_knobs(objective) + AGGREGATIONS[aggregation].knobs


def policy_loss_knobs() -> tuple[str, ...]:
    """Every config field some registered loss type reads (each once, in registration order)."""
    return tuple(dict.fromkeys(f for loss_type in LOSS_TYPES for f in policy_loss_fields(loss_type)))


def is_local_mean(loss_type: str) -> bool:
    """Whether `loss_type`'s aggregation is a local mean (its AGGREGATIONS entry says)."""
    return AGGREGATIONS[_check_loss_type(loss_type).aggregation].local_mean


def _check_loss_type(loss_type: str) -> LossType:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: use one of {sorted(LOSS_TYPES)}.")
    return LOSS_TYPES[loss_type]


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "dapo",
    *,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    num_sequences: torch.Tensor | int | None = None,
    **knobs: Any,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar the way ``loss_type`` does (see the module table).

    Args:
        per_token_loss: [B, T]; values at ``mask == 0`` are ignored (even NaN/inf).
        mask: [B, T], 1 (or True) on the completion tokens that count.
        loss_type: any key of ``LOSS_TYPES``; cispo aggregates as dapo, sapo as grpo.
        num_items_in_batch: dapo/cispo's normaliser, the active-token count of the whole
            accumulated, all-rank batch; default this batch's ``mask.sum()``.
        num_sequences: dr_grpo's sequence count; default B. Pass the global count to split a
            batch into parts whose losses sum to the whole-batch loss. grpo/sapo/bnpo ignore it
            and ignore ``num_items_in_batch`` (local means, TRL's meaning).
        knobs: the aggregation's own (its AGGREGATIONS entry's ``knobs``): dr_grpo's
            ``max_completion_length`` (required for dr_grpo).
    Returns:
        0-dim loss tensor.
    """
    aggregation = AGGREGATIONS[_check_loss_type(loss_type).aggregation]
    foreign = sorted(set(knobs) - set(aggregation.knobs))
    if foreign:
        raise ValueError(f"{', '.join(foreign)}: not a knob of loss_type={loss_type!r}'s aggregation "
                         f"(its knobs: {', '.join(aggregation.knobs) or 'none'}).")
    if per_token_loss.shape != mask.shape or per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss {tuple(per_token_loss.shape)} and mask {tuple(mask.shape)} must be [B, T].")
    return aggregation.fn(per_token_loss, mask.bool(), num_items_in_batch=num_items_in_batch,
                          num_sequences=num_sequences, **knobs)


# ---------------------------------------------------------------------------------------------
# The objective.
# ---------------------------------------------------------------------------------------------


def _masked_mean(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    x = x.detach().float().expand_as(active)
    return torch.where(active, x, 0.0).sum() / active.sum().clamp(min=1)


def _check_same_shape(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; logps has {tuple(reference.shape)}.")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | float | None = None,
    num_sequences: torch.Tensor | int | None = None,
    is_weights: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    sampling_logps: torch.Tensor | None = None,
    loss_type: str = "dapo",
    **knobs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family loss of one (micro-)batch: ratio, per-token objective, masks, KL, aggregation.

    The knobs (`epsilon`, ... below) are taken as from a config: those `loss_type` reads
    (`policy_loss_fields`) are bound with `make_policy_loss`'s defaults for the rest, a knob of
    another loss type is not (as a config's other fields), and a name no loss type reads is an
    error. This is `make_policy_loss(loss_type, **own knobs)` called once on these tensors.

    Per active token (``mask == 1``), in TRL's order:

    1. ``log w = logp - old`` (``importance_sampling_level="token"``), or for ``"sequence"``
       (GSPO) ``log w_i = mean_t(logp - old)`` given to every token of row i, with its gradient
       (TRL's ``coef_1``). ``old_logps=None`` means on-policy: ``old = sg[logp]``, so ``w = 1``
       with gradient ``dlogp``.
    2. ``l = POLICY_LOSSES[...](w, logp, A)`` (clip / cispo / sapo / vespo; see those functions).
    3. ``l = l * keep_i`` (``off_policy_mask_threshold = d``: ``keep_i = A_i >= 0 or
       mean_t(behaviour - sg[logp]) <= d``, behaviour = ``sampling_logps`` if given, else old),
       ``l = l * entropy_mask`` (kept tokens, top_entropy_quantile), ``l = l * is_weights``
       (sampler/trainer mismatch correction; vespo takes them into its weight instead), then
       ``l = l + beta * KL`` with ``KL = KL_est(logp, ref)``, times ``w`` when
       ``use_bias_correction_kl`` (DeepSeekMath: KL in the loss, not the reward).
    4. Aggregate by ``loss_type`` with the explicit normalisers (``aggregate_loss``).

    Args:
        logps: [B, T] log-probs of the completion tokens under the current policy (with grad).
        old_logps: [B, T] log-probs under the sampling-time policy, or None (on-policy).
        advantages: [B] (or [B, T]) advantages.
        mask: [B, T], 1 on completion tokens that count.
        loss_type: ``grpo | bnpo | dr_grpo | dapo | cispo | sapo | luspo | vespo`` (TRL's meanings).
        epsilon: lower clip ``1 - epsilon``.
        epsilon_high: upper clip ``1 + epsilon_high`` (clip-higher; None = epsilon). For cispo the
            absolute cap on the IS weight (None = epsilon), as in TRL.
        delta: cap of the unclipped ratio branch (two-sided clipping), None = off.
        dual_clip: ``c > 1`` caps the loss of ``A < 0`` tokens at ``c * |A|``, None = off.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO).
        beta: KL coefficient; ``> 0`` requires ``ref_logps``.
        ref_logps: [B, T] reference log-probs; when given, ``stats["kl"]`` is reported.
        kl_estimator: ``k1 | k2 | k3``.
        use_bias_correction_kl: weight the KL estimate by the importance ratio ``w`` (TRL's knob).
        off_policy_mask_threshold: the off-policy sequence mask's KL threshold, None = off.
        max_completion_length, num_items_in_batch, num_sequences: see ``aggregate_loss``.
        is_weights: [B, T] detached per-token weights (``rollout_correction_weights``).
        entropy_mask: [B, T] bool, tokens kept for the policy term (``top_entropy_mask``).
        sampling_logps: [B, T] the sampler's log-probs (vLLM), for the off-policy mask.
        sapo_temperature_pos, sapo_temperature_neg: SAPO's gate temperatures for A > 0 / A <= 0.
        vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: VESPO's gamma shape.
    Returns:
        ``(loss, stats)``: a 0-dim loss and detached 0-dim stats averaged over active tokens:
        ``ratio_mean``; ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``
        (clip losses; cispo reports high/region = weight capped with A > 0; sapo has no clip);
        ``clip_ratio/dual_mean`` when ``dual_clip`` is set; ``kl`` when ``ref_logps`` is given;
        ``off_policy_mask/dropped_ratio`` with the off-policy mask; ``vespo/phi_seq_mean``.
    """
    _check_known_knobs(loss_type, knobs)
    own = {k: v for k, v in knobs.items() if k in policy_loss_fields(loss_type)}
    return make_policy_loss(loss_type, **own)(logps, old_logps, advantages, mask, ref_logps=ref_logps,
                                              num_items_in_batch=num_items_in_batch, num_sequences=num_sequences,
                                              is_weights=is_weights, entropy_mask=entropy_mask,
                                              sampling_logps=sampling_logps)


def make_policy_loss(loss_type: str = "dapo", **knobs: Any) -> Callable[..., LossOutput]:
    """The loss of `loss_type` with its knobs bound once: returns
    `loss_fn(logps, old_logps, advantages, mask, *, ref_logps=None, num_items_in_batch=None,
    num_sequences=None, is_weights=None, entropy_mask=None, sampling_logps=None) -> (loss, stats)`,
    called with tensors only (see `policy_loss` for the math).

    `knobs` are exactly `loss_type`'s own, `policy_loss_fields(loss_type)` (the knobs every loss
    reads, its objective's, its aggregation's); one left out takes its function's default. A knob
    of another loss type, or one no loss type has, is an error naming it; so are invalid values,
    here, before any tensor is seen. From a config:
    `make_policy_loss(cfg.loss_type, **{f: getattr(cfg, f) for f in policy_loss_fields(cfg.loss_type)})`."""
    objective_name, aggregation_name = _check_loss_type(loss_type)
    _check_known_knobs(loss_type, knobs)
    own = policy_loss_fields(loss_type)
    foreign = [k for k in knobs if k not in own]
    if foreign:
        whose = {k: next(t for t in LOSS_TYPES if k in policy_loss_fields(t)) for k in foreign}
        raise ValueError(f"make_policy_loss: loss_type={loss_type!r} does not read "
                         f"{', '.join(f'{k} (a knob of {whose[k]})' for k in foreign)}; its knobs are {', '.join(own)}.")

    def pick(names: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in knobs.items() if k in names}

    objective = token_objective(objective_name, **pick(objective_knobs(objective_name)))
    aggregation = AGGREGATIONS[aggregation_name]
    aggregate = functools.partial(aggregation.fn, **pick(aggregation.knobs))
    return _bound_policy_loss(objective, aggregate, **pick(shared_knobs()))


def _check_known_knobs(loss_type: str, knobs: dict[str, Any]) -> None:
    unknown = sorted(k for k in knobs if k not in policy_loss_knobs())
    if unknown:
        close = {k: difflib.get_close_matches(k, policy_loss_knobs(), n=1) for k in unknown}
        hints = [f"{k}" + (f" (did you mean {close[k][0]}?)" if close[k] else "") for k in unknown]
        raise ValueError(f"loss_type={loss_type!r}: unknown knob {', '.join(hints)}; the knobs of the registered "
                         f"loss types are {', '.join(policy_loss_knobs())}.")


def _bound_policy_loss(objective: TokenObjective, aggregate: Callable[..., torch.Tensor], *,
                       importance_sampling_level: str = "token", beta: float = 0.0, kl_estimator: str = "k3",
                       use_bias_correction_kl: bool = False,
                       off_policy_mask_threshold: float | None = None) -> Callable[..., LossOutput]:
    """The loss of `objective` aggregated by `aggregate(per_token, active, num_items_in_batch=,
    num_sequences=)`, with the knobs every loss type reads (their meanings: `policy_loss`)."""
    absorbs_is_weights = getattr(objective, "absorbs_is_weights", False)
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}: use 'token' or 'sequence'.")

    def loss_fn(logps, old_logps, advantages, mask, *, ref_logps=None, num_items_in_batch=None,
                num_sequences=None, is_weights=None, entropy_mask=None, sampling_logps=None) -> LossOutput:
        if logps.dim() != 2:
            raise ValueError(f"logps must be [B, T], got {tuple(logps.shape)}.")
        _check_same_shape(logps, old_logps=old_logps, mask=mask, ref_logps=ref_logps,
                          is_weights=is_weights, entropy_mask=entropy_mask, sampling_logps=sampling_logps)
        if advantages.shape not in (logps.shape[:1], logps.shape):
            raise ValueError(f"advantages must be [B] or [B, T]; got {tuple(advantages.shape)} "
                             f"for logps {tuple(logps.shape)}.")
        if beta != 0.0 and ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps (the reference model's per-token log-probs).")

        active = mask.bool()
        # Padding positions are zeroed before any exp/log so neither value nor gradient can be NaN there.
        logps_a = torch.where(active, logps, 0.0)
        old_a = logps_a.detach() if old_logps is None else torch.where(active, old_logps.detach(), 0.0)
        log_ratio = logps_a - old_a
        if importance_sampling_level == "token":
            log_w = log_ratio
        else:  # "sequence" (GSPO): the length-normalised sequence ratio, given to every token
            log_w = (log_ratio.sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp(min=1)).expand_as(log_ratio)
        ratio = torch.exp(log_w)
        adv = (advantages[:, None] if advantages.dim() == 1 else advantages).to(ratio.dtype)
        weights = None if is_weights is None else torch.where(active, is_weights.detach(), 1.0)

        per_token, flags = objective(ratio, logps_a, adv, active=active, log_ratio=log_ratio, is_weights=weights)
        if off_policy_mask_threshold is not None:
            # DeepSeek-V3.2's off-policy sequence mask: drop A < 0 sequences whose mean
            # sampler-to-policy KL exceeds the threshold
            behaviour = old_a if sampling_logps is None else sampling_logps
            keep = off_policy_keep(adv, logps_a, behaviour, active, off_policy_mask_threshold)
            per_token = per_token * keep.to(per_token.dtype)
            flags["off_policy_mask/dropped_ratio"] = (~keep).expand_as(active)
        if entropy_mask is not None:
            per_token = per_token * entropy_mask.to(per_token.dtype)
        if weights is not None and not absorbs_is_weights:
            per_token = per_token * torch.where(active, weights, 0.0)

        stats = {"ratio_mean": _masked_mean(ratio, active)}
        if ref_logps is not None:
            kl = kl_penalty(logps_a, torch.where(active, ref_logps, 0.0), kl_estimator)
            if use_bias_correction_kl:  # TRL: the KL estimate weighted by the importance ratio (with its gradient)
                kl = kl * ratio
            stats["kl"] = _masked_mean(kl, active)
            if beta != 0.0:
                per_token = per_token + beta * kl
        for name, flag in flags.items():  # clip flags by their short names, other stats by their full ones
            stats[f"clip_ratio/{name}_mean" if name in CLIP_FLAGS else name] = _masked_mean(flag, active)
        if "low" in flags or "high" in flags:
            region = flags.get("low", torch.zeros_like(active)) | flags.get("high", torch.zeros_like(active))
            stats["clip_ratio/region_mean"] = _masked_mean(region, active)

        loss = aggregate(per_token, active, num_items_in_batch=num_items_in_batch, num_sequences=num_sequences)
        return loss, stats

    return loss_fn


CLIP_FLAGS = frozenset({"low", "high", "dual"})


@torch.no_grad()
def off_policy_keep(advantages: torch.Tensor, logps: torch.Tensor, behaviour_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's `off_policy_mask_threshold`): [B, 1] bool,
    keep row i when ``A_i >= 0`` or ``mean_t(behaviour - logp) <= threshold`` over its active
    tokens (the mean KL from the behaviour policy; NaN behaviour logprobs count 0)."""
    active = mask.bool()
    drift = torch.where(active, torch.nan_to_num(behaviour_logps.detach() - logps.detach(), nan=0.0), 0.0)
    mean_drift = drift.sum(-1, keepdim=True) / active.sum(-1, keepdim=True).clamp(min=1)
    adv = advantages[:, None] if advantages.dim() == 1 else advantages[:, :1]
    return (adv >= 0) | (mean_drift <= threshold)


# ---------------------------------------------------------------------------------------------
# Sampler / trainer mismatch correction (TRL's vllm_importance_sampling_*).
# ---------------------------------------------------------------------------------------------


ROLLOUT_CORRECTION_LEVELS = ("token", "sequence")
ROLLOUT_CORRECTION_MODES = ("truncate", "mask")
"""`rollout_correction_weights`' levels and modes; TRL's `vllm_importance_sampling_mode` names
one of each as `<level>_<mode>` (token_truncate, ..., sequence_mask)."""


@torch.no_grad()
def rollout_correction_weights(
    trainer_logps: torch.Tensor,
    sampler_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    mode: str = "truncate",
    cap: float | None = 2.0,
    floor: float | None = None,
) -> torch.Tensor:
    """Importance weights ``pi_trainer / pi_sampler`` for tokens sampled by a different engine.

    ``log rho = trainer - sampler`` per token (``level="token"``), or per sequence
    ``log rho_i = sum_t (trainer - sampler)`` (``level="sequence"``: the product of the token
    ratios) given to every token of ``i``. Then, as TRL's ``vllm_importance_sampling_mode``:

    - ``mode="truncate"`` (``*_truncate``, truncated IS): ``w = clamp(rho, floor, cap)``;
    - ``mode="mask"`` (``*_mask``, masked IS): ``w = rho`` where ``floor <= rho <= cap``, else 0 (the
      token or whole sequence is dropped from the loss; kept ones keep their ratio, not 1).

    ``cap`` and ``floor`` are TRL's ``vllm_importance_sampling_clip_max`` / ``_clip_min`` (None: no
    bound on that side).

    TRL's mode names map as ``token_truncate = (level="token", mode="truncate")`` etc.

    Args:
        trainer_logps: [B, T] log-probs of the sampled tokens under the trainer's policy at
            sampling time (the "old" logps).
        sampler_logps: [B, T] log-probs reported by the sampler (e.g. vLLM).
        mask: [B, T], 1 on completion tokens.
        level: ``"token" | "sequence"``.
        mode: ``"truncate" | "mask"``.
        cap: C_max, the upper truncation / rejection threshold; None = no upper bound.
        floor: C_min, the lower one; None = no lower bound.
    Returns:
        [B, T] detached float weights, 0 on padding; pass as ``policy_loss(is_weights=...)``.
    """
    if trainer_logps.shape != sampler_logps.shape or trainer_logps.shape != mask.shape:
        raise ValueError("trainer_logps, sampler_logps and mask must all be [B, T].")
    active = mask.bool()
    log_rho = torch.where(active, trainer_logps.float() - sampler_logps.float(), 0.0)
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)
    elif level not in ROLLOUT_CORRECTION_LEVELS:
        raise ValueError(f"level={level!r}: use 'token' or 'sequence'.")
    rho = torch.exp(log_rho)
    if mode not in ROLLOUT_CORRECTION_MODES:
        raise ValueError(f"mode={mode!r}: use 'truncate' or 'mask'.")
    if mode == "truncate":
        weights = torch.clamp(rho, min=floor, max=cap) if (cap is not None or floor is not None) else rho
    else:
        keep = torch.ones_like(rho, dtype=torch.bool)
        if cap is not None:
            keep &= rho <= cap
        if floor is not None:
            keep &= rho >= floor
        weights = torch.where(keep, rho, 0.0)
    return torch.where(active, weights, 0.0)
