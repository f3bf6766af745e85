"""Per-token log-probabilities and entropies without full-vocabulary float32 copies.

For logits ``z = logits / temperature`` of a row and the sampled token ``y``:

- ``logp(y) = z_y - logsumexp(z)``,
- ``H = logsumexp(z) - sum_v p_v z_v``, ``p = softmax(z)``.

Rows are processed ``chunk_size`` at a time, each chunk upcast to float32 (float64 stays float64)
on its own, so no ``[rows, V]`` float32 copy of the whole batch is ever made, and the backward
passes are hand-written (``torch.autograd.Function``) so that nothing of size ``[rows, V]`` is
saved for backward either: only the inputs and one ``logsumexp`` per row. The gradients:

- ``dlogp(y)/dz_v = 1[v = y] - p_v``,
- ``dH/dz_v = -p_v (log p_v + H)``,

and ``d/dlogits = d/dz / temperature``. ``chunked_logprobs`` goes one step further and also never
holds the logits themselves: it takes the final hidden states and the LM-head weight, and
projects and reduces chunk by chunk in both passes (the backward recomputes each chunk's logits).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 27
"""Target size of one float32 chunk of logits (128 MiB) when ``chunk_size`` is None."""


def _auto_chunk_rows(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_forward(z: torch.Tensor, index: torch.Tensor, with_entropy: bool):
    """z [n, V] (compute dtype, already divided by temperature) -> (logp [n], lse [n], entropy [n] | None)."""
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, index[:, None]).squeeze(1) - lse
    entropy = None
    if with_entropy:
        probs = torch.exp(z - lse[:, None])
        entropy = lse - (probs * z).sum(-1)
    return logp, lse, entropy


def _chunk_grad_z(z, lse, index, grad_logp, grad_entropy):
    """d(loss)/dz [n, V] for one chunk, given upstream grads of logp [n] and entropy [n] (or None)."""
    log_probs = z - lse[:, None]
    probs = torch.exp(log_probs)
    grad_z = torch.zeros_like(z)
    if grad_logp is not None:
        grad_logp = grad_logp.to(z.dtype)
        grad_z.sub_(probs * grad_logp[:, None])
        grad_z.scatter_add_(1, index[:, None], grad_logp[:, None])
    if grad_entropy is not None:
        entropy = -(probs * log_probs).sum(-1, keepdim=True)
        grad_z.sub_(probs * (log_probs + entropy) * grad_entropy.to(z.dtype)[:, None])
    return grad_z


class _LogSoftmaxGather(torch.autograd.Function):
    """logits [N, V], index [N] -> logp [N] (and entropy [N]); see module docstring."""

    @staticmethod
    def forward(ctx, logits, index, temperature, chunk_rows, with_entropy):
        compute = _compute_dtype(logits.dtype)
        n_rows = logits.shape[0]
        logp = torch.empty(n_rows, dtype=compute, device=logits.device)
        lse = torch.empty(n_rows, dtype=compute, device=logits.device)
        entropy = torch.empty(n_rows, dtype=compute, device=logits.device) if with_entropy else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = logits[rows].to(compute) / temperature
            logp[rows], lse[rows], chunk_entropy = _chunk_forward(z, index[rows], with_entropy)
            if with_entropy:
                entropy[rows] = chunk_entropy
        ctx.save_for_backward(logits, index, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, index, lse = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad_logits = torch.empty_like(logits)
        compute = lse.dtype
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            z = logits[rows].to(compute) / ctx.temperature
            grad_z = _chunk_grad_z(
                z, lse[rows], index[rows],
                None if grad_logp is None else grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows],
            )
            grad_logits[rows] = (grad_z / ctx.temperature).to(logits.dtype)
        return grad_logits, None, None, None, None


class _LinearLogSoftmaxGather(torch.autograd.Function):
    """hidden [N, H], weight [V, H], index [N] -> logp [N] (and entropy [N]), logits never whole."""

    @staticmethod
    def forward(ctx, hidden, weight, index, temperature, chunk_rows, with_entropy):
        compute = _compute_dtype(hidden.dtype)
        n_rows = hidden.shape[0]
        logp = torch.empty(n_rows, dtype=compute, device=hidden.device)
        lse = torch.empty(n_rows, dtype=compute, device=hidden.device)
        entropy = torch.empty(n_rows, dtype=compute, device=hidden.device) if with_entropy else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = (hidden[rows] @ weight.t()).to(compute) / temperature
            logp[rows], lse[rows], chunk_entropy = _chunk_forward(z, index[rows], with_entropy)
            if with_entropy:
                entropy[rows] = chunk_entropy
        ctx.save_for_backward(hidden, weight, index, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, index, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        compute = lse.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows]
            z = (h @ weight.t()).to(compute) / ctx.temperature
            grad_z = _chunk_grad_z(
                z, lse[rows], index[rows],
                None if grad_logp is None else grad_logp[rows],
                None if grad_entropy is None else grad_entropy[rows],
            )
            grad_logits = (grad_z / ctx.temperature).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight.add_((grad_logits.t() @ h).to(compute))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _check_index(index: torch.Tensor, leading: torch.Size) -> None:
    if index.shape != leading:
        raise ValueError(f"index has shape {tuple(index.shape)}; expected {tuple(leading)}.")


def selective_log_softmax(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``index``, row-chunked, float32 or better.

    Equals ``torch.log_softmax(logits.float() / temperature, -1).gather(-1, index[..., None])[..., 0]``
    without materialising that full-vocabulary float32 copy, and with a backward that saves only
    ``logits`` and one logsumexp per row.

    Args:
        logits: [B, T, V] (any float dtype; bf16/fp16 are upcast chunk by chunk).
        index: [B, T] int64 token ids in ``[0, V)``.
        temperature: sampling temperature; logits are divided by it.
        chunk_size: rows (of the B*T) per chunk; None = about 128 MiB of float32 per chunk.
    Returns:
        [B, T] log-probs, float32 (float64 for float64 logits).
    """
    _check_index(index, logits.shape[:-1])
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    logp, _ = _LogSoftmaxGather.apply(
        flat_logits, index.reshape(-1), float(temperature), _auto_chunk_rows(vocab, chunk_size), False
    )
    return logp.view(index.shape)


