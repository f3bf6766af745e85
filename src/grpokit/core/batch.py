"""Micro-batches: a step's trajectories cut into the pieces one training forward takes.

Shapes: B = rows of one micro-batch, P = longest prompt of the micro-batch, C = longest
completion. `completion_mask` is 1 on the tokens in the loss: model-written tokens (external
segments are 0), minus truncated completions when `mask_truncated_completions`; every loss
normaliser counts this mask, so tool and environment tokens are never in one.

The model inputs are built on first use: the packed shared-prefix layout (grpokit.modeling.prefix)
or the padded one (left-padded prompt | right-padded completion), see grpokit.core.forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpokit.modeling.prefix import MAX_SEGMENT_TOKENS, PackedLayout, build_packed_layout, find_segments
from grpokit.trajectory import Trajectories


@dataclass
class MicroBatch:
    """B samples: token lists, and [B, C] completion tensors right-padded to the longest completion.

    The model inputs are built on first use: `layout()` (packed, shared prefix) or the padded
    `input_ids` / `attention_mask` / `position_ids` [B, P + C] (prompts left-padded to P).
    `advantages` is whatever per-sample weight the algorithm trains with (GRPO's group-relative
    advantages; 0 for a DPO pair, whose loss reads logprobs only)."""

    prompt_token_ids: list[list[int]]
    completion_token_ids: list[list[int]]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] float: 1 = token in the loss (model-written, not masked)
    advantages: torch.Tensor        # [B]
    sampling_logps: torch.Tensor    # [B, C] (0 where masked)
    rows: slice                     # which samples of the step these are
    pad_id: int = 0
    skip_rows: list[bool] | None = None     # rows left out of the forward (their logprobs come out 0)
    keep_row: int | None = None     # a row computed even if skipped or wholly masked (see make_micro_batches)
    pad_to_multiple_of: int | None = None   # the padded layout's prompt and completion widths (TRL's knob)
    old_logps: torch.Tensor | None = None   # [B, C] when num_iterations > 1
    ref_logps: torch.Tensor | None = None   # [B, C] when beta > 0
    vision: list | None = None      # per row: its prompt's images (VisionInputs, shared by a group) or None
    completion_vision: list | None = None  # per row: the images in its completion (tool results) or None
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
            keys = None if self.vision is None else [id(v) if v is not None else None for v in self.vision]
            self._layout = build_packed_layout(self.prompt_token_ids, comps, max_segment_tokens=max_segment_tokens,
                                               min_row_tokens=min_row_tokens, pad_id=self.pad_id,
                                               keys=keys).to(self.device)
            self._layout_key = (max_segment_tokens, min_row_tokens)
        return self._layout

    def _padded_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._padded is None:
            p_ids, c_ids = self.prompt_token_ids, self.completion_token_ids
            b, p, c = len(p_ids), self.prompt_width, self.completion_ids.shape[1]
            width = p + _round_up(c, self.pad_to_multiple_of)
            input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((b, width), dtype=torch.long)
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
        return _round_up(max(map(len, self.prompt_token_ids)), self.pad_to_multiple_of)


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


def make_micro_batches(rollout: Trajectories, size: int, *, pad_id: int, device, mask_truncated: bool,
                       advantages: torch.Tensor | None = None, merge: bool = False,
                       skip_zero_advantage: bool = False, never_empty: bool = False,
                       token_budget: int | None = None, packed: bool = True,
                       pad_to_multiple_of: int | None = None) -> list[MicroBatch]:
    """Split the N samples into micro-batches of `size` consecutive rows (groups stay whole when
    size is a multiple of G; a group cut by a micro-batch boundary still shares its prompt within
    each part). Completion tensors are padded to each micro-batch's own longest completion.
    `advantages` [N] (None: zeros) is sliced with the rows. External segments (tool or
    environment output) are in the token lists, so they are in the context of what follows, and
    out of `completion_mask`.

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

    `token_budget=T` (a loss with global normalisers) cuts micro-batches by tokens instead of rows:
    consecutive rows, across groups, as many as fit in T tokens of the forward (`packed`: each
    group's prompt once plus the completions, skipped rows not counted; else rows x (longest prompt
    + longest completion)); a row longer than T alone is one micro-batch. `size` is then unused.

    `pad_to_multiple_of=m`: the padded layout's prompt and completion widths are rounded up to
    multiples of m (TRL's knob, for accelerators that want fixed shapes; the trainer then runs
    the padded forward).

    Prompts with images (`rollout.images`): each micro-batch carries its rows' VisionInputs; the
    forward encodes each distinct prompt's images once (the run's image-feature cache, given to the
    forward, not carried by the micro-batch).

    `never_empty=True` (several ranks): a micro-batch whose rows would all be left out of the
    forward (skipped, or wholly masked) keeps its shortest row in it (`MicroBatch.keep_row`). That
    row adds exactly 0 to the loss (advantage 0, or mask 0), but the forward runs the whole model,
    so every parameter gets a (zero) gradient and this rank takes part in the same gradient
    reduction (DDP) and parameter gathers (FSDP2) as a rank that has something to train."""
    n = len(rollout.completion_ids)
    advantages = torch.zeros(n) if advantages is None else advantages
    if len(advantages) != n:
        raise ValueError(f"{len(advantages)} advantages for {n} samples.")
    for i, pi in enumerate(rollout.prompt_ids):
        if not pi:
            raise ValueError(f"row {i} has an empty prompt; every prompt needs at least one token.")
    skip = (advantages == 0).tolist() if skip_zero_advantage else [False] * n
    if token_budget is not None:
        spans = _token_budget_spans(rollout, token_budget, skip, packed)
    else:
        spans = [(start, min(start + size, n)) for start in range(0, n, size)]
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
        if rollout.segments is not None:  # external tokens: context, never in the loss
            trained = [t for i in range(start, end) for t in rollout.trained_mask(i)]
            comp_mask[comp_mask.clone()] = torch.tensor(trained, dtype=torch.bool)
        comp_mask = comp_mask.float()
        if mask_truncated:
            comp_mask[rollout.truncated[rows]] = 0.0
        if rollout.nonfinite is not None:  # garbage from NaN/inf logits: never trained on
            comp_mask[rollout.nonfinite[rows]] = 0.0
            samp[rollout.nonfinite[rows]] = 0.0
        keep_row = None
        if never_empty:
            wholly_masked = (comp_mask.amax(dim=1) == 0).tolist()  # as layout() leaves such rows out
            if all(sk or masked for sk, masked in zip(skip[rows], wholly_masked)):
                keep_row = min(range(b), key=lambda i: len(c_ids[i]))
        row_skip = [sk and i != keep_row for i, sk in enumerate(skip[rows])]
        if any(row_skip):
            samp[torch.tensor(row_skip)] = 0.0
        out.append(MicroBatch(
            prompt_token_ids=[list(p) for p in p_ids], completion_token_ids=[list(ci) for ci in c_ids],
            completion_ids=completion_ids.to(device), completion_mask=comp_mask.to(device),
            advantages=advantages[rows].to(device), sampling_logps=samp.to(device), rows=rows, pad_id=pad_id,
            skip_rows=row_skip if any(row_skip) else None, keep_row=keep_row, pad_to_multiple_of=pad_to_multiple_of,
            vision=rollout.images[rows] if rollout.images is not None else None,
            completion_vision=(rollout.completion_images[rows] if rollout.completion_images is not None else None),
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
        pad_to_multiple_of=like.pad_to_multiple_of, vision=like.vision[:1] if like.vision is not None else None,
        completion_vision=like.completion_vision[:1] if like.completion_vision is not None else None,
    )


def pad_micro_batches(micro_batches: list[MicroBatch], count: int) -> list[MicroBatch]:
    """`micro_batches` followed by zero-weight ones up to `count` (see zero_weight_micro_batch)."""
    return micro_batches + [zero_weight_micro_batch(micro_batches[-1]) for _ in range(count - len(micro_batches))]


def _token_budget_spans(rollout: Trajectories, budget: int, skip: list[bool], packed: bool) -> list[tuple[int, int]]:
    """Consecutive row spans of at most `budget` forward tokens each (see make_micro_batches)."""
    spans: list[tuple[int, int]] = []
    start, used, longest_p, longest_c = 0, 0, 0, 0
    for i, (p, c) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        if packed:
            new_prompt = i == start or p != rollout.prompt_ids[i - 1]
            cost = used + (len(p) if new_prompt else 0) + (0 if skip[i] else len(c))
        else:
            cost = (i - start + 1) * (max(longest_p, len(p)) + max(longest_c, len(c)))
        if i > start and cost > budget:
            spans.append((start, i))
            start, used, longest_p, longest_c = i, 0, 0, 0
            cost = (len(p) + (0 if skip[i] else len(c))) if packed else len(p) + len(c)
        used, longest_p, longest_c = cost, max(longest_p, len(p)), max(longest_c, len(c))
    spans.append((start, len(rollout.prompt_ids)))
    return spans


def _merge_spans(rollout: Trajectories, spans: list[tuple[int, int]], skip: list[bool]) -> list[tuple[int, int]]:
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
