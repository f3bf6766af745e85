"""Chunked per-token logprobs and entropies against the plain full-vocabulary reference."""

import math

import pytest
import torch

from grpokit.algos import chunked_logprobs, entropy_from_logits, selective_log_softmax, top_entropy_mask


def reference(logits, index, temperature=1.0):
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    logp = logp_all.gather(-1, index[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def inputs(B=3, T=5, V=11, H=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    index = torch.randint(0, V, (B, T), generator=g)
    upstream = torch.randn(2, B, T, generator=g, dtype=dtype)  # arbitrary d loss / d (logp, entropy)
    return hidden, weight, index, upstream


def test_hand_value():
    # logits [0, ln 3]: softmax [1/4, 3/4]; logp of token 1 = ln .75; H = -(.25 ln .25 + .75 ln .75) = .562335.
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    assert selective_log_softmax(logits, torch.tensor([[1]])).item() == pytest.approx(math.log(0.75))
    assert entropy_from_logits(logits).item() == pytest.approx(0.5623351, abs=1e-6)
    # temperature 2 halves the logits: [0, ln 3 / 2] -> p1 = sqrt3 / (1 + sqrt3) = .633975.
    got = selective_log_softmax(logits, torch.tensor([[1]]), temperature=2.0)
    assert got.item() == pytest.approx(math.log(math.sqrt(3) / (1 + math.sqrt(3))), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_selective_log_softmax_and_entropy_match_reference(chunk_size, temperature):
    hidden, weight, index, up = inputs()
    logits = (hidden @ weight.t()).requires_grad_()
    logp = selective_log_softmax(logits, index, temperature=temperature, chunk_size=chunk_size)
    entropy = entropy_from_logits(logits, temperature=temperature, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((up[0] * logp).sum() + (up[1] * entropy).sum(), logits)
    ref_logp, ref_entropy = reference(logits, index, temperature)
    (ref_grad,) = torch.autograd.grad((up[0] * ref_logp).sum() + (up[1] * ref_entropy).sum(), logits)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_reference_with_gradients(chunk_size, temperature):
    hidden, weight, index, up = inputs()
    hidden.requires_grad_(), weight.requires_grad_()
    logp, entropy = chunked_logprobs(hidden, weight, index, temperature=temperature, chunk_size=chunk_size,
                                     return_entropy=True)
    grads = torch.autograd.grad((up[0] * logp).sum() + (up[1] * entropy).sum(), (hidden, weight))
    ref_logp, ref_entropy = reference(hidden @ weight.t(), index, temperature)
    ref_grads = torch.autograd.grad((up[0] * ref_logp).sum() + (up[1] * ref_entropy).sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
    # logps only (the common call): same values, gradient of hidden only when weight is frozen.
    frozen = weight.detach()
    only = chunked_logprobs(hidden, frozen, index, temperature=temperature, chunk_size=chunk_size)
    (g_hidden,) = torch.autograd.grad((up[0] * only).sum(), hidden)
    (ref_g_hidden,) = torch.autograd.grad((up[0] * reference(hidden @ frozen.t(), index, temperature)[0]).sum(), hidden)
    torch.testing.assert_close(only, ref_logp)
    torch.testing.assert_close(g_hidden, ref_g_hidden)


def test_float64_gradcheck():
    hidden, weight, index, _ = inputs(B=2, T=3, V=5, H=3, dtype=torch.float64)
    hidden.requires_grad_(), weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: chunked_logprobs(h, w, index, temperature=0.9, chunk_size=2, return_entropy=True),
        (hidden, weight))
    logits = (hidden @ weight.t()).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: selective_log_softmax(z, index, temperature=1.3, chunk_size=4), (logits,))
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z, chunk_size=4), (logits,))


def test_bfloat16_logits_are_upcast_chunk_by_chunk():
    hidden, weight, index, up = inputs(V=50)
    logits = (hidden @ weight.t()).to(torch.bfloat16).requires_grad_()
    logp = selective_log_softmax(logits, index, chunk_size=4)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, reference(logits, index)[0])  # same bf16 numbers, fp32 maths
    (grad,) = torch.autograd.grad((up[0] * logp).sum(), logits)
    (ref_grad,) = torch.autograd.grad((up[0] * reference(logits, index)[0]).sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, ref_grad)


def saved_for_backward(fn):
    """Run fn() and return the tensors autograd saved for its backward (dtype, numel, data_ptr)."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_backward_never_keeps_a_full_vocabulary_tensor():
    B, T, V, H = 4, 16, 100, 8  # B*T*V = 6400 is larger than any input (B*T*H = 512, V*H = 800)
    hidden, weight, index, _ = inputs(B=B, T=T, V=V, H=H)
    hidden.requires_grad_(), weight.requires_grad_()
    _, saved = saved_for_backward(lambda: chunked_logprobs(hidden, weight, index, chunk_size=8, return_entropy=True))
    assert max(numel for _, numel, _ in saved) < B * T * V
    # The reference keeps [B*T, V] tensors (logits, log_softmax) for its backward.
    _, ref_saved = saved_for_backward(lambda: reference(hidden @ weight.t(), index))
    assert max(numel for _, numel, _ in ref_saved) >= B * T * V
    # selective_log_softmax keeps the caller's bf16 logits themselves, never an fp32 copy.
    logits = (hidden @ weight.t()).detach().to(torch.bfloat16).requires_grad_()
    _, saved = saved_for_backward(lambda: selective_log_softmax(logits, index, chunk_size=8))
    big = [(dtype, ptr) for dtype, numel, ptr in saved if numel >= B * T * V]
    assert big == [(torch.bfloat16, logits.data_ptr())]


def test_top_entropy_mask_by_hand():
    entropies = torch.tensor([[0.1, 0.5, 0.9, 9.0], [0.3, 0.7, 0.2, 0.4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # the 9.0 is padding and never counts
    # Active sorted: .1 .2 .3 .4 .5 .7 .9 (n = 7). quantile q keeps H >= Q_{1-q}, position (1-q)*6.
    keep = lambda q: top_entropy_mask(entropies, mask, q).int().tolist()
    assert keep(1.0) == [[1, 1, 1, 0], [1, 1, 1, 1]]  # Q_0 = .1: every active token
    assert keep(0.5) == [[0, 1, 1, 0], [0, 1, 0, 1]]  # position 3 -> Q = .4
    assert keep(0.25) == [[0, 0, 1, 0], [0, 1, 0, 0]]  # position 4.5 -> Q = (.5 + .7) / 2 = .6
    assert keep(0.0) == [[0, 0, 1, 0], [0, 0, 0, 0]]  # position 6 -> the maximum .9 only
    assert top_entropy_mask(entropies, torch.zeros(2, 4), 0.5).sum() == 0
    with pytest.raises(ValueError, match="quantile"):
        top_entropy_mask(entropies, mask, 1.5)


def test_top_entropy_mask_threshold_is_torch_quantile():
    g = torch.Generator().manual_seed(0)
    entropies, mask = torch.rand(6, 9, generator=g), torch.rand(6, 9, generator=g) > 0.3
    for q in (0.05, 0.2, 0.37, 0.8):
        threshold = torch.quantile(entropies[mask], 1 - q)
        torch.testing.assert_close(top_entropy_mask(entropies, mask, q), mask & (entropies >= threshold))


def test_shape_errors():
    hidden, weight, index, _ = inputs()
    with pytest.raises(ValueError, match="index"):
        selective_log_softmax(hidden @ weight.t(), index[:, :2])
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_logprobs(hidden, weight.t(), index)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_peak_memory_and_values():
    B, T, V, H = 4, 1024, 32768, 256  # full fp32 logits: 512 MiB; weight 16 MiB
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=g) / H ** 0.5).requires_grad_()
    index = torch.randint(0, V, (B, T), device="cuda", generator=g)

    def peak_of(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        sum(o.sum() for o in out).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, [o.detach() for o in out], hidden.grad, weight.grad

    run_chunked = lambda: chunked_logprobs(hidden, weight, index, chunk_size=128, return_entropy=True)  # noqa: E731
    peak_of(run_chunked)  # warm-up: cuBLAS workspaces are allocated on first use
    chunked = peak_of(run_chunked)
    naive = peak_of(lambda: reference(hidden @ weight.t(), index))
    full_fp32 = B * T * V * 4  # 512 MiB; a 128-row fp32 chunk is 16 MiB, the fp32 weight grad 32 MiB
    assert naive[0] > full_fp32  # the reference holds at least one full fp32 copy
    assert chunked[0] < full_fp32 / 2, f"peak {chunked[0] / 2**20:.0f} MiB vs {full_fp32 / 2**20:.0f} MiB fp32 logits"
    assert chunked[0] < naive[0] / 4
    for got, want in zip(chunked[1], naive[1]):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    for got, want in zip(chunked[2:], naive[2:]):  # bf16 gradients: compare as a relative norm
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