def entropy_from_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token entropy ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` of ``z = logits / temperature``.

    Row-chunked like ``selective_log_softmax``, differentiable with the same lean backward.

    Args:
        logits: [..., V].
        temperature: sampling temperature.
        chunk_size: rows per chunk; None = about 128 MiB of float32 per chunk.
    Returns:
        [...] entropies in nats, float32 (float64 for float64 logits).
    """
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    dummy_index = torch.zeros(flat_logits.shape[0], dtype=torch.long, device=logits.device)
    _, entropy = _LogSoftmaxGather.apply(
        flat_logits, dummy_index, float(temperature), _auto_chunk_rows(vocab, chunk_size), True
    )
    return entropy.view(logits.shape[:-1])


def chunked_logprobs(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (and entropies) of ``index`` under ``logits = hidden @ lm_head_weight.T``, chunked.

    The ``[B*T, V]`` logits never exist at once, in the forward or the backward: each chunk of
    ``chunk_size`` rows is projected (matmul in the hidden dtype), upcast, reduced to logp/entropy
    and dropped; the backward recomputes it and accumulates ``dhidden`` and ``dweight``. The LM
    head must have no bias (true of the common decoder LMs).

    Args:
        hidden: [B, T, H] final hidden states at the positions that predict ``index``.
        lm_head_weight: [V, H] output projection (``model.lm_head.weight``).
        index: [B, T] int64 target token ids.
        temperature: logits are divided by it.
        chunk_size: rows per chunk; None = about 128 MiB of float32 logits per chunk.
        return_entropy: also return per-token entropies (differentiable).
    Returns:
        [B, T] float32 log-probs, or ``(logps, entropies)`` when ``return_entropy``.
    """
    _check_index(index, hidden.shape[:-1])
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight {tuple(lm_head_weight.shape)} must be [V, {hidden.shape[-1]}].")
    vocab = lm_head_weight.shape[0]
    logp, entropy = _LinearLogSoftmaxGather.apply(
        hidden.reshape(-1, hidden.shape[-1]), lm_head_weight, index.reshape(-1),
        float(temperature), _auto_chunk_rows(vocab, chunk_size), return_entropy,
    )
    logp = logp.view(index.shape)
    return (logp, entropy.view(index.shape)) if return_entropy else logp


def top_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Tokens kept by TRL's ``top_entropy_quantile = quantile``: the top ``quantile`` by entropy.

    ``keep = mask & (H >= Q_{1 - quantile}(H over active tokens))``, where ``Q_q`` is the
    linearly interpolated q-quantile (``torch.quantile``'s default). So ``quantile = 1.0`` keeps
    every active token, ``0.2`` keeps the 20% highest-entropy ones (the "80/20" paper), and ``0.0``
    keeps only the tokens at the maximum. Ties at the threshold are kept. Computed over this local
    batch, as TRL.

    Args:
        entropies: [B, T] per-token entropies.
        mask: [B, T] 1 on completion tokens.
        quantile: fraction in [0, 1] of highest-entropy active tokens to keep.
    Returns:
        [B, T] bool, False on padding; all False if no token is active.
    """
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile={quantile} must be in [0, 1].")
    active = mask.bool()
    values = entropies.detach()[active].float()
    if values.numel() == 0:
        return torch.zeros_like(active)
    ordered = values.sort().values
    position = (1.0 - quantile) * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    threshold = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return active & (entropies.detach() >= threshold)
