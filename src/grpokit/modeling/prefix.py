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

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import torch

MAX_SEGMENT_TOKENS = 4096
"""Default cap on one segment (prompt + its completions); a bigger group is split in several."""


@dataclass
class AttentionPlan:
    """How `prefix_attention` computes the packed rows' attention without the dense T x T waste:
    the S prompts as one causal batch [S, Pmax], the N completions as one batch [N, Cmax] whose
    keys are their prompt's and their own [N, Pmax + Cmax] (mask [N, 1, Cmax, Pmax + Cmax])."""

    prompt_index: torch.Tensor    # [S, Pmax] flat token index (padding repeats the last real one)
    prompt_valid: torch.Tensor    # [S, Pmax] bool
    comp_q_index: torch.Tensor    # [N, Cmax]
    comp_q_valid: torch.Tensor    # [N, Cmax] bool
    comp_k_index: torch.Tensor    # [N, Pmax + Cmax]
    comp_mask: torch.Tensor       # [N, 1, Cmax, Pmax + Cmax] bool, True = attend

    def to(self, device) -> "AttentionPlan":
        return AttentionPlan(**{k: v.to(device) for k, v in self.__dict__.items()})


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
    plan: AttentionPlan | None = None
    segments: tuple = ()          # per segment, in flat order: (flat start, prompt length, length, first batch row)

    @property
    def shape(self) -> tuple[int, int]:
        return self.input_ids.shape[0], self.input_ids.shape[1]

    def to(self, device) -> "PackedLayout":
        moved: dict[str, Any] = {k: (v.to(device) if isinstance(v, (torch.Tensor, AttentionPlan)) else v)
                 for k, v in self.__dict__.items()}
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


def find_segments(prompt_ids: list[list[int]], keys: list | None = None) -> list[tuple[int, int]]:
    """(start, end) runs of consecutive rows with the same prompt (a group, or the part of a
    group that falls in this micro-batch); with `keys`, rows whose keys differ (their images)
    never share a run, whatever their token ids."""
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(prompt_ids) + 1):
        if (i == len(prompt_ids) or prompt_ids[i] != prompt_ids[start]
                or (keys is not None and keys[i] != keys[start])):
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
                        pad_id: int = 0, keys: list | None = None) -> PackedLayout:
    """Pack B (prompt, completion) rows: one segment per run of equal prompts (split when longer
    than ``max_segment_tokens``), segments placed first-fit-decreasing into rows as long as the
    longest segment, or ``min_row_tokens`` when that is longer (short segments then share rows:
    fewer padding tokens for a little more masked attention). Empty completions contribute no
    token (and no logprob). `keys` (one per row, e.g. its images): see `find_segments`."""
    lengths = [len(c) for c in completion_ids]
    segments: list[tuple[int, int]] = []
    for start, end in find_segments(prompt_ids, keys):
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
    predict: list[int] = []
    targets: list[int] = []
    out_rows: list[int] = []
    out_cols: list[int] = []
    seg_spans: list[tuple[int, int]] = []         # (flat start, prompt length) per segment
    placed: list[tuple[int, int, int, int]] = []  # (flat start, prompt length, length, first row) per segment
    comp_spans: list[tuple[int, int, int]] = []   # (segment, flat start, length) per completion
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
            seg_spans.append((r * width + t, p))
            placed.append((r * width + t, p, seg_len[k], s))
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
                comp_spans.append((len(seg_spans) - 1, base, c))
                predict += [last_prompt] + list(range(base, base + c - 1))
                targets += comp
                out_rows += [b] * c
                out_cols += range(c)
                t += c
    long: dict[str, Any] = {"dtype": torch.long}
    return PackedLayout(
        input_ids=torch.tensor(ids, **long), position_ids=torch.tensor(pos, **long),
        segment_ids=torch.tensor(seg_ids, **long), part_ids=torch.tensor(part_ids, **long),
        predict_index=torch.tensor(predict, **long), targets=torch.tensor(targets, **long),
        out_rows=torch.tensor(out_rows, **long), out_cols=torch.tensor(out_cols, **long),
        num_prompt_tokens=n_prompt, plan=_attention_plan(seg_spans, comp_spans), segments=tuple(placed),
    )


