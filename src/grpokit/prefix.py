"""Shared-prefix, padding-free layout of a micro-batch for the training forward.

The G completions of a group share one prompt. The plain forward (TRL's) runs ``[prompt |
completion]`` for each of the B rows, padded to the longest prompt and completion: the prompt is
computed G times and every row pays for the longest completion. Here each prompt is computed once
and the completions of its group attend to it:

    row r of the packed batch:  [ prompt_a | c_a1 | c_a2 | ... | prompt_b | c_b1 | ... | pad ]

with a 4-D attention mask where a token attends, among earlier tokens of its row, to its own
segment's prompt and to its own completion, and to nothing else; position ids restart at the
prompt length for every completion, so each completion sees exactly the positions and context it
has in the plain layout. The completion token ``c_j`` is predicted by the hidden state of the
token before it (the prompt's last token for ``j = 0``): those hidden states are gathered into
``[K, H]`` (K = completion tokens of the micro-batch, no padding) and go through the LM head in
chunks (``algos.chunked_logprobs``). Logprobs and gradients equal the plain layout's up to float
summation order (tests/unit/test_prefix.py), since every token's attention inputs are the same
keys and values and the gradients of the shared prompt are the sum of what the G copies got.

Cost of a segment with prompt P and completions C_1..C_G: P + sum C_i tokens through the
matmuls (plain: G * (P + max C)), and a dense ``T x T`` masked attention per row of T tokens
(the masked-out blocks are computed and thrown away; the budget ``max_segment_tokens`` bounds
that waste by splitting big groups into several segments, each with its own copy of the prompt).

Needs a decoder that takes a prepared 4-D mask (transformers' eager and sdpa attention), full
attention (no sliding window) and a plain linear LM head; ``supports_packed`` says whether a
model qualifies, and ``batch.completion_logprobs`` falls back to the padded layout when not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SEGMENT_TOKENS = 4096
"""Default cap on one segment (prompt + its completions); a bigger group is split in several."""


@dataclass
class PackedLayout:
    """Where every token of a micro-batch sits in the packed rows. R rows of T tokens, K
    completion tokens; (out_rows, out_cols) place the K logprobs in the [B, C] completion grid."""

    input_ids: torch.Tensor       # [R, T] long (padding: 0)
    position_ids: torch.Tensor    # [R, T] long
    segment_ids: torch.Tensor     # [R, T] long: segment of the token in its row, -1 on padding
    part_ids: torch.Tensor        # [R, T] long: 0 prompt, j >= 1 the j-th completion of the segment, -1 padding
    predict_index: torch.Tensor   # [K] long: flat index (r * T + t) of the hidden state predicting each token
    targets: torch.Tensor         # [K] long: the completion tokens
    out_rows: torch.Tensor        # [K] long: row in [B, C]
    out_cols: torch.Tensor        # [K] long: column in [B, C]
    num_prompt_tokens: int = 0    # prompt tokens computed (each shared prompt once per segment)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device) -> "PackedLayout":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return PackedLayout(**moved)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[R, 1, T, T] additive mask (0 = attend, dtype's min = masked), the form every
        transformers attention takes as a prepared 4-D mask: key k is visible from query q when
        k <= q, both are in the same segment, and k is in the prompt or in q's own completion.
        Padding attends only to padding (so no row of the softmax is empty)."""
        seg, part = self.segment_ids, self.part_ids
        t = seg.shape[1]
        pos = torch.arange(t, device=seg.device)
        causal = pos[None, :] <= pos[:, None]                                   # [T, T] (q, k)
        same_segment = seg[:, :, None] == seg[:, None, :]                      # [R, T, T]
        visible_part = (part[:, None, :] == 0) | (part[:, :, None] == part[:, None, :])
        allowed = causal[None] & same_segment & visible_part
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def find_segments(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive rows with the same prompt (a group, or the part of a
    group that falls in this micro-batch)."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(prompt_ids) + 1):
        if i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start]:
            runs.append((start, i))
            start = i
    return runs


