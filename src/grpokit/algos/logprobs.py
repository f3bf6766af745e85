"""Per-token log-probabilities and entropies without full-vocabulary float32 copies.

For logits ``z = logits / temperature`` of a row and the sampled token ``y``:

- ``logp(y) = z_y - logsumexp(z)``,
- ``H = logsumexp(z) - sum_v p_v z_v``, ``p = softmax(z)``.

Rows are processed ``chunk_size`` at a time, each chunk upcast to float32 (float64 stays float64)
on its own, so no ``[rows, V]`` float32 copy of the whole batch is ever made, and the backward
passes are hand-written (``torch.autograd.Function``) so that nothing of size ``[rows, V]`` is
saved for backward either: only the inputs and one logsumexp (and entropy) per row. The gradients:

- ``dlogp(y)/dz_v = 1[v = y] - p_v``,
- ``dH/dz_v = -p_v (log p_v + H)``,

and ``d/dlogits = d/dz / temperature``. ``chunked_logprobs`` goes one step further and also never
holds the logits themselves: it takes the final hidden states and the LM-head weight, and
projects and reduces chunk by chunk in both passes (the backward recomputes each chunk's logits).
Measured on one H100 (bf16, B*T = 16384 rows, V = 151936, H = 1024, logp forward + backward):
the plain ``log_softmax(logits.float()).gather`` peaked at 27.8 GiB in 62 ms; ``chunked_logprobs``
with the default chunk at 2.4 GiB in 106 ms (``chunk_size=4096``: 8.7 GiB, 95 ms).
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 29
"""Target size of one float32 chunk of logits (512 MiB) when ``chunk_size`` is None: about two
such buffers are alive at once; 151,936-token vocabulary -> 883 rows a chunk."""


def _auto_chunk_rows(vocab_size: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be >= 1.")
        return chunk_size
    return max(1, CHUNK_BYTES // (4 * vocab_size))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits_chunk(chunk, compute, temperature, fresh=False) -> tuple[torch.Tensor, bool]:
    """Upcast one chunk of logits and divide by the temperature -> (z, owned: z is a buffer of ours).

    ``fresh`` says ``chunk`` itself is a temporary (a matmul output) that may be overwritten."""
    z = chunk.to(compute)
    owned = fresh or z.data_ptr() != chunk.data_ptr()
    if temperature != 1.0:
        z = z.div_(temperature) if owned else z / temperature
        owned = True
    return z, owned


def _chunk_forward(z, owned, index, with_entropy):
    """z [n, V] -> (logp [n], lse [n], entropy [n] | None), in at most two [n, V] buffers.

    With ``m = max_v z``, ``e = exp(z - m)``, ``S = sum_v e``: ``lse = m + log S``,
    ``logp_y = (z_y - m) - log S``, ``H = log S - sum_v e (z - m) / S``."""
    m = z.amax(dim=-1, keepdim=True)
    shifted = z.sub_(m) if owned else z - m
    exp_shifted = shifted.exp()
    log_sum = exp_shifted.sum(-1).log()
    logp = shifted.gather(1, index[:, None]).squeeze(1) - log_sum
    entropy = None
    if with_entropy:
        entropy = log_sum - exp_shifted.mul_(shifted).sum(-1) / log_sum.exp()
    return logp, m.squeeze(1) + log_sum, entropy


def _chunk_grad_z(z, owned, lse, entropy, index, grad_logp, grad_entropy):
    """d(loss)/dz [n, V] of one chunk from the upstream grads of logp and entropy [n] (either None).

    ``dlogp_y/dz = onehot(y) - p`` and ``dH/dz = -p (log p + H)``; computed in place in (at most)
    two [n, V] buffers, reusing ``z`` when ``owned``.
    """
    log_probs = z.sub_(lse[:, None]) if owned else z - lse[:, None]
    probs = log_probs.exp()
    if grad_entropy is not None:
        entropy_part = log_probs.add_(entropy[:, None]).mul_(probs).mul_(-grad_entropy.to(z.dtype)[:, None])
        if grad_logp is None:
            return entropy_part
    grad_logp = grad_logp.to(z.dtype)[:, None]
    grad_z = probs.mul_(-grad_logp).scatter_add_(1, index[:, None], grad_logp)
    return grad_z.add_(entropy_part) if grad_entropy is not None else grad_z


def _forward_chunks(make_chunk, fresh, n_rows, index, temperature, chunk_rows, with_entropy, compute, device):
    """Run _chunk_forward over row chunks; make_chunk(rows) gives that chunk's raw logits (a new
    tensor when ``fresh``, else a view that must not be written)."""
    logp = torch.empty(n_rows, dtype=compute, device=device)
    lse = torch.empty(n_rows, dtype=compute, device=device)
    entropy = torch.empty(n_rows, dtype=compute, device=device) if with_entropy else None
    for start in range(0, n_rows, chunk_rows):
        rows = slice(start, start + chunk_rows)
        z, owned = _logits_chunk(make_chunk(rows), compute, temperature, fresh)
        logp[rows], lse[rows], chunk_entropy = _chunk_forward(z, owned, index[rows], with_entropy)
        if with_entropy:
            entropy[rows] = chunk_entropy
    return logp, lse, entropy


def _backward_chunk(ctx, make_chunk, fresh, rows, index, lse, entropy, grad_logp, grad_entropy):
    """d(loss)/d(raw logits) of one chunk, in the compute dtype (the raw chunk is freed early)."""
    z, owned = _logits_chunk(make_chunk(rows), lse.dtype, ctx.temperature, fresh)
    grad_z = _chunk_grad_z(
        z, owned, lse[rows], None if entropy is None else entropy[rows], index[rows],
        None if grad_logp is None else grad_logp[rows],
        None if grad_entropy is None else grad_entropy[rows],
    )
    return grad_z.div_(ctx.temperature) if ctx.temperature != 1.0 else grad_z


class _LogSoftmaxGather(torch.autograd.Function):
    """logits [N, V], index [N] -> logp [N] (and entropy [N]); see module docstring."""

    @staticmethod
    def forward(ctx, logits, index, temperature, chunk_rows, with_entropy):
        compute = _compute_dtype(logits.dtype)
        logp, lse, entropy = _forward_chunks(lambda rows: logits[rows], False, logits.shape[0], index, temperature,
                                             chunk_rows, with_entropy, compute, logits.device)
        ctx.save_for_backward(logits, index, lse, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, index, lse, entropy = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            grad_z = _backward_chunk(ctx, lambda r: logits[r], False, rows, index, lse, entropy,
                                     grad_logp, grad_entropy)
            grad_logits[rows] = grad_z
        return grad_logits, None, None, None, None


class _LinearLogSoftmaxGather(torch.autograd.Function):
    """hidden [N, H], weight [V, H], index [N] -> logp [N] (and entropy [N]), logits never whole."""

    @staticmethod
    def forward(ctx, hidden, weight, index, temperature, chunk_rows, with_entropy):
        compute = _compute_dtype(hidden.dtype)
        logp, lse, entropy = _forward_chunks(lambda rows: hidden[rows] @ weight.t(), True, hidden.shape[0], index,
                                             temperature, chunk_rows, with_entropy, compute, hidden.device)
        ctx.save_for_backward(hidden, weight, index, lse, entropy)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, index, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows]
            grad_z = _backward_chunk(ctx, lambda r: hidden[r] @ weight.t(), True, rows, index, lse, entropy,
                                     grad_logp, grad_entropy)
            grad_logits = grad_z.to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                if grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), h)
                else:
                    grad_weight.add_(grad_logits.t() @ h)
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
        chunk_size: rows (of the B*T) per chunk; None = about 512 MiB of float32 per chunk.
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
        chunk_size: rows per chunk; None = about 512 MiB of float32 per chunk.
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
        chunk_size: rows per chunk; None = about 512 MiB of float32 logits per chunk.
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


def entropy_bonus(entropies: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``H = sum(entropy * kept) / max(sum kept, 1)``: the mean token entropy over the tokens the
    policy term trains on, with its gradient (TRL's entropy bonus is ``loss - entropy_coef * H``)."""
    kept = kept.bool()
    return torch.where(kept, entropies, 0.0).sum() / kept.sum().clamp(min=1)


def top_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float, gather=None) -> torch.Tensor:
    """Tokens kept by TRL's ``top_entropy_quantile = quantile``: the top ``quantile`` by entropy.

    ``keep = mask & (H >= Q_{1 - quantile}(H over active tokens))``, where ``Q_q`` is the
    linearly interpolated q-quantile (``torch.quantile``'s default). So ``quantile = 1.0`` keeps
    every active token, ``0.2`` keeps the 20% highest-entropy ones (the "80/20" paper), and ``0.0``
    keeps only the tokens at the maximum. Ties at the threshold are kept. The quantile is over this
    batch's active tokens, or over every rank's when ``gather`` is given (a function returning the
    1-D values of every rank concatenated: TRL gathers them).

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
    if gather is not None:
        values = gather(values)
    if values.numel() == 0:
        return torch.zeros_like(active)
    ordered = values.sort().values
    position = (1.0 - quantile) * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    threshold = ordered[low] + (ordered[high] - ordered[low]) * (position - low)
    return active & (entropies.detach() >= threshold)