def _attention_plan(seg_spans: list[tuple[int, int]], comp_spans: list[tuple[int, int, int]]) -> "AttentionPlan":
    """Gather indices (into the R*T flattened tokens) for `prefix_attention`: prompts right-padded
    to Pmax, completions right-padded to Cmax, each completion's keys = its prompt | itself."""
    p_max = max(p for _, p in seg_spans)
    c_max = max([c for _, _, c in comp_spans], default=1)
    prompt_index = [[a + min(i, p - 1) for i in range(p_max)] for a, p in seg_spans]
    prompt_valid = [[i < p for i in range(p_max)] for _, p in seg_spans]
    q_index, k_index, q_valid, k_len, p_len = [], [], [], [], []
    for k, a, c in comp_spans:
        q_index.append([a + min(i, c - 1) for i in range(c_max)])
        q_valid.append([i < c for i in range(c_max)])
        k_index.append(prompt_index[k] + q_index[-1])
        k_len.append(c)
        p_len.append(seg_spans[k][1])
    # key j of completion n is visible from its query i when j is a real prompt token, or
    # j = p_max + m is its own token m <= i (padded queries i >= c see the same as i = c - 1)
    i = torch.arange(c_max)[:, None]
    j = torch.arange(p_max + c_max)[None, :]
    p_len_t = torch.tensor(p_len, dtype=torch.long)[:, None, None]
    own = j - p_max
    mask = (j < p_len_t) | ((own >= 0) & (own <= i))
    long: dict[str, Any] = {"dtype": torch.long}
    return AttentionPlan(
        prompt_index=torch.tensor(prompt_index, **long), prompt_valid=torch.tensor(prompt_valid, dtype=torch.bool),
        comp_q_index=torch.tensor(q_index, **long).reshape(-1, c_max),
        comp_q_valid=torch.tensor(q_valid, dtype=torch.bool).reshape(-1, c_max),
        comp_k_index=torch.tensor(k_index, **long).reshape(-1, p_max + c_max),
        comp_mask=mask[:, None] if comp_spans else torch.zeros(0, 1, c_max, p_max + c_max, dtype=torch.bool),
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


def packed_hidden(decoder, layout: PackedLayout, dtype: torch.dtype, *,
                  dense_row_tokens: int | None = None, router_logits: bool = False, extra: dict | None = None):
    """[K, H] final hidden states that predict the K completion tokens of ``layout``: through
    `prefix_attention` when it applies (see `uses_prefix_attention`), else the dense 4-D mask.
    `router_logits=True` (MoE): `(hidden, per-layer router logits of the real tokens)`. `extra`:
    the decoder's inputs besides the mask (input_ids, position_ids, a multimodal model's image
    features); default the layout's ids and positions."""
    kw = dict(extra) if extra is not None else {"input_ids": layout.input_ids, "position_ids": layout.position_ids}
    if router_logits:
        kw["output_router_logits"] = True
    if layout.plan is not None and uses_prefix_attention(decoder, layout, dense_row_tokens=dense_row_tokens):
        with _prefix_attention_on(decoder.config, layout.plan):
            out = decoder(use_cache=False, **kw)
    else:
        out = decoder(attention_mask=layout.attention_mask(dtype), use_cache=False, **kw)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, layout.predict_index)
    if not router_logits:
        return hidden
    real = (layout.segment_ids >= 0).reshape(-1)
    return hidden, tuple(layer[real] for layer in out.router_logits)


# --------------------------------------------------------------------------------------------
# attention without the dense T x T waste
# --------------------------------------------------------------------------------------------

