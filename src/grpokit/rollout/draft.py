"""Draft tokens for the decode loop: guesses of what a row writes next, checked in one forward.

HFEngine's decode step can feed each row its last token plus up to k guessed tokens; one forward
gives the distribution after each of them, and the row keeps its guesses while each equals the
token the sampler draws there, plus the sampler's token at the first difference (or after the last
guess). Because a token is drawn by inverting the CDF with a uniform fixed by (seed, row, token
index) (see sampling.py), the token drawn at each position is the one plain decoding draws: the
samples and their log-probs are plain decoding's, to floating-point summation order (a forward of
another shape can tip a token that lies on a CDF boundary); a guess only decides how many tokens
one forward yields. A wrong guess costs a column of compute, not a different sample.

`NgramDrafter` guesses by n-gram lookup (prompt lookup decoding, and REST's retrieval from a pool
of earlier text): the continuation of the row's last n tokens (n = n_max .. 1) where they occurred
before, first in the row's own context (its prompt, earlier turns, tool results), then in the
completions so far of the wave's other rows, then in those of the engine's previous wave (at most
`POOL_TOKENS` tokens of them). GRPO samples G completions of each prompt and the same
task step after step, so a template (a tool call's JSON, a format) repeats across rows and steps,
and copied spans (a tool's arguments, its result) repeat within a row.
"""

from __future__ import annotations

from typing import Protocol

import torch

POOL_TOKENS = 1 << 16
"""Most tokens of the previous wave's completions a `NgramDrafter` keeps (and a checkpoint holds)."""


class Drafter(Protocol):
    """What the decode loop asks of a source of draft tokens. Rows are numbered within a wave."""

    max_tokens: int
    """Most draft tokens proposed per row and step."""

    def start(self, contexts: list[list[int]]) -> None:
        """A wave begins; row r's context so far (its prompt) is contexts[r]."""

    def extend(self, row: int, tokens: list[int]) -> None:
        """Tokens appended to a row's context: sampled ones, or a tool result prefilled."""

    def propose(self, row: int, limit: int) -> list[int]:
        """At most min(limit, max_tokens) tokens that may follow the row's context (possibly none)."""

    def finish(self) -> None:
        """The wave is over."""

    def state_dict(self) -> dict:
        """What it keeps from wave to wave (plain lists and numbers), for checkpoints."""

    def load_state_dict(self, state: dict) -> None:
        """Back to a saved `state_dict()`."""