def _split_run(start: int, end: int, prompt_len: int, lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Split rows start..end into consecutive pieces with prompt_len + sum(lengths) <= budget
    (at least one completion a piece)."""
    pieces, first, total = [], start, prompt_len
    for i in range(start, end):
        if i > first and total + lengths[i] > budget:
            pieces.append((first, i))
            first, total = i, prompt_len
        total += lengths[i]
    pieces.append((first, end))
    return pieces


def build_packed_layout(prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                        max_segment_tokens: int = MAX_SEGMENT_TOKENS, min_row_tokens: int = 0,
                        pad_id: int = 0) -> PackedLayout:
    """Pack B (prompt, completion) rows: one segment per run of equal prompts (split when longer
    than ``max_segment_tokens``), segments placed first-fit-decreasing into rows as long as the
    longest segment, or ``min_row_tokens`` when that is longer (short segments then share rows:
    fewer padding tokens for a little more masked attention). Empty completions contribute no
    token (and no logprob)."""
    lengths = [len(c) for c in completion_ids]
    segments: list[tuple[int, int]] = []
    for start, end in find_segments(prompt_ids):
        segments += _split_run(start, end, len(prompt_ids[start]), lengths, max_segment_tokens)
    seg_len = [len(prompt_ids[s]) + sum(lengths[s:e]) for s, e in segments]
    width = max(max(seg_len), min(min_row_tokens, sum(seg_len)))
    # first-fit decreasing: rows of `width` tokens
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(segments)), key=lambda k: -seg_len[k]):
        for r in range(len(rows)):
            if room[r] >= seg_len[k]:
                rows[r].append(k)
                room[r] -= seg_len[k]
                break
        else:
            rows.append([k])
            room.append(width - seg_len[k])
    width -= min(room)  # as wide as the fullest row

    n_rows = len(rows)
    ids = [[pad_id] * width for _ in range(n_rows)]
    pos = [[0] * width for _ in range(n_rows)]
    seg_ids = [[-1] * width for _ in range(n_rows)]
    part_ids = [[-1] * width for _ in range(n_rows)]
    predict, targets, out_rows, out_cols = [], [], [], []
    n_prompt = 0
    for r, row in enumerate(rows):
        t = 0
        for local, k in enumerate(row):
            s, e = segments[k]
            prompt = prompt_ids[s]
            p = len(prompt)
            n_prompt += p
            ids[r][t:t + p] = prompt
            pos[r][t:t + p] = range(p)
            seg_ids[r][t:t + p] = [local] * p
            part_ids[r][t:t + p] = [0] * p
            last_prompt = r * width + t + p - 1
            t += p
            for j, b in enumerate(range(s, e), start=1):
                comp = completion_ids[b]
                c = len(comp)
                if c == 0:
                    continue
                ids[r][t:t + c] = comp
                pos[r][t:t + c] = range(p, p + c)
                seg_ids[r][t:t + c] = [local] * c
                part_ids[r][t:t + c] = [j] * c
                base = r * width + t
                predict += [last_prompt] + list(range(base, base + c - 1))
                targets += comp
                out_rows += [b] * c
                out_cols += range(c)
                t += c
    long = dict(dtype=torch.long)
    return PackedLayout(
        input_ids=torch.tensor(ids, **long), position_ids=torch.tensor(pos, **long),
        segment_ids=torch.tensor(seg_ids, **long), part_ids=torch.tensor(part_ids, **long),
        predict_index=torch.tensor(predict, **long), targets=torch.tensor(targets, **long),
        out_rows=torch.tensor(out_rows, **long), out_cols=torch.tensor(out_cols, **long),
        num_prompt_tokens=n_prompt,
    )


def supports_packed(model) -> bool:
    """True when the model's decoder takes a prepared 4-D additive mask and attends over the
    full context: transformers' eager or sdpa attention, no sliding-window layers."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "get_decoder"):
        return False
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in types):
        return False
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return False
    return True


def packed_hidden(decoder, layout: PackedLayout, dtype: torch.dtype) -> torch.Tensor:
    """[K, H] final hidden states that predict the K completion tokens of ``layout``."""
    out = decoder(input_ids=layout.input_ids, attention_mask=layout.attention_mask(dtype),
                  position_ids=layout.position_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.predict_index)


def scatter_to_grid(values: torch.Tensor, layout: PackedLayout, shape: tuple[int, int]) -> torch.Tensor:
    """Place K per-token values in a zero [B, C] grid (differentiable)."""
    grid = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return grid.index_put((layout.out_rows, layout.out_cols), values)
