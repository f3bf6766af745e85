"""The decode KV cache of HFEngine: pre-allocated slots, written in place, rows removable.

One buffer per layer of shape [rows, kv_heads, capacity, head_dim]. Prompts are left-padded to
the wave's longest prompt (`width`), so every row writes its next token at the same column and
the model sees the view [:b, :, :length]. A float padding mask [rows, 1, 1, capacity] (0 or the
dtype's minimum, never -inf, so no attention row is all-masked) travels with it. Pad columns
hold zeros, so a masked entry can never inject NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers.cache_utils import Cache, CacheLayerMixin
else:
    try:  # transformers >= 4.56: per-layer cache objects
        from transformers.cache_utils import Cache, CacheLayerMixin
    except ImportError:  # pragma: no cover
        Cache, CacheLayerMixin = object, object


class SlotLayer(CacheLayerMixin):
    """One layer's KV buffers, filled in place; the model sees [:b, :, :length]."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        self.k_buf, self.v_buf, self.length, self.b = keys, values, length, keys.shape[0]
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states, value_states):  # buffers are allocated up front
        pass

    @property
    def keys(self):
        return self.k_buf[: self.b, :, : self.length]

    @property
    def values(self):
        return self.v_buf[: self.b, :, : self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.k_buf.shape[2]:  # a slice past the end would silently write fewer columns
            raise RuntimeError(f"SlotCache: writing columns {start}:{end} past its capacity {self.k_buf.shape[2]}")
        self.k_buf[: self.b, :, start:end] = key_states
        self.v_buf[: self.b, :, start:end] = value_states
        self.length = end
        return self.k_buf[: self.b, :, :end], self.v_buf[: self.b, :, :end]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.k_buf.shape[2]


class SlotCache(Cache):
    """A transformers `Cache` of `SlotLayer`s plus the rows' padding mask."""

    # every layer is a SlotLayer (built by `like`); transformers types the list as any cache layer
    layers: list[SlotLayer]  # type: ignore[assignment]

    def __init__(self, layers: list[SlotLayer], mask: torch.Tensor):
        super().__init__(layers=[*layers])
        self.mask = mask
        self.b = mask.shape[0]

    @classmethod
    def like(cls, prefill_cache, rows: int, capacity: int, width: int, zeroed: bool = False) -> "SlotCache":
        """Empty slots shaped like the layers of a prefill `DynamicCache` (zeros up to `width`, or
        everywhere with `zeroed`: multi-turn rows leave unwritten columns behind, masked)."""
        layers = []
        for src in prefill_cache.layers:
            if type(src).__name__ != "DynamicLayer":
                raise NotImplementedError(f"HFEngine handles full-attention KV caches; got {type(src).__name__}")
            bufs = []
            for t in (src.keys, src.values):
                buf = torch.empty((rows, t.shape[1], capacity, t.shape[3]), dtype=t.dtype, device=t.device)
                (buf if zeroed else buf[:, :, :width]).zero_()
                bufs.append(buf)
            layers.append(SlotLayer(bufs[0], bufs[1], width))
        k = prefill_cache.layers[0].keys
        return cls(layers, torch.zeros((rows, 1, 1, capacity), dtype=k.dtype, device=k.device))

    def write_prompts(self, rows: torch.Tensor, prefill_cache, index: torch.Tensor, prompt_lens: torch.Tensor):
        """Copy (broadcast) the prompts of a left-padded prefill batch into the slots, right-aligned:
        slot rows[i] gets batch row index[i], a prompt of prompt_lens[i] tokens (int64 tensors on
        the cache's device). One gather per layer and buffer for the whole batch; the prefill's
        pad columns are written as zeros and masked."""
        width = self.layers[0].length
        src_width = prefill_cache.layers[0].keys.shape[2]
        cols = torch.arange(src_width, device=rows.device)
        pad = cols[None, :] < (src_width - prompt_lens)[:, None]                 # [n, src_width]
        ragged = bool(pad.any())
        for layer, src in zip(self.layers, prefill_cache.layers):
            for buf, t in ((layer.k_buf, src.keys), (layer.v_buf, src.values)):
                part = t.index_select(0, index)
                if ragged:  # where, not a product: a pad column may hold anything (even NaN)
                    part = torch.where(pad[:, None, :, None], 0.0, part)
                buf[rows, :, width - src_width:width] = part
        full = torch.arange(self.mask.shape[-1], device=rows.device)
        masked = full[None, :] < (width - prompt_lens)[:, None]                  # [n, capacity]
        self.mask[rows] = torch.where(masked, torch.finfo(self.mask.dtype).min, 0.0).to(self.mask.dtype)[:, None, None]

    def block_mask(self, b: int, width: int, real: torch.Tensor | None = None) -> torch.Tensor:
        """Padding mask [b, 1, width, length + width] for a block of `width` new tokens per row (a
        turn's prefill, draft tokens): each row's cached columns as masked so far, then the block
        causally; with `real` [b, width] (bool) only its real keys, a query always seeing itself (so no
        row is all-masked)."""
        length, device = self.layers[0].length, self.mask.device
        cols = torch.arange(width, device=device)
        allowed = (cols[:, None] >= cols[None, :])[None]                                   # [1, q, key]
        if real is not None:
            allowed = (allowed & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
        new = torch.where(allowed, 0.0, torch.finfo(self.mask.dtype).min).to(self.mask.dtype)[:, None]
        return torch.cat([self.mask[:b, :, :, :length].expand(b, 1, width, length), new.expand(b, 1, width, width)],
                         dim=-1)

    def keep_columns(self, first: int, keep: torch.Tensor) -> None:
        """The first keep.shape[0] rows' mask over columns [first, first + keep.shape[1]): open where
        `keep` (bool) is true, masked elsewhere."""
        rows, width = keep.shape
        self.mask[:rows, 0, 0, first:first + width] = torch.where(
            keep, 0.0, torch.finfo(self.mask.dtype).min).to(self.mask.dtype)

    def step_mask(self) -> torch.Tensor:
        """Padding mask [b, 1, 1, length + 1] for the next one-token step."""
        return self.mask[: self.b, :, :, : self.layers[0].length + 1]

    def drop(self, done: list[int], extra: tuple[torch.Tensor, ...] = ()) -> list[tuple[int, int]]:
        """Remove batch positions `done`: active rows from the end move into their slots (copying
        only those rows), then every buffer is viewed through its first b rows. `extra` tensors
        (indexed by batch position) move the same way. Returns the (to, from) moves."""
        done_set = set(done)
        new_b = self.b - len(done_set)
        holes = sorted(p for p in done_set if p < new_b)
        movers = [p for p in range(new_b, self.b) if p not in done_set]
        if holes:
            dst = torch.tensor(holes, device=self.mask.device)
            src = torch.tensor(movers, device=self.mask.device)
            for layer in self.layers:
                for buf in (layer.k_buf, layer.v_buf):
                    buf[dst, :, : layer.length] = buf[src, :, : layer.length]
            for t in (self.mask, *extra):
                t[dst] = t[src]
        self.b = new_b
        for layer in self.layers:
            layer.b = new_b
        return list(zip(holes, movers))

    # ---- multi-turn (HFEngine.generate_multiturn): rows keep their contents while parked ----
    def set_batch(self, b: int) -> None:
        """The first b rows are the batch the model sees."""
        self.b = b
        for layer in self.layers:
            layer.b = b

    def park(self, done: list[int], extra: tuple[torch.Tensor, ...] = ()) -> list[tuple[int, int]]:
        """Like `drop`, but the rows leaving keep their KV: each is swapped with the active row that
        takes its slot (both rows copied), so it lies beyond the batch, intact. Returns the swaps."""
        done_set = set(done)
        new_b = self.b - len(done_set)
        holes = sorted(p for p in done_set if p < new_b)
        movers = [p for p in range(new_b, self.b) if p not in done_set]
        if holes:
            dst = torch.tensor(holes + movers, device=self.mask.device)
            src = torch.tensor(movers + holes, device=self.mask.device)
            for layer in self.layers:
                for buf in (layer.k_buf, layer.v_buf):
                    buf[dst, :, : layer.length] = buf[src, :, : layer.length]
            for t in (self.mask, *extra):
                t[dst] = t[src]
        self.set_batch(new_b)
        return list(zip(holes, movers))

    def reorder(self, order: list[int], extra: tuple[torch.Tensor, ...] = ()) -> None:
        """Row p of the slots becomes row order[p] of before (the first len(order) rows); `extra`
        tensors (indexed by row) are reordered the same way."""
        idx = torch.tensor(order, device=self.mask.device)
        m = len(order)
        for layer in self.layers:
            for buf in (layer.k_buf, layer.v_buf):
                buf[:m, :, : layer.length] = buf[idx, :, : layer.length]
        for t in (self.mask, *extra):
            t[:m] = t[idx]

    def ensure_capacity(self, columns: int) -> None:
        """At least `columns` columns per row (new columns zero and unmasked; 1.5x growth)."""
        cap = self.mask.shape[-1]
        if columns <= cap:
            return
        new_cap = max(columns, cap + cap // 2)
        for layer in self.layers:
            for name in ("k_buf", "v_buf"):
                old = getattr(layer, name)
                buf = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
                buf[:, :, : layer.length] = old[:, :, : layer.length]
                setattr(layer, name, buf)
        mask = self.mask.new_zeros((*self.mask.shape[:-1], new_cap))
        mask[..., :cap] = self.mask
        self.mask = mask