ATTENTION_NAME = "grpokit_prefix"
DENSE_ROW_TOKENS = 256
"""Rows up to this many tokens take the dense masked attention (for short rows the gathers of
`prefix_attention` cost more than the masked-out blocks they save)."""
PREFIX_ATTENTION_MODELS = ("llama", "qwen2", "qwen3", "mistral", "gpt2")
"""Model types whose attention modules call transformers' attention interface with plain
[B, H, T, D] queries/keys/values and nothing else (no sinks, softcap or sliding window)."""
_ACTIVE_PLAN: contextvars.ContextVar = contextvars.ContextVar("grpokit_prefix_plan", default=None)
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2] if x.isdigit()) >= (2, 5)


def prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The packed rows' attention as two batched sdpa calls (transformers attention interface:
    query [R, H, T, D], key/value [R, Hkv, T, D] -> ([R, T, H, D], None)): the prompts causal,
    then each completion over its prompt's keys and its own. Equal to the dense masked
    attention on every real token (padding tokens get 0)."""
    plan = _ACTIVE_PLAN.get()
    if plan is None:
        raise RuntimeError("prefix_attention only runs inside grpokit's packed forward")
    r, h, t, d = query.shape
    hkv = key.shape[1]
    q = query.transpose(1, 2).reshape(r * t, h, d)
    k = key.transpose(1, 2).reshape(r * t, hkv, d)
    v = value.transpose(1, 2).reshape(r * t, hkv, d)
    if hkv != h and not _HAS_GQA:
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
    extra = {"enable_gqa": True} if k.shape[1] != h else {}
    drop = dropout if module.training else 0.0

    def gathered(x, index):  # [n, L] -> [n, heads, L, d]
        return x[index].transpose(1, 2)

    def sdpa(index_q, index_k, **kw):
        return torch.nn.functional.scaled_dot_product_attention(
            gathered(q, index_q), gathered(k, index_k), gathered(v, index_k), dropout_p=drop, scale=scaling,
            **extra, **kw).transpose(1, 2)

    out = query.new_zeros(r * t, h, d)
    prompts = sdpa(plan.prompt_index, plan.prompt_index, is_causal=True)
    out = out.index_put((plan.prompt_index[plan.prompt_valid],), prompts[plan.prompt_valid])
    if plan.comp_q_index.numel():
        comps = sdpa(plan.comp_q_index, plan.comp_k_index, attn_mask=plan.comp_mask)
        out = out.index_put((plan.comp_q_index[plan.comp_q_valid],), comps[plan.comp_q_valid])
    return out.view(r, t, h, d), None


def uses_prefix_attention(decoder, layout: PackedLayout, *, dense_row_tokens: int | None = None) -> bool:
    """`prefix_attention` for rows longer than `dense_row_tokens` (default DENSE_ROW_TOKENS) of
    the model types it knows, except when the layers will be recomputed in backward (activation
    checkpointing: the recomputation runs outside this module's switch, so the forward keeps the
    plain sdpa path)."""
    cfg = getattr(decoder, "config", None)
    dense = DENSE_ROW_TOKENS if dense_row_tokens is None else dense_row_tokens
    if (layout.plan is None or layout.input_ids.shape[1] <= dense or cfg is None
            or getattr(cfg, "model_type", None) not in PREFIX_ATTENTION_MODELS or not _REGISTERED):
        return False
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
        return False
    if torch.is_grad_enabled() and decoder.training and any(
            getattr(m, "gradient_checkpointing", False) for m in decoder.modules()):
        return False
    return True


@contextlib.contextmanager
def _prefix_attention_on(config, plan: AttentionPlan):
    old = config._attn_implementation
    token = _ACTIVE_PLAN.set(plan)
    config._attn_implementation = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation = old
        _ACTIVE_PLAN.reset(token)


try:  # transformers >= 4.48: attention functions are looked up by name at every call
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    _REGISTERED = True
except ImportError:  # pragma: no cover
    _REGISTERED = False


def scatter_to_grid(values: torch.Tensor, layout: PackedLayout, shape: tuple[int, int]) -> torch.Tensor:
    """Place K per-token values in a zero [B, C] grid (differentiable)."""
    grid = torch.zeros(shape, dtype=values.dtype, device=values.device)
    return grid.index_put((layout.out_rows, layout.out_cols), values)
