"""grpokit.rollout.sampling: processing equals HF's warpers, the sampler draws from it exactly."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from grpokit.rollout.base import finish_text
from grpokit.rollout.sampling import SamplingParams, processed_logprobs, row_keys, row_uniforms, sample


def hf_processed(logits, p: SamplingParams):
    """log_softmax of the scores after HF generate's warpers, in generate's order."""
    x = logits.clone()
    if p.temperature != 1.0:
        x = TemperatureLogitsWarper(p.temperature)(None, x)
    if p.top_k:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p:
        x = MinPLogitsWarper(p.min_p)(None, x)
    return torch.log_softmax(x, dim=-1)


def chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """Upper alpha quantile of chi-square(df), Wilson-Hilferty approximation (good for df >= 3)."""
    z = {1e-3: 3.0902, 1e-2: 2.3263}[alpha]
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2_stat(counts, probs, min_expected=5.0):
    """Chi-square statistic and degrees of freedom; cells with expected < 5 are pooled."""
    n = counts.sum()
    expected = probs * n
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.6, top_k=20, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.01),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_processed_logprobs_equal_hf_warpers(params):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logits[0, :10] = 2.0  # ties at the top-k / top-p boundaries
    ours = processed_logprobs(logits, params)
    ref = hf_processed(logits, params)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(ours[finite], ref[finite], atol=1e-5, rtol=0)


def test_greedy_logprobs_are_raw_log_softmax():
    logits = torch.randn(3, 20)
    greedy = SamplingParams(temperature=0.0, top_k=2, top_p=0.5)
    lp = processed_logprobs(logits, greedy)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1))
    tokens, token_lp = sample(logits, greedy)
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(token_lp, lp.gather(-1, tokens[:, None]).squeeze(-1))


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}")
def test_sampled_logprobs_are_the_processed_ones_at_the_sampled_tokens(params):
    torch.manual_seed(1)
    logits = torch.randn(64, 50) * 2
    tokens, token_lp = sample(logits, params, row_uniforms(row_keys(5, torch.arange(64)), 1)[:, 0])
    want = processed_logprobs(logits, params).gather(-1, tokens[:, None]).squeeze(-1)
    assert torch.isfinite(want).all()
    torch.testing.assert_close(token_lp, want, atol=1e-5, rtol=0)


def test_sampler_never_picks_removed_tokens_even_at_extreme_uniforms():
    logits = torch.full((4, 8), float("-inf"))
    logits[:, [2, 5]] = 3.0
    u = torch.tensor([0.0, 1e-18, 0.5, 1.0 - 2.0**-53], dtype=torch.float64)
    tokens, lp = sample(logits, SamplingParams(), u)
    assert tokens.tolist() == [2, 2, 5, 5]
    torch.testing.assert_close(lp, torch.full((4,), math.log(0.5)))


def test_inverse_cdf_sampler_matches_distribution_chi_square():
    """20,000 draws from a fixed 30-token distribution: chi-square test at significance 0.001."""
    probs = torch.softmax(torch.linspace(-3, 2, 30), 0)
    logits = torch.log(probs).expand(20_000, -1)
    tokens, _ = sample(logits, SamplingParams(), row_uniforms(row_keys(123, torch.arange(20_000)), 1)[:, 0])
    stat, df = chi2_stat(torch.bincount(tokens, minlength=30).double(), probs.double())
    assert stat < chi2_critical(df), (stat, df)


def test_uniforms_are_uniform_and_rows_steps_seeds_independent():
    keys = row_keys(7, torch.arange(2000))
    u = row_uniforms(keys, 50)  # [2000, 50]
    assert u.dtype == torch.float64 and 0.0 <= u.min() and u.max() < 1.0
    # 100,000 values in 20 bins: chi-square at 0.001
    counts = torch.histc(u.float(), bins=20, min=0, max=1).double()
    stat, df = chi2_stat(counts, torch.full((20,), 0.05, dtype=torch.float64))
    assert stat < chi2_critical(df)
    # correlations between rows, between steps, and between seeds are ~0 (|r| < 4 / sqrt(n))
    flat = u.flatten()
    for a, b in [(u[:-1].flatten(), u[1:].flatten()), (u[:, :-1].flatten(), u[:, 1:].flatten()),
                 (flat, row_uniforms(row_keys(8, torch.arange(2000)), 50).flatten())]:
        r = torch.corrcoef(torch.stack([a, b]))[0, 1].abs().item()
        assert r < 4 / math.sqrt(a.numel()), r
    assert len(set(map(tuple, keys.tolist()))) == 2000  # 64-bit keys: no two rows share a stream


# The torch (int64) formulation the hashing had before it moved to numpy uint32: the reference
# that keeps every seed's samples unchanged.
_M32 = 0xFFFFFFFF


def _torch_mul32(x, c):
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _torch_mix32(x):
    x = x ^ (x >> 16)
    x = _torch_mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _torch_mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _torch_row_keys(seed, rows):
    seed = int(seed) & ((1 << 64) - 1)
    lo, hi = seed & _M32, seed >> 32
    k1 = _torch_mix32(_torch_mix32(_torch_mix32(rows & _M32) ^ lo) ^ hi)
    k2 = _torch_mix32(_torch_mix32(_torch_mix32((rows & _M32) ^ 0x9E3779B9) ^ hi) ^ lo)
    k1 = _torch_mix32(k1 ^ ((rows >> 32) & _M32))
    return torch.stack([k1, k2], dim=-1)


def _torch_row_uniforms(keys, steps):
    t = torch.arange(steps, dtype=torch.long)
    s1 = _torch_mix32((t * 0x632BE5AB + 0x5BD1E995) & _M32)
    s2 = _torch_mix32(s1 ^ 0x68E31DA4)
    h1 = _torch_mix32(keys[:, :1] ^ s1)
    h2 = _torch_mix32(keys[:, 1:] ^ s2)
    return ((h1 >> 6) * (1 << 27) + (h2 >> 5)).double() * (2.0**-53)


@pytest.mark.parametrize("seed", [0, 42, 2**32 + 7, 2**64 - 1, 123456789012345])
def test_numpy_hashing_equals_the_torch_int64_formulation(seed):
    rows = torch.cat([torch.arange(300), torch.tensor([2**31, 2**32 - 1, 2**32, 2**40 + 5, 2**62])])
    keys = row_keys(seed, rows)
    assert keys.dtype == torch.int64 and torch.equal(keys, _torch_row_keys(seed, rows))
    assert torch.equal(row_uniforms(keys, 37), _torch_row_uniforms(keys, 37))


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams(min_p=1.5)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="</a>").stop == ["</a>"]


def test_finish_text_cuts_after_the_stop_string_that_ends_first():
    assert finish_text("abc</a>def</b>", ["</b>", "</a>"]) == ("abc</a>", True)
    assert finish_text("xab", ["ab", "b"]) == ("xab", True)
    assert finish_text("no stop", ["</a>"]) == ("no stop", False)
