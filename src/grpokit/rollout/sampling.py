"""Sampling: parameters, logits processing and counter-based random draws, in vectorised torch.

Processing order (the same as HF `generate`'s processors and warpers): the repetition penalty,
then temperature, top-k, top-p, min-p. Each step keeps HF's tie and edge semantics exactly:

- the repetition penalty ``p`` (HF's and vLLM's): every token already in the row (prompt or
  completion so far) gets ``logit / p`` where its logit is > 0, ``logit * p`` otherwise;
- top-k keeps every token whose logit is >= the k-th largest (ties at the boundary are kept);
- top-p sorts ascending, removes the tokens whose cumulative probability is <= 1 - top_p, and
  always keeps the most likely token;
- min-p removes tokens whose probability (after the steps above) is < min_p * max probability.

(vLLM applies min-p before top-k/top-p; on the same logits the kept sets can then differ.)
`temperature == 0` is greedy: the argmax of the raw logits, and the returned logprob is the
log_softmax of the raw logits (the distribution before any processing).

Randomness is counter-based: the uniform number that picks row r's token at step t is a hash of
(seed, r, t), where r is the row's global index (prompt_index * n + sample_index). The samples
therefore do not depend on how rows are batched, split into waves or dropped from the batch when
they finish, and a seed reproduces a rollout exactly. A token is drawn by inverting the CDF of
the processed distribution (float64 cumulative sum), which never returns a zero-probability token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """What to sample and when to stop; names and meaning as vLLM's `SamplingParams`."""

    max_tokens: int = 256
    """Most tokens generated per completion (finish_reason "length" when reached)."""
    temperature: float = 1.0
    """Logits are divided by it; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 or -1 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (0 = off)."""
    repetition_penalty: float = 1.0
    """Penalise tokens already in the prompt or the completion so far (> 1 discourages them; 1 = off)."""
    stop: list[str] | None = field(default=None)
    """Strings that end a completion; the text is cut right after the first one (kept in the text)."""
    seed: int | None = None
    """Seed of the counter-based sampler; None draws one from torch's default generator."""

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0 (or -1 for off), got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def processed_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, V] (float32) of the distribution sampled: the repetition penalty on the tokens
    `seen` ([B, V] bool, given when the penalty is on), temperature applied, and -inf on the tokens
    removed by top-k / top-p / min-p. For greedy these are the (penalised) raw logits."""
    x = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        x = torch.where(seen, torch.where(x > 0, x / p, x * p), x)
    if params.greedy:
        return x
    if params.temperature != 1.0:
        x = x / params.temperature
    neg_inf = float("-inf")
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, neg_inf)
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1.0 - params.top_p)
        remove[:, -1] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), neg_inf)
    if params.min_p > 0.0:
        probs = x.softmax(dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), neg_inf)
    return x


def processed_logprobs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities [B, V] of the distribution sampled from `logits` [B, V] (-inf where removed).

    For greedy this is log_softmax(logits): the distribution before any processing.
    """
    return torch.log_softmax(processed_logits(logits, params, seen), dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None = None,
           seen: torch.Tensor | None = None):
    """Draw one token per row of `logits` [B, V]: returns (token_ids [B] int64, logprobs [B] float32),
    the logprobs being those of the processed distribution (`processed_logprobs`) at the tokens.

    `uniforms` [B] (float64 in [0, 1)) picks the token by inverting the CDF; ignored if greedy.
    `seen` [B, V] bool: the tokens the repetition penalty applies to (None: no penalty).
    """
    x = processed_logits(logits, params, seen)
    top = x.amax(dim=-1, keepdim=True)
    if params.greedy:
        tokens = x.argmax(dim=-1)
        log_z = torch.logsumexp(x - top, dim=-1)
    else:
        assert uniforms is not None, "sampling (not greedy) draws with `uniforms`"
        cdf = torch.cumsum(torch.exp(x - top), dim=-1, dtype=torch.float64)
        z = cdf[:, -1]
        target = (uniforms.to(device=cdf.device, dtype=torch.float64) * z).unsqueeze(-1)
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=x.shape[-1] - 1)
        log_z = torch.log(z).float()
    chosen = x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - top.squeeze(-1)
    return tokens, chosen - log_z


def _mix32(x: np.ndarray) -> np.ndarray:
    """A 32-bit integer hash (lowbias32 by C. Wellons) on uint32 arrays (products wrap mod 2**32).

    In numpy on the host: the keys and uniforms of a rollout are a few thousand numbers, and ~60
    numpy ops cost ~0.1 ms where the same ops as torch tensors (int64, emulating the 32-bit
    wrap) cost ~1 ms on CPU, or as many kernel launches on a GPU."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """Two 32-bit keys [B, 2] (int64 tensor on the CPU) per global row index (int64 tensor [B]),
    from a 64-bit seed."""
    seed = int(seed) & ((1 << 64) - 1)
    lo, hi = np.uint32(seed & _M32), np.uint32(seed >> 32)
    r = rows.detach().cpu().numpy().astype(np.int64)
    r_lo, r_hi = (r & _M32).astype(np.uint32), ((r >> 32) & _M32).astype(np.uint32)
    k1 = _mix32(_mix32(_mix32(r_lo) ^ lo) ^ hi)
    k2 = _mix32(_mix32(_mix32(r_lo ^ np.uint32(0x9E3779B9)) ^ hi) ^ lo)
    k1 = _mix32(k1 ^ r_hi)
    return torch.from_numpy(np.stack([k1, k2], axis=-1).astype(np.int64))


def row_uniforms(keys: torch.Tensor, steps: int) -> torch.Tensor:
    """Uniform float64 numbers in [0, 1) with 53 random bits: [B, steps], row r's for step t at
    [r, t], on `keys`' device."""
    k = keys.detach().cpu().numpy().astype(np.uint32)
    with np.errstate(over="ignore"):
        t = np.arange(steps, dtype=np.uint32)
        s1 = _mix32(t * np.uint32(0x632BE5AB) + np.uint32(0x5BD1E995))
    s2 = _mix32(s1 ^ np.uint32(0x68E31DA4))
    h1 = _mix32(k[:, :1] ^ s1[None]).astype(np.uint64)
    h2 = _mix32(k[:, 1:] ^ s2[None]).astype(np.uint64)
    bits = (h1 >> np.uint64(6)) * np.uint64(1 << 27) + (h2 >> np.uint64(5))   # < 2**53: exact in float64
    return torch.from_numpy(bits.astype(np.float64) * (2.0**-53)).to(keys.device)