class NgramDrafter:
    """Draft tokens by n-gram lookup, for each n from `n_max` down to `n_min`: the most recent
    earlier occurrence in the row's own context, else in the completions so far of the wave's rows
    (G samples of one prompt often open alike, and drafts let some run ahead), else in the previous
    wave's completions."""

    def __init__(self, max_tokens: int = 8, n_max: int = 3, n_min: int = 1):
        if max_tokens < 1 or not 1 <= n_min <= n_max:
            raise ValueError(f"NgramDrafter needs max_tokens >= 1 and 1 <= n_min <= n_max, got "
                             f"{max_tokens}, {n_min}, {n_max}")
        self.max_tokens, self.n_max, self.n_min = max_tokens, n_max, n_min
        self._ctx: list[list[int]] = []
        self._prompt_len: list[int] = []
        self._indexed: list[int] = []
        self._own: list[dict[tuple[int, ...], int]] = []
        self._wave: dict[tuple[int, ...], tuple[list[int], int]] = {}
        self._pool: dict[tuple[int, ...], tuple[list[int], int]] = {}
        self._pool_sequences: list[list[int]] = []

    def start(self, contexts: list[list[int]]) -> None:
        self._ctx = [list(c) for c in contexts]
        self._prompt_len = [len(c) for c in contexts]
        self._indexed = [0] * len(contexts)
        self._own = [{} for _ in contexts]
        self._wave = {}

    def extend(self, row: int, tokens: list[int]) -> None:
        self._ctx[row].extend(tokens)

    def _index(self, row: int) -> None:
        """Index the n-grams of the row's context that end before its last token: each n-gram maps
        to where its most recent continuation starts (the row's own suffix is never its own match)."""
        ctx, own, wave, prompt = self._ctx[row], self._own[row], self._wave, self._prompt_len[row]
        for end in range(max(self._indexed[row], 1), len(ctx)):  # n-grams ctx[end-n:end], continued at end
            for n in range(self.n_min, min(self.n_max, end) + 1):
                key = tuple(ctx[end - n:end])
                own[key] = end
                if end >= prompt:  # continued by a completion token: shared with the wave's rows
                    wave[key] = (ctx, end)
        self._indexed[row] = max(self._indexed[row], len(ctx))

    def propose(self, row: int, limit: int) -> list[int]:
        k = min(limit, self.max_tokens)
        if k <= 0:
            return []
        self._index(row)
        ctx, own = self._ctx[row], self._own[row]
        for n in range(min(self.n_max, len(ctx)), self.n_min - 1, -1):
            key = tuple(ctx[-n:])
            at = own.get(key)
            if at is not None:
                return ctx[at:at + k]
            hit = self._wave.get(key) or self._pool.get(key)
            if hit is not None:
                seq, at = hit
                return seq[at:at + k]
        return []

    def finish(self) -> None:
        """The pool becomes this wave's completions (each row's tokens after its prompt, with the
        prompt's last n_max - 1 tokens as their lead-in; rows in order until POOL_TOKENS); the
        first occurrence of an n-gram wins."""
        sequences, total = [], 0
        for ctx, start in zip(self._ctx, self._prompt_len):
            if total >= POOL_TOKENS:
                break
            sequences.append(ctx[max(0, start - self.n_max + 1):])
            total += len(sequences[-1])
        self._set_pool(sequences)
        self._ctx, self._own = [], []

    def _set_pool(self, sequences: list[list[int]]) -> None:
        pool: dict[tuple[int, ...], tuple[list[int], int]] = {}
        for seq in sequences:
            for end in range(1, len(seq)):
                for n in range(self.n_min, min(self.n_max, end) + 1):
                    pool.setdefault(tuple(seq[end - n:end]), (seq, end))
        self._pool, self._pool_sequences = pool, sequences

    def state_dict(self) -> dict:
        """The pool's sequences (the last wave's completions)."""
        return {"pool": [list(s) for s in self._pool_sequences]}

    def load_state_dict(self, state: dict) -> None:
        self._set_pool([[int(t) for t in s] for s in state.get("pool", [])])


def accepted_drafts(sampled: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """How many of each row's draft tokens are kept: [b] int64.

    `sampled` [b, w]: the token drawn at each of the w positions of a step that fed the row's last
    token and its drafts (position j follows draft j); `drafts` [b, w - 1]: the drafts, padded
    anywhere past `lengths` [b] (the drafts each row has). Draft j + 1 is kept while every draft up
    to it equals the token drawn before it: e.g. drafts [7, 8, 9] (length 3), sampled [7, 8, 5, 1]
    keeps 2 (7 and 8; the step yields 7, 8 and the sampled 5); length 1 with sampled [7, ...] keeps 1.
    """
    w = sampled.shape[1]
    if w == 1:
        return torch.zeros(sampled.shape[0], dtype=torch.long, device=sampled.device)
    cols = torch.arange(w - 1, device=sampled.device)
    match = (sampled[:, :-1] == drafts) & (cols[None, :] < lengths[:, None])
    return match.long().cumprod(dim=1).sum(dim=1)


def draft_width(lengths: torch.Tensor, accept: torch.Tensor, column_cost: float) -> int:
    """Width of the next step (1 + draft columns), from each active row's draft length `lengths`
    [b] and its estimated chance `accept` [b] that a draft token is kept (given the ones before it
    were): the width w maximising the expected tokens kept per row, mean over rows of
    sum_{j<=min(d, w-1)} q^j, minus `column_cost` (a column's cost, in decode steps) times w - 1; 1
    when no width gains. E.g. two rows with 3 drafts each at q = 0.8 and cost 0.4: w = 2 gains
    0.8 - 0.4 = 0.4, w = 3 gains 0.8 + 0.64 - 0.8 = 0.64, w = 4 gains 0.8 + 0.64 + 0.512 - 1.2
    = 0.752: width 4; at q = 0.3 every width loses (0.3 - 0.4 < 0): width 1."""
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest == 0:
        return 1
    cols = torch.arange(1, longest + 1, dtype=torch.float64)
    q = accept.to(torch.float64)[:, None]
    kept = (q ** cols[None, :]) * (cols[None, :] <= lengths[:, None])          # [b, c]: P(draft j kept)
    gain = kept.cumsum(dim=1).mean(dim=0) - column_cost * cols                   # [c]: width c + 1
    best = int(gain.argmax())
    return best + 2 if float(gain[best]) > 0 else 1
