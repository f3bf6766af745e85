"""Typed data between the steps of the loop, and the training forward that turns it into logprobs.

Shapes: N = prompts * G samples per step (groups contiguous: rows g*G .. g*G+G-1 share a prompt),
B = rows of one micro-batch, P = longest prompt of the micro-batch, C = longest completion.
A field never changes meaning on the way: `rewards` stay rewards, `advantages` are separate.

The training forward (`completion_logprobs`) computes each prompt of a micro-batch once for all
its completions and packs the sequences without padding (grpokit.prefix); models whose attention
cannot take that layout get the padded one (left-padded prompt | right-padded completion).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpokit.algos import chunked_logprobs, entropy_from_logits, selective_log_softmax
from grpokit.prefix import (MAX_SEGMENT_TOKENS, PackedLayout, build_packed_layout, find_segments, packed_hidden,
                            scatter_to_grid, supports_packed)


@dataclass
class Rollout:
    """What one step sampled and how it was scored. Lists/tensors have N entries."""

    row_index: list[int]                 # dataset row of each sample's prompt
    prompts: list                        # prompt as the rewards see it (str or messages)
    completions: list                    # completion as the rewards see it (str or messages)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    sampling_logps: list[list[float]]    # the sampler's logprob of each completion token
    truncated: torch.Tensor              # [N] bool: stopped by max_completion_length
    rewards_per_func: torch.Tensor       # [N, F] float32, NaN = function returned None
    rewards: torch.Tensor                # [N] weighted sum over functions (NaN: no function applied)
    advantages: torch.Tensor             # [N] group-relative advantage
    reward_names: list[str] = field(default_factory=list)


@dataclass
class MicroBatch:
    """B samples: token lists, and [B, C] completion tensors right-padded to the longest completion.

    The model inputs are built on first use: `layout()` (packed, shared prefix) or the padded
    `input_ids` / `attention_mask` / `position_ids` [B, P + C] (prompts left-padded to P)."""

    prompt_token_ids: list[list[int]]
    completion_token_ids: list[list[int]]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] float: 1 = token in the loss
    advantages: torch.Tensor        # [B]
    sampling_logps: torch.Tensor    # [B, C] (0 where masked)
    rows: slice                     # which rows of the Rollout these are
    pad_id: int = 0
    skip_rows: list[bool] | None = None     # rows left out of the forward (their logprobs come out 0)
    keep_row: int | None = None     # a row computed even if skipped or wholly masked (see make_micro_batches)
    old_logps: torch.Tensor | None = None   # [B, C] when num_iterations > 1
    ref_logps: torch.Tensor | None = None   # [B, C] when beta > 0
    _padded: tuple | None = field(default=None, repr=False)
    _layout: PackedLayout | None = field(default=None, repr=False)
    _layout_key: tuple = field(default=(), repr=False)

    @property
    def device(self) -> torch.device:
        return self.completion_ids.device

    def layout(self, max_segment_tokens: int = MAX_SEGMENT_TOKENS, min_row_tokens: int = 0) -> PackedLayout:
        """The packed shared-prefix layout (grpokit.prefix), built once. Completions that are
        wholly out of the loss (mask 0, e.g. mask_truncated_completions) or in `skip_rows` are
        left out: their logprobs stay 0 and nothing is computed for them."""
        if self._layout is None or self._layout_key != (max_segment_tokens, min_row_tokens):
            comps = self.completion_token_ids
            if self.completion_mask.numel():
                in_loss = self.completion_mask.detach().amax(dim=1).cpu().tolist()
                comps = [c if keep > 0 else [] for c, keep in zip(comps, in_loss)]
            if self.skip_rows is not None:
                comps = [[] if skip else c for c, skip in zip(comps, self.skip_rows)]
            if self.keep_row is not None:
                comps[self.keep_row] = self.completion_token_ids[self.keep_row]
            self._layout = build_packed_layout(self.prompt_token_ids, comps, max_segment_tokens=max_segment_tokens,
                                               min_row_tokens=min_row_tokens, pad_id=self.pad_id).to(self.device)
            self._layout_key = (max_segment_tokens, min_row_tokens)
        return self._layout

    def _padded_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._padded is None:
            p_ids, c_ids = self.prompt_token_ids, self.completion_token_ids
            b, p, c = len(p_ids), max(map(len, p_ids)), self.completion_ids.shape[1]
            input_ids = torch.full((b, p + c), self.pad_id, dtype=torch.long)
            attention = torch.zeros((b, p + c), dtype=torch.long)
            for i, (pi, ci) in enumerate(zip(p_ids, c_ids)):
                input_ids[i, p - len(pi):p] = torch.tensor(pi, dtype=torch.long)
                input_ids[i, p:p + len(ci)] = torch.tensor(ci, dtype=torch.long)
                attention[i, p - len(pi):p + len(ci)] = 1
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            self._padded = tuple(t.to(self.device) for t in (input_ids, attention, position_ids))
        return self._padded

    @property
    def input_ids(self) -> torch.Tensor:         # [B, P + C]
        return self._padded_inputs()[0]

    @property
    def attention_mask(self) -> torch.Tensor:    # [B, P + C]
        return self._padded_inputs()[1]

    @property
    def position_ids(self) -> torch.Tensor:      # [B, P + C]
        return self._padded_inputs()[2]

    @property
    def prompt_width(self) -> int:
        return max(map(len, self.prompt_token_ids))


def make_micro_batches(rollout: Rollout, size: int, *, pad_id: int, device, mask_truncated: bool,
                       merge: bool = False, skip_zero_advantage: bool = False,
                       never_empty: bool = False) -> list[MicroBatch]:
    """Split the N samples into micro-batches of `size` consecutive rows (groups stay whole when
    size is a multiple of G; a group cut by a micro-batch boundary still shares its prompt within
    each part). Completion tensors are padded to each micro-batch's own longest completion.

    `merge=True` (for the packed forward and a loss that is a plain sum over micro-batches, i.e.
    with global normalisers: dapo, dr_grpo, cispo) joins consecutive micro-batches while their
    packed tokens (each group's prompt once + completions) stay within the padded tokens of one
    micro-batch (rows x (longest prompt + longest completion): what the plain forward of one
    micro-batch holds), so fewer, larger forwards run in no more activation memory.

    `skip_zero_advantage=True` (for beta = 0 and no entropy mask) leaves the completions whose
    advantage is exactly 0 (e.g. every completion of a group whose rewards are all equal) out of
    the packed forward: every policy loss is A times something finite, so they add 0 to the loss
    and its gradient. They stay in the [B, C] tensors and in the masks, so the loss normalisers
    do not change; their logprobs (and sampling logprobs, the old ones when reused) are 0, so
    their importance ratio is 1.

    `never_empty=True` (several ranks): a micro-batch whose rows would all be left out of the
    forward (skipped, or wholly masked) keeps its shortest row in it (`MicroBatch.keep_row`). That
    row adds exactly 0 to the loss (advantage 0, or mask 0), but the forward runs the whole model,
    so every parameter gets a (zero) gradient and this rank takes part in the same gradient
    reduction (DDP) and parameter gathers (FSDP2) as a rank that has something to train."""
    n = len(rollout.completion_ids)
    for i, pi in enumerate(rollout.prompt_ids):
        if not pi:
            raise ValueError(f"row {i} has an empty prompt; every prompt needs at least one token.")
    spans = [(start, min(start + size, n)) for start in range(0, n, size)]
    skip = (rollout.advantages == 0).tolist() if skip_zero_advantage else [False] * n
    if merge:
        spans = _merge_spans(rollout, spans, skip)
    out = []
    for start, end in spans:
        rows = slice(start, end)
        p_ids, c_ids = rollout.prompt_ids[rows], rollout.completion_ids[rows]
        lengths = torch.tensor([len(c) for c in c_ids], dtype=torch.long)
        b, c = len(c_ids), int(lengths.max())
        comp_mask = (torch.arange(c)[None, :] < lengths[:, None])
        flat = [t for ci in c_ids for t in ci]
        completion_ids = torch.full((b, c), pad_id, dtype=torch.long)
        completion_ids[comp_mask] = torch.tensor(flat, dtype=torch.long)
        samp = torch.zeros((b, c))
        samp[comp_mask] = torch.tensor([x for lp in rollout.sampling_logps[rows] for x in lp], dtype=torch.float32)
        comp_mask = comp_mask.float()
        if mask_truncated:
            comp_mask[rollout.truncated[rows]] = 0.0
        keep_row = None
        if never_empty:
            out_of_forward = [sk or float(m.amax()) == 0.0 for sk, m in zip(skip[rows], comp_mask)]
            if all(out_of_forward):
                keep_row = min(range(b), key=lambda i: len(c_ids[i]))
        row_skip = [sk and i != keep_row for i, sk in enumerate(skip[rows])]
        if any(row_skip):
            samp[torch.tensor(row_skip)] = 0.0
        out.append(MicroBatch(
            prompt_token_ids=[list(p) for p in p_ids], completion_token_ids=[list(ci) for ci in c_ids],
            completion_ids=completion_ids.to(device), completion_mask=comp_mask.to(device),
            advantages=rollout.advantages[rows].to(device), sampling_logps=samp.to(device), rows=rows, pad_id=pad_id,
            skip_rows=row_skip if any(row_skip) else None, keep_row=keep_row,
        ))
    return out


def zero_weight_micro_batch(like: MicroBatch) -> MicroBatch:
    """One row of `like` with mask 0 and advantage 0, computed all the same (`keep_row`): a
    forward and backward that adds exactly 0 to the loss and its gradient. `pad_micro_batches`
    appends such micro-batches so that every rank runs as many forwards as the others."""
    return MicroBatch(
        prompt_token_ids=like.prompt_token_ids[:1], completion_token_ids=like.completion_token_ids[:1],
        completion_ids=like.completion_ids[:1], completion_mask=torch.zeros_like(like.completion_mask[:1]),
        advantages=torch.zeros_like(like.advantages[:1]), sampling_logps=torch.zeros_like(like.sampling_logps[:1]),
        rows=slice(like.rows.start, like.rows.start), pad_id=like.pad_id, keep_row=0,
    )


def pad_micro_batches(micro_batches: list[MicroBatch], count: int) -> list[MicroBatch]:
    """`micro_batches` followed by zero-weight ones up to `count` (see zero_weight_micro_batch)."""
    return micro_batches + [zero_weight_micro_batch(micro_batches[-1]) for _ in range(count - len(micro_batches))]


def _merge_spans(rollout: Rollout, spans: list[tuple[int, int]], skip: list[bool]) -> list[tuple[int, int]]:
    """Join consecutive (start, end) row spans while the packed tokens of the union (skipped rows
    not counted) fit in the padded tokens of the largest single span."""
    def padded(s, e):
        return (e - s) * (max(len(p) for p in rollout.prompt_ids[s:e]) + max(len(c) for c in rollout.completion_ids[s:e]))

    def packed(s, e):
        prompts = sum(len(rollout.prompt_ids[s + a]) for a, _ in find_segments(rollout.prompt_ids[s:e]))
        return prompts + sum(len(c) for c, sk in zip(rollout.completion_ids[s:e], skip[s:e]) if not sk)

    merged = [spans[0]]
    budget = padded(*spans[0])
    for s, e in spans[1:]:
        budget_with = max(budget, padded(s, e))
        if packed(merged[-1][0], e) <= budget_with:
            merged[-1] = (merged[-1][0], e)
            budget = budget_with
        else:
            merged.append((s, e))
            budget = padded(s, e)
    return merged


def _unwrap(model):
    """The transformers model under DDP/FSDP/PEFT wrappers (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _plain_linear_head(model) -> torch.nn.Linear | None:
    """The lm_head when logits are exactly hidden @ W.T (no bias, softcap or scale); else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    if (type(head) is not torch.nn.Linear or head.bias is not None
            or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None
    return head


def uses_packed_forward(model) -> bool:
    """Whether `completion_logprobs` takes the shared-prefix packed path for this model."""
    inner = _unwrap(model)
    return _plain_linear_head(inner) is not None and supports_packed(inner)


CPU_CHUNK_BYTES = 32 << 20
"""On CPU, rows per lm_head chunk are sized so one float32 [rows, V] buffer is about 32 MiB: glibc
serves such buffers from its heap after the first one (bigger ones are mmap'ed and page-faulted
afresh every time), and two of them are the logprob pass's whole extra memory."""


def _chunk_rows(head: torch.nn.Linear, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return chunk_size
    if head.weight.device.type == "cpu":
        return max(16, CPU_CHUNK_BYTES // (4 * head.weight.shape[0]))
    return 1024


def completion_logprobs(model, mb: MicroBatch, *, temperature: float, with_entropy: bool = False,
                        chunk_size: int | None = None, packed: bool | None = None,
                        max_segment_tokens: int = MAX_SEGMENT_TOKENS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs [B, C] of the completion tokens under `model` (at `temperature`), and
    their entropies when asked (0 on padding).

    `packed` (default: whenever the model supports it, see `uses_packed_forward`): each prompt
    once per group, no padding (grpokit.prefix; one group a row: on CPU, rows that join
    several short groups saved padding but lost more in the masked attention). Otherwise the padded [B, P + C] layout. Either way only the completion positions go through
    the lm_head, `chunk_size` rows at a time (None: ~32 MiB of fp32 logits on CPU, 1024 rows on
    GPU), so no [B, P+C, V] (or full [K, V] fp32) logits tensor is ever kept."""
    t = temperature if temperature > 0 else 1.0
    inner = _unwrap(model)
    head = _plain_linear_head(inner)
    if head is not None:
        chunk_size = _chunk_rows(head, chunk_size)
    if packed is None:
        packed = head is not None and supports_packed(inner)
    if packed:
        if head is None or not supports_packed(inner):
            raise ValueError(f"{type(inner).__name__} cannot take the packed shared-prefix forward "
                             "(needs eager/sdpa full attention and a plain linear lm_head); use packed=False.")
        layout = mb.layout(max_segment_tokens)
        shape = tuple(mb.completion_ids.shape)
        if layout.targets.numel() == 0:  # every completion empty: nothing to score
            zeros = torch.zeros(shape, device=mb.device) + 0.0 * head.weight.sum()
            return zeros, (zeros if with_entropy else None)
        # the backbone call goes through the module that holds the LoRA layers (if any)
        hidden = packed_hidden(inner.get_decoder(), layout, head.weight.dtype)
        out = chunked_logprobs(hidden, head.weight, layout.targets, temperature=t, chunk_size=chunk_size,
                               return_entropy=with_entropy)
        logps, entropy = out if with_entropy else (out, None)
        return (scatter_to_grid(logps, layout, shape),
                scatter_to_grid(entropy, layout, shape) if with_entropy else None)
    p, c = mb.prompt_width, mb.completion_ids.shape[1]
    if head is not None and hasattr(inner, "get_decoder"):
        hidden = inner.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                     position_ids=mb.position_ids, use_cache=False).last_hidden_state
        hidden = hidden[:, p - 1:p - 1 + c]  # position t predicts token t+1
        out = chunked_logprobs(hidden, head.weight, mb.completion_ids, temperature=t,
                               chunk_size=chunk_size, return_entropy=with_entropy)
        return out if with_entropy else (out, None)
    logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                   use_cache=False, logits_to_keep=c + 1).logits[:, :-1] / t
    logps = selective_log_softmax(logits, mb.completion_ids)
    return logps, (entropy_from_logits(logits.detach()) if with_entropy else None)


def sampler_logps_are_old_logps(model, engine, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                                min_p: float | None = None, use_vllm: bool = False) -> bool:
    """Whether the sampler's per-token logprobs can stand in for the old policy's (num_iterations > 1).

    True for grpokit's HF engine sampling from the training weights in float32/float64 at
    temperature > 0 with no top-p/top-k/min-p truncation (the sampled distribution is then the
    trainer's softmax(logits / T)), and a model without active dropout (the engine samples in eval
    mode). Both logprobs are then the same function of the same weights, computed in a different
    batch layout: measured on Qwen2/Llama/GPT-2 (tiny and the ~25M benchmark model, T = 1 and
    0.7), max |sampler - trainer| = 1e-6 to 8e-6 nats, i.e. importance ratios within 1e-5 of 1,
    the same size as the packed-vs-padded difference of the training forward itself
    (tests/unit/test_batch.py). bf16 is not covered by that measurement, so it keeps computing."""
    from grpokit.rollout.hf import HFEngine

    if use_vllm or not isinstance(engine, HFEngine) or temperature <= 0:
        return False
    if top_p < 1.0 or (top_k or 0) > 0 or (min_p or 0.0) > 0:
        return False
    inner = _unwrap(model)
    dtypes = {p.dtype for p in inner.parameters()}
    if not dtypes <= {torch.float32, torch.float64}:
        return False
    if _unwrap(engine.model) is not inner:
        return False
    cfg = getattr(inner, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for name in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout"):
        if float(getattr(cfg, name, 0.0) or 0.0) > 0:
            return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in getattr(model, "modules", lambda: [])())
