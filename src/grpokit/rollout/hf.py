"""HFEngine: fast G-samples-per-prompt rollouts from any transformers causal LM (CPU and CUDA).

Where the speed comes from (see benchmarks/README.md for the measured effect of each):

1. The prompt of a group is prefilled once, its KV cache copied (broadcast) into the G rows of
   the decode batch; `model.generate(num_return_sequences=G)` prefills it G times.
2. The decode cache is one pre-allocated buffer per layer, written in place (`kv.SlotCache`); the
   model sees a growing view of it. No `torch.cat` of the whole cache per step.
3. Prompts of different lengths are prefilled in length buckets, then decoded together
   left-aligned in the buffer with a 4-D additive padding mask and explicit position ids.
4. A finished row leaves the batch at once: an active row from the end of the batch is copied
   into its slot (cost: one row, not the batch), and every tensor is a view of its first B rows.
5. Sampling is vectorised torch on the last position's logits (grpokit.rollout.sampling);
   Python per step is one `.tolist()` and a loop over the active rows' bookkeeping.
6. A `max_batch_tokens` budget (prompt + max_tokens per row) splits huge rollouts into waves.
7. On CPU (float32, oneDNN), the output projection -- the largest matmul of a small model's
   decode step -- runs on a weight packed once per `generate` call: 1.4-2.5x faster than
   `F.linear` at 4-64 rows on a 32k vocabulary (the same product, summed in another order);
   projections under 1M weights keep `F.linear`, faster there.
8. On CPU, a LoRA model's adapted layers run on merged weights (W + scale * B @ A, made once per
   call; the base weights untouched): one product per layer instead of three.
9. Draft tokens (`draft_tokens`, off by default; grpokit.rollout.draft): a decode step may feed a
   row its last token and up to k guessed next tokens (n-gram lookup in the row's context, its
   wave's and the previous wave's completions) and keep the guesses equal to what the sampler
   draws there with plain decoding's uniforms: the same samples in fewer forwards. The guesses'
   columns are written to the cache and the rejected ones masked; a step drafts only where the
   expected tokens gained beat the columns' cost (`draft.draft_width`, from each row's record).

One decode loop (`_decode`) serves `generate` and `generate_multiturn`: a single-turn call is a
conversation whose driver never continues (`_OneTurn`), its finished rows dropped instead of
parked with their KV cache for a next turn.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from grpokit.modeling.info import text_config, unwrap
from grpokit.rollout.base import Completion, EngineCapabilities, eos_ids, finish_text, register_engine
from grpokit.rollout.draft import Drafter, NgramDrafter, accepted_drafts, draft_width
from grpokit.rollout.kv import SlotCache
from grpokit.rollout.sampling import SamplingParams, row_keys, row_uniforms, sample

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache
else:
    try:  # transformers >= 4.56 has per-layer cache objects; the engine needs them
        from transformers.cache_utils import DynamicCache
    except ImportError:  # pragma: no cover
        DynamicCache = None

_STOP_WINDOW_EXTRA = 8  # tokens decoded beyond the longest stop string's length when checking for it
_PACK_MIN_ELEMENTS = 1 << 20
"""Smallest output projection worth a packed weight: measured here (1 thread, 8-64 rows), packing
wins from 4096 x 256 (1.1-1.3x) to 32000 x 384 (1.2-1.7x) and loses on small ones (101 x 64: 2.4-4.6x
slower, the call's fixed cost), besides the packing itself (0.4 ms per `generate` on the starter)."""


@contextlib.contextmanager
def _packed_cpu_lm_head(model, enabled: bool):
    """While active, the output embedding (a float32 nn.Linear on CPU) runs on a oneDNN-packed copy
    of its weight, packed on entry (so it always has the current weights); restored on exit."""
    # Any: the model's head and torch's op namespace are dynamic; `usable` checks what is used
    head: Any = model.get_output_embeddings() if enabled and hasattr(model, "get_output_embeddings") else None
    ops: Any = getattr(torch.ops, "mkldnn", None)
    usable = (type(head) is torch.nn.Linear and head.weight.device.type == "cpu"
              and head.weight.numel() >= _PACK_MIN_ELEMENTS
              and head.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
              and hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight"))
    try:
        packed = ops._reorder_linear_weight(head.weight.detach()) if usable else None
    except RuntimeError:  # a build whose oneDNN cannot pack this weight: keep F.linear
        packed = None
    if packed is None:
        yield
        return
    bias = None if head.bias is None else head.bias.detach()

    def forward(x):
        y = ops._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


@contextlib.contextmanager
def _merged_cpu_lora(model, enabled: bool):
    """While active, each LoRA linear layer (PEFT's `lora.Linear` on a float32 CPU nn.Linear, its
    active adapters neither DoRA nor with a LoRA bias) runs one `F.linear` on a merged copy of its
    weight, W + sum of scale * B @ A over the active adapters, made on entry (so it has the current
    adapter) instead of the base product plus the two low-rank ones; restored on exit. The base
    weights are never touched (PEFT's merge_adapter / unmerge_adapter would round them a little at
    each step). Costs a copy of the adapted weights while generating; the same product summed in
    another order (~1e-7 relative)."""
    layers: list[tuple[Any, Any, list[str]]] = []
    lora_linear: Any = None
    if enabled:
        try:
            from peft.tuners.lora.layer import Linear as lora_linear
        except ImportError:  # peft is optional
            pass
        for m in model.modules() if lora_linear is not None else ():
            if type(m) is not lora_linear or m.merged or m.disable_adapters:
                continue
            base = m.get_base_layer()
            adapters = [a for a in m.active_adapters if a in m.lora_A]
            if (type(base) is not torch.nn.Linear or base.weight.device.type != "cpu"
                    or base.weight.dtype != torch.float32 or not adapters
                    or any(m.use_dora.get(a, False) or getattr(m, "lora_bias", {}).get(a, False) for a in adapters)):
                continue
            layers.append((m, base, adapters))
    if not layers:
        yield
        return
    try:
        for m, base, adapters in layers:
            weight = base.weight.detach()
            for a in adapters:  # W + scale * B @ A in one pass over W (PEFT's delta is a full-size temporary)
                if getattr(m, "fan_in_fan_out", False) or a in getattr(m, "lora_variant", {}):
                    weight = weight + m.get_delta_weight(a).detach()
                else:
                    weight = torch.addmm(weight, m.lora_B[a].weight.detach(), m.lora_A[a].weight.detach(),
                                         alpha=m.scaling[a])
            bias = None if base.bias is None else base.bias.detach()
            m.__dict__["forward"] = functools.partial(_linear, weight=weight, bias=bias)
        yield
    finally:
        for m, _, _ in layers:
            m.__dict__.pop("forward", None)


def _linear(x, *args, weight, bias, **kwargs):
    return torch.nn.functional.linear(x, weight, bias)


def _layer_kv_shapes(cfg) -> list[tuple[int, int]]:
    """(key/value heads, head dim) of each layer: from the per-layer configs where the model has
    them (transformers' heterogeneous configs, e.g. Gemma 4: the global head_dim is ambiguous)."""
    def shape(c):
        heads = c.num_attention_heads
        return (getattr(c, "num_key_value_heads", None) or heads,
                getattr(c, "head_dim", None) or c.hidden_size // heads)

    layers = getattr(cfg, "per_layer_config", None)
    if layers:
        return [shape(layers[i]) for i in range(len(layers))]
    return [shape(cfg)] * cfg.num_hidden_layers


_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout", "dropout")


def _exact_fp32_logprobs(model) -> bool:
    """Whether sampling `model` gives the training forward's own log-probs: float32/float64 weights
    (the same softmax in the same precision) and no dropout that training would apply and the
    engine (in eval mode) does not."""
    base = unwrap(model)
    if not {p.dtype for p in base.parameters()} <= {torch.float32, torch.float64}:
        return False
    cfg = text_config(base)
    if any(float(getattr(cfg, name, 0.0) or 0.0) > 0 for name in _DROPOUT_FIELDS):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


@register_engine("hf")
class HFEngine:
    """G samples per prompt from a transformers causal LM, on the model's device.

    Args:
        model: a transformers causal LM (Qwen2, Llama, GPT-2, ...), possibly PEFT(LoRA)-wrapped.
        tokenizer: its tokenizer (used to decode `text` and to check stop strings).
        max_batch_tokens: most (prompt length + max_tokens) tokens held in the decode cache at
            once, summed over rows; a rollout needing more runs in waves. None: as many as fit in
            `kv_cache_memory` bytes of KV cache.
        kv_cache_memory: KV-cache budget in bytes used when max_batch_tokens is None; None means
            40% of the free memory on CUDA (at each call) and 4 GiB on CPU.
        prefill_batch_tokens: prompts are prefilled in batches of about this many tokens, grouped
            by length (padding under `prefill_max_padding` of a batch); 0 prefills one by one.
        prefill_max_padding: largest fraction of padding tokens allowed in a prefill batch.
        cpu_packed_lm_head: on CPU, run the output projection on a oneDNN-packed weight (see 7.).
        cpu_merged_lora: on CPU, run each LoRA layer on its merged weight (see 8.).
        draft_tokens: most draft tokens per row and decode step (see 9.), guessed by n-gram lookup
            (`draft.NgramDrafter`); 0 decodes one token per step.
        drafter: another source of draft tokens (a `draft.Drafter`); wins over draft_tokens.
        draft_column_cost: the cost of a draft column, in decode steps (measured: ~0.4 on CPU for
            the starter and SmolLM2-135M); a step drafts only where the expected tokens gained
            exceed it (`draft.draft_width`).
    """

    def __init__(self, model, tokenizer, *, max_batch_tokens: int | None = None,
                 kv_cache_memory: int | None = None, prefill_batch_tokens: int = 2048,
                 prefill_max_padding: float = 0.1, cpu_packed_lm_head: bool = True,
                 cpu_merged_lora: bool = True, draft_tokens: int = 0, drafter: Drafter | None = None,
                 draft_column_cost: float = 0.4):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        self.kv_cache_memory = kv_cache_memory
        self.prefill_batch_tokens = prefill_batch_tokens
        self.prefill_max_padding = prefill_max_padding
        self.cpu_packed_lm_head = cpu_packed_lm_head
        self.cpu_merged_lora = cpu_merged_lora
        if not isinstance(draft_tokens, int) or draft_tokens < 0:
            raise ValueError(f"draft_tokens must be an int >= 0, got {draft_tokens!r}")
        self.drafter: Drafter | None = drafter if drafter is not None else (
            NgramDrafter(draft_tokens) if draft_tokens else None)
        self.draft_column_cost = draft_column_cost
        self.eos_ids = eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.stats: dict[str, float] = {}
        """Phase split of the last call: prefill_s, decode_s, steps (decode forwards), waves,
        generated_tokens, and with drafts draft_tokens (proposed) and draft_accepted."""
        self._check_model()
        self._router_logits = bool(getattr(unwrap(model).config, "output_router_logits", False))
        self.capabilities = self._capabilities()

    def _capabilities(self) -> EngineCapabilities:
        return EngineCapabilities(images=True, kv_across_turns=True, exact_fp32_logprobs=_exact_fp32_logprobs(self.model),
                                  sampler_differs_from_trainer=False, uses_model_generate=False,
                                  keeps_state=self.drafter is not None)

    def state_dict(self) -> dict:
        """What the engine keeps between calls (its drafter's memory; see capabilities.keeps_state)."""
        return {"drafter": self.drafter.state_dict()} if self.drafter is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.drafter is not None and "drafter" in state:
            self.drafter.load_state_dict(state["drafter"])

    def metrics(self) -> dict[str, float]:
        """The last call's figures for the step's log: its batched decode forwards and the share of
        draft tokens kept (when it drafted)."""
        st = self.stats
        if not st:
            return {}
        out = {"rollout/decode_forwards": float(st["steps"])}
        if st.get("draft_tokens"):
            out["rollout/draft_kept"] = st["draft_accepted"] / st["draft_tokens"]
        return out

    # ------------------------------------------------------------------ public API
    def update_weights(self, model) -> None:
        """Sync weights from the trainer's model (a no-op when it is the module this engine uses);
        the capabilities are re-read (the module's dtype or dropout may have changed)."""
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())
        self.capabilities = self._capabilities()

    def generate(self, prompt_ids: list[list[int]], n: int = 1,
                 params: SamplingParams | None = None, images: list | None = None,
                 image_features=None) -> list[Completion]:
        """n completions per prompt, grouped by prompt (prompt 0's n completions first, ...).

        `images` (a vision-language model): per prompt, its images' processor tensors
        (grpokit.data.vision.VisionInputs) or None; a prompt with images is prefilled alone,
        once for its n samples, with its image features (`image_features`, a
        grpokit.modeling.vision.ImageFeatures: computed once per step when the vision tower is
        frozen), and its samples decode at the positions the images shift (M-RoPE)."""
        params = params or SamplingParams()
        turns = _OneTurn(len(prompt_ids) * n)
        self._sample(prompt_ids, n, params, turns, keep_kv=False, images=images, image_features=image_features)
        texts = self.tokenizer.batch_decode(turns.tokens, skip_special_tokens=True)  # one call for all samples
        results = []
        for j, (toks, logprobs, reason, text) in enumerate(zip(turns.tokens, turns.logprobs, turns.reasons, texts)):
            if params.stop and reason == "stop" and toks[-1] not in self.eos_ids:
                text, _ = finish_text(text, params.stop)
            results.append(Completion(prompt_index=j // n, token_ids=toks, logprobs=logprobs, finish_reason=reason,
                                      text=text))
        return results

    def generate_multiturn(self, prompt_ids: list[list[int]], n: int, params: SamplingParams | None,
                           driver) -> None:
        """Multi-turn rollouts (grpokit.envs.TurnDriver): n conversations per prompt, numbered as
        `generate`'s output. A sample whose turn ends (EOS, stop string, budget) is reported to
        `driver.turn_ended(sample, token_ids, logprobs, finish_reason)` at once and keeps its KV
        cache, parked at the back of the batch; when every sample of the wave has ended its turn,
        those in `driver.continuations()` get only their new tokens (the turn's last token, the tool
        results, the next turn's header) prefilled into their own cache and go on. The conversation
        is never re-encoded. `params.max_tokens` bounds each sample's whole completion (model and
        tool tokens); token t of a sample's completion is drawn with the same uniform as in
        `generate`, so a conversation does not depend on the others in its batch. Text prompts."""
        self._sample(prompt_ids, n, params or SamplingParams(), driver, keep_kv=True)

    def _sample(self, prompt_ids, n, params, driver, *, keep_kv: bool, images=None, image_features=None) -> None:
        """Every wave of one call through the one decode loop (`_run_wave`)."""
        with self._session(prompt_ids, n, params) as seed:
            for wave in self._plan_waves(prompt_ids, n, params.max_tokens):
                self._run_wave(wave, prompt_ids, n, params, seed, driver, keep_kv, images, image_features)
                self.stats["waves"] += 1

    @contextlib.contextmanager
    def _session(self, prompt_ids, n, params):
        """Checks, the seed, eval mode, no grad, SDPA, the packed output projection and the merged
        LoRA weights for one call."""
        self._check_inputs(prompt_ids, n, params)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "steps": 0, "waves": 0,
                      "generated_tokens": 0, "draft_tokens": 0, "draft_accepted": 0}
        model = self.model
        self.device = next(unwrap(model).parameters()).device
        was_training = model.training
        # The decode step passes a 4-D padding mask, which flash-attention/flex paths do not take:
        # those models run on SDPA (same math) for the rollout, and get their setting back after.
        cfg = unwrap(model).config
        attn = getattr(cfg, "_attn_implementation", None)
        if attn not in (None, "sdpa", "eager"):
            cfg._attn_implementation = "sdpa"
        model.eval()
        try:
            with (torch.no_grad(), _packed_cpu_lm_head(unwrap(model), self.cpu_packed_lm_head),
                  _merged_cpu_lora(model, self.cpu_merged_lora)):
                yield seed
        finally:
            model.train(was_training)
            if attn not in (None, "sdpa", "eager"):
                cfg._attn_implementation = attn

    # ------------------------------------------------------------------ checks and planning
    def _check_model(self):
        if DynamicCache is None:
            raise ImportError("HFEngine needs transformers >= 4.56 (per-layer Cache objects)")
        peft_cfg = getattr(self.model, "active_peft_config", None)
        if peft_cfg is not None and getattr(peft_cfg, "is_prompt_learning", False):
            raise NotImplementedError("HFEngine supports LoRA-style PEFT adapters, not prompt learning")
        base = unwrap(self.model)
        sig = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in sig else "past_key_values"
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in sig else (
            "num_logits_to_keep" if "num_logits_to_keep" in sig else None)
        self.device = next(base.parameters()).device
        cfg = text_config(base)
        self._max_positions = getattr(cfg, "max_position_embeddings", None)
        dtype_size = next(base.parameters()).element_size()
        self._kv_bytes_per_token = 2 * dtype_size * sum(
            kv_heads * head_dim for kv_heads, head_dim in _layer_kv_shapes(cfg))
        types = getattr(cfg, "layer_types", None)
        self._sliding_window = getattr(cfg, "sliding_window", None) if (
            types and any("sliding" in t for t in types)) else None

    def _check_inputs(self, prompt_ids, n, params):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a grpokit.rollout.SamplingParams, got {type(params).__name__}")
        for i, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise ValueError(f"prompt_ids[{i}] is empty; every prompt needs at least one token")
            total = len(p) + params.max_tokens
            if self._max_positions and total > self._max_positions:
                raise ValueError(f"prompt_ids[{i}] has {len(p)} tokens; with max_tokens={params.max_tokens} "
                                 f"that exceeds the model's max_position_embeddings={self._max_positions}")
            if self._sliding_window and total > self._sliding_window:
                raise NotImplementedError(f"prompt + max_tokens ({total}) exceeds the model's sliding "
                                          f"window ({self._sliding_window}); HFEngine does not handle it")

    def _budget(self) -> int:
        """Token budget of one wave (see `max_batch_tokens`)."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        memory = self.kv_cache_memory
        if memory is None:
            if self.device.type == "cuda":
                memory = int(0.4 * torch.cuda.mem_get_info(self.device)[0])
            else:
                memory = 4 << 30
        return max(1, memory // self._kv_bytes_per_token)

    def _plan_waves(self, prompt_ids, n, max_tokens):
        """Split (prompt, first_sample, count) pieces into waves that fit the token budget.

        Prompts are taken longest first so a wave's rows have similar lengths (little padding).
        A group larger than the budget is split over several waves (its prompt is prefilled again).
        """
        budget = self._budget()
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        waves, wave, wave_len, wave_rows = [], [], 0, 0
        for i in order:
            done = 0
            while done < n:
                length = max(wave_len, len(prompt_ids[i])) + max_tokens
                fit = budget // length - wave_rows
                if fit <= 0 and wave:
                    waves.append(wave)
                    wave, wave_len, wave_rows = [], 0, 0
                    continue
                take = min(n - done, max(fit, 1))
                wave.append((i, done, take))
                wave_len, wave_rows, done = max(wave_len, len(prompt_ids[i])), wave_rows + take, done + take
        if wave:
            waves.append(wave)
        return waves

    def _prefill_batches(self, prompts: list[list[int]], alone: list[bool] | None = None):
        """Group prompt indices (already sorted by length, longest first) into prefill batches;
        a prompt marked in `alone` (it has images) is a batch of its own."""
        batches: list[list[int]] = []
        cur: list[int] = []
        for i, p in enumerate(prompts):
            if alone is not None and alone[i]:
                if cur:
                    batches.append(cur)
                    cur = []
                batches.append([i])
                continue
            if cur:
                width = len(prompts[cur[0]])
                real = sum(len(prompts[j]) for j in cur) + len(p)
                padded = width * (len(cur) + 1)
                if padded > self.prefill_batch_tokens or padded - real > self.prefill_max_padding * padded:
                    batches.append(cur)
                    cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches

    # ------------------------------------------------------------------ one wave
    def _forward(self, **kw):
        cache = kw.pop("cache")
        kw[self._cache_kw] = cache
        if self._router_logits:  # MoE with output_router_logits: no load-balancing loss while sampling
            kw["output_router_logits"] = False
        return self.model(use_cache=True, **kw).logits

    def _run_wave(self, wave, prompt_ids, n, params, seed, driver, keep_kv: bool, images, image_features):
        """One wave: prefill its prompts, then turns until no sample goes on (`driver.continuations()`).
        Per wave row r, `rows.count[r]` completion tokens so far: at the start of a turn all are in
        its KV cache (next position: rows.start[r] + count[r]); at its end all but the last sampled
        one, which is fed with the next turn's new tokens. Single-turn sampling is a driver that
        never continues (`_OneTurn`) with `keep_kv=False`: a row that ends leaves the batch for good."""
        t0 = time.perf_counter()
        visions = [images[i] if images is not None else None for i, _, _ in wave]
        cache, logits = self._prefill(wave, prompt_ids, params.max_tokens, visions, image_features, zeroed=keep_kv)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats["prefill_s"] += time.perf_counter() - t0
        sample_of = [i * n + s + k for i, s, c in wave for k in range(c)]
        # uniforms[r, t] picks wave-row r's completion token t (counter-based, see sampling.py), hashed on the host
        rows = _Rows(sample_of=sample_of, uniforms=row_uniforms(row_keys(seed, torch.tensor(sample_of, dtype=torch.long)),
                                                                params.max_tokens).to(self.device),
                     start=[len(prompt_ids[i]) + self._position_offset(v, prompt_ids[i])
                            for (i, _, c), v in zip(wave, visions) for _ in range(c)])
        if params.repetition_penalty != 1.0:
            rows.seen = self._prompt_seen(wave, prompt_ids, logits.shape[-1])
        # drafts (see 9.): not with a repetition penalty or stop strings (both are decided token by
        # token on the text so far) nor with images (positions shifted by M-RoPE)
        if self.drafter is not None and rows.seen is None and not params.stop and all(v is None for v in visions):
            rows.drafter = self.drafter
            rows.drafter.start([list(prompt_ids[i]) for i, _, c in wave for _ in range(c)])
            rows.accept = [0.5] * len(sample_of)
            rows.retry_at = [0] * len(sample_of)
        while True:
            t1 = time.perf_counter()
            self._decode(cache, logits, rows, params, driver, keep_kv)
            self.stats["decode_s"] += time.perf_counter() - t1
            going = driver.continuations()
            conts = [r for r in range(len(sample_of)) if sample_of[r] in going]
            if not conts:
                if rows.drafter is not None:
                    rows.drafter.finish()
                return
            t2 = time.perf_counter()
            logits = self._extend(cache, rows, conts, [going[sample_of[r]] for r in conts], params.max_tokens)
            self.stats["prefill_s"] += time.perf_counter() - t2

    def _prefill(self, wave, prompt_ids, max_tokens, visions: list, image_features, zeroed: bool):
        """Each prompt of the wave once (length-bucketed batches; a prompt with images, `visions[j]`
        for piece j, alone), its KV broadcast to its rows. Returns the decode cache and the logits
        [rows, V] of each row's first token."""
        prompts = [prompt_ids[i] for i, _, _ in wave]
        rows_of, n_rows = [], 0
        for _, _, count in wave:
            rows_of.append(n_rows)
            n_rows += count
        width = max(len(p) for p in prompts)
        cache: SlotCache | None = None
        first_logits: torch.Tensor | None = None
        for batch in self._prefill_batches(prompts, [v is not None for v in visions]):
            b_width = len(prompts[batch[0]])
            ids = torch.tensor([[self.pad_id] * (b_width - len(prompts[j])) + list(prompts[j]) for j in batch],
                               dtype=torch.long)
            att = torch.tensor([[0] * (b_width - len(prompts[j])) + [1] * len(prompts[j]) for j in batch],
                               dtype=torch.long)
            kw: dict[str, Any] = {}
            if bool((att == 0).any()):
                kw["attention_mask"] = att.to(self.device)
                kw["position_ids"] = (att.cumsum(-1) - 1).clamp_(min=0).to(self.device)
            if self._logits_kw:
                kw[self._logits_kw] = 1
            if visions[batch[0]] is not None:  # alone in its batch: the model places its image features
                kw.update(self._image_inputs(visions[batch[0]], image_features))
            prefill_cache = DynamicCache()
            logits = self._forward(input_ids=ids.to(self.device), cache=prefill_cache, **kw)[:, -1, :]
            if cache is None or first_logits is None:  # the first batch (both are set together)
                cache = SlotCache.like(prefill_cache, n_rows, width + max_tokens, width, zeroed=zeroed)
                first_logits = logits.new_empty((n_rows, logits.shape[-1]))
            slots = [rows_of[j] + k for j in batch for k in range(wave[j][2])]
            index = [r for r, j in enumerate(batch) for _ in range(wave[j][2])]
            slots_t = torch.tensor(slots, device=self.device)
            index_t = torch.tensor(index, device=self.device)
            cache.write_prompts(slots_t, prefill_cache, index_t,
                                torch.tensor([len(prompts[batch[r]]) for r in index], device=self.device))
            first_logits[slots_t] = logits.index_select(0, index_t)
        assert cache is not None and first_logits is not None  # a wave has at least one prompt
        return cache, first_logits

    def _decode(self, cache: SlotCache, logits, rows: "_Rows", params, driver, keep_kv: bool):
        """The one decode loop: sample the active rows (batch positions [0, cache.b)) to the end of
        their turn: EOS, a stop string, or the completion budget (`params.max_tokens`, counting the
        tokens of earlier turns). A row whose turn ends is reported to `driver.turn_ended` at once and
        leaves the batch: parked with its KV cache for a later turn (`keep_kv`), else dropped (an
        active row from the end takes its slot). With a drafter (`rows.drafter`) a step may yield
        several tokens per row (`_draft_step`)."""
        device, eos, stop, drafter = self.device, self.eos_ids, params.stop, rows.drafter
        floor = self.draft_column_cost / 2  # below it a row's drafts cannot pay for their columns
        at, seen = rows.at, rows.seen
        active = at[:cache.b]
        row_ids = torch.tensor(active, dtype=torch.long, device=device)  # wave row of each batch position
        counts = torch.tensor([rows.count[r] for r in active], dtype=torch.long, device=device)
        positions = torch.tensor([rows.start[r] + rows.count[r] for r in active], dtype=torch.long, device=device)
        turn_tokens: dict[int, list[int]] = {r: [] for r in active}
        turn_logps: dict[int, list[float]] = {r: [] for r in active}
        limit = {r: params.max_tokens - rows.count[r] for r in active}
        window = (max(len(s) for s in stop) + _STOP_WINDOW_EXTRA) if stop else 0
        decode_batch = self._decode_batch_fn() if stop else None
        leave = cache.park if keep_kv else cache.drop
        tokens: torch.Tensor | None = None  # set by the first sample() below, before step 1 reads it
        step = 0
        while cache.b > 0:
            b = cache.b
            drafted = None
            if step > 0 and drafter is not None:
                proposals = []
                for r in at[:b]:  # a row whose drafts are seldom kept is asked every 16th step only
                    if rows.accept[r] >= floor or step >= rows.retry_at[r]:
                        proposals.append(drafter.propose(r, limit[r] - len(turn_tokens[r]) - 1))
                        rows.retry_at[r] = step + 16
                    else:
                        proposals.append([])
                if any(proposals):
                    width = draft_width(torch.tensor([len(d) for d in proposals]),
                                        torch.tensor([rows.accept[r] for r in at[:b]]), self.draft_column_cost)
                    if width > 1:
                        assert tokens is not None
                        drafted = self._draft_step(cache, tokens, positions, counts, row_ids, rows,
                                                   [d[:width - 1] for d in proposals], params)
            if drafted is not None:
                new_tokens, new_logps, first = drafted
            else:
                if step > 0:
                    assert tokens is not None
                    if drafter is not None:  # draft steps use more columns than the tokens they keep
                        cache.ensure_capacity(cache.layers[0].length + 1)
                    logits = self._forward(input_ids=tokens[:b, None], position_ids=positions[:b, None],
                                           attention_mask=cache.step_mask(), cache=cache)[:, -1, :]
                    positions[:b] += 1
                tokens, token_lp = sample(logits, params, rows.uniforms[row_ids[:b], counts[:b]],
                                          seen=None if seen is None else seen[:b])
                if seen is not None:
                    seen[torch.arange(b, device=device), tokens] = True
                counts[:b] += 1
                tok_list, lp_list = tokens.tolist(), token_lp.tolist()
            # batch position -> finish reason, in the order the driver hears of them
            ended: dict[int, Literal["stop", "length"]] = {}
            tails = []
            if drafted is None:  # one token per row
                for pos in range(b):
                    r, t = at[pos], tok_list[pos]
                    toks = turn_tokens[r]
                    toks.append(t)
                    turn_logps[r].append(lp_list[pos])
                    if drafter is not None:
                        drafter.extend(r, [t])
                    if t in eos:
                        ended[pos] = "stop"
                        continue
                    if len(toks) >= limit[r]:
                        ended[pos] = "length"  # unless its last token completed a stop string (below)
                    if stop:
                        tails.append(pos)
            else:  # several per row: never past the end of its turn (no stop strings with drafts)
                assert drafter is not None
                used = []
                for pos in range(b):
                    r, new = at[pos], new_tokens[pos]
                    toks, lps, k = turn_tokens[r], turn_logps[r], 0
                    for k, t in enumerate(new, 1):
                        toks.append(t)
                        lps.append(new_logps[pos][k - 1])
                        if t in eos:
                            ended[pos] = "stop"
                            break
                        if len(toks) >= limit[r]:
                            ended[pos] = "length"
                            break
                    used.append(k)
                    drafter.extend(r, new[:k])
                tokens = self._keep_drafts(cache, positions, counts, new_tokens, used, first)
            if tails and decode_batch is not None:  # stop strings are checked on the decoded tail of each row
                texts = decode_batch([turn_tokens[at[pos]][-window:] for pos in tails])
                for pos, text in zip(tails, texts):
                    if any(s in text for s in stop):
                        ended[pos] = "stop"
            self.stats["steps"] += 1
            step += 1
            if not ended:
                continue
            assert tokens is not None
            for pos, reason in ended.items():
                r = at[pos]
                rows.last[r] = turn_tokens[r][-1]
                rows.count[r] += len(turn_tokens[r])
                rows.parked_at[r] = cache.layers[0].length
                self.stats["generated_tokens"] += len(turn_tokens[r])
                driver.turn_ended(rows.sample_of[r], turn_tokens[r], turn_logps[r], reason)
            moved = (tokens, positions, row_ids, counts) if seen is None else (tokens, positions, row_ids, counts, seen)
            for to, frm in leave(list(ended), extra=moved):
                at[to], at[frm] = at[frm], at[to]

    def _draft_step(self, cache: SlotCache, tokens, positions, counts, row_ids, rows: "_Rows",
                    proposals: list[list[int]], params) -> tuple[list[list[int]], list[list[float]], int]:
        """One forward of each active row's last token and its draft tokens (right-padded to the
        longest), writing all of them into the cache; the token at each position is drawn with the
        uniform plain decoding uses there. Returns per row the tokens the step yields (its kept
        drafts and the sampled token after them), their log-probs, and the first column written;
        `_keep_drafts` then masks the columns of the drafts not kept."""
        b, device = cache.b, self.device
        width = 1 + max(map(len, proposals))
        length = cache.layers[0].length
        cache.ensure_capacity(length + width)
        drafts = torch.full((b, width - 1), self.pad_id, dtype=torch.long)  # built on the host, moved once
        for pos, d in enumerate(proposals):
            drafts[pos, :len(d)] = torch.tensor(d, dtype=torch.long)
        ids = torch.cat([tokens[:b, None], drafts.to(device)], dim=1)
        cols = torch.arange(width, device=device)
        logits = self._forward(input_ids=ids, position_ids=positions[:b, None] + cols[None, :],
                               attention_mask=cache.block_mask(b, width), cache=cache)
        index = (counts[:b, None] + cols[None, :]).clamp_(max=rows.uniforms.shape[1] - 1)
        sampled, logps = sample(logits.reshape(b * width, -1), params, rows.uniforms[row_ids[:b, None], index].reshape(-1))
        sampled, logps = sampled.view(b, width), logps.view(b, width)
        lengths = torch.tensor([len(d) for d in proposals], device=device)
        kept = accepted_drafts(sampled, ids[:, 1:], lengths)
        self.stats["draft_tokens"] += int(lengths.sum())
        self.stats["draft_accepted"] += int(kept.sum())
        n_new = (kept + 1).tolist()
        for r, d, k in zip(rows.at, proposals, n_new):  # each row's chance that a draft token is kept
            if d:
                rows.accept[r] += 0.3 * ((k - 1) / len(d) - rows.accept[r])
        s_list, lp_list = sampled.tolist(), logps.tolist()
        return [s[:m] for s, m in zip(s_list, n_new)], [lp[:m] for lp, m in zip(lp_list, n_new)], length

    def _keep_drafts(self, cache: SlotCache, positions, counts, new_tokens: list[list[int]], used: list[int],
                     first: int) -> torch.Tensor:
        """After a draft step that wrote its columns from `first` on: row p used `used[p]` of the
        tokens it yielded (fewer when one ended its turn), so its cache keeps that many of those
        columns (its previous last token and every used token but the last, which is fed next) and
        masks the rest; the cache ends after the longest kept run (the columns after it are
        written again). Returns each row's next input token."""
        b, device = cache.b, self.device
        n = torch.tensor(used, device=device)
        keep = max(used)  # the columns past every row's last kept one hold nothing: the next step overwrites them
        cache.keep_columns(first, torch.arange(keep, device=device)[None, :] < n[:, None])
        for layer in cache.layers:
            layer.length = first + keep
        positions[:b] += n
        counts[:b] += n
        return torch.tensor([new[k - 1] for new, k in zip(new_tokens, used)], dtype=torch.long, device=device)

    def _image_inputs(self, v, image_features) -> dict:
        """The model's image arguments for one prompt: its features (once per prompt; see
        grpokit.modeling.vision) and per-image / per-token tensors."""
        from grpokit.modeling.vision import ImageFeatures, encoder_outputs

        base = unwrap(self.model)
        features = image_features if image_features is not None else ImageFeatures()
        kw = {"mm_encoder_outputs": encoder_outputs([features.of(base, v, grad=False)])}
        kw.update({k: t.to(self.device) for k, t in v.tensors.items() if "pixel" not in k})
        kw.update({k: t.to(self.device) for k, t in v.token_tensors.items()})
        return kw

    def _position_offset(self, v, prompt: list[int]) -> int:
        """How far a prompt's images shift the positions of what follows it (M-RoPE); 0 without images."""
        if v is None:
            return 0
        from grpokit.modeling.vision import position_offset

        return position_offset(unwrap(self.model), v, prompt)

    def _prompt_seen(self, wave, prompt_ids, vocab: int) -> torch.Tensor:
        """[wave rows, V] bool: the tokens of each row's prompt (the repetition penalty's start)."""
        seen = torch.zeros((sum(c for _, _, c in wave), vocab), dtype=torch.bool, device=self.device)
        first = 0
        for i, _, c in wave:  # a wave's rows: c consecutive samples of prompt i
            seen[first:first + c, torch.tensor(prompt_ids[i], dtype=torch.long, device=self.device)] = True
            first += c
        return seen

    # ------------------------------------------------------------------ multi-turn: the next turn
    def _extend(self, cache: SlotCache, rows: "_Rows", conts: list[int], exts: list[list[int]], max_tokens: int):
        """Bring the rows `conts` back to the front of the batch and prefill, into each one's own
        cache, its last sampled token and its new tokens `exts` (left-padded to the longest; the
        pad columns and the columns written while it was parked are masked). Returns the logits of
        each row's next token [len(conts), V]."""
        device = self.device
        where = {r: p for p, r in enumerate(rows.at)}
        keep = set(conts)
        order = [where[r] for r in conts] + [p for p, r in enumerate(rows.at) if r not in keep]
        cache.reorder(order, extra=() if rows.seen is None else (rows.seen,))
        rows.at = [rows.at[p] for p in order]
        inputs = [[rows.last[r]] + list(ext) for r, ext in zip(conts, exts)]
        k, width, length = len(conts), max(map(len, inputs)), cache.layers[0].length
        need = length + width + max(max_tokens - rows.count[r] - len(ext) for r, ext in zip(conts, exts))
        cache.ensure_capacity(need)
        low = torch.finfo(cache.mask.dtype).min
        for j, r in enumerate(conts):  # columns other rows wrote while r was parked hold nothing of r's
            cache.mask[j, :, :, rows.parked_at[r]:length] = low
        pads = torch.tensor([width - len(x) for x in inputs], device=device)
        ids = torch.tensor([[self.pad_id] * (width - len(x)) + x for x in inputs], dtype=torch.long, device=device)
        start = torch.tensor([rows.start[r] + rows.count[r] - 1 for r in conts], device=device)  # the last token
        cols = torch.arange(width, device=device)
        position_ids = (start[:, None] - pads[:, None] + cols[None, :]).clamp_(min=0)
        real = cols[None, :] >= pads[:, None]                                      # [k, width] key is a real token
        mask = cache.block_mask(k, width, real)
        cache.set_batch(k)
        kw = {self._logits_kw: 1} if self._logits_kw else {}
        logits = self._forward(input_ids=ids, position_ids=position_ids, attention_mask=mask, cache=cache, **kw)[:, -1, :]
        cache.keep_columns(length, real)
        for r, ext in zip(conts, exts):
            rows.count[r] += len(ext)
            if rows.drafter is not None:
                rows.drafter.extend(r, list(ext))
        if rows.seen is not None:  # batch position j is conts[j] now
            for j, x in enumerate(exts):
                if x:
                    rows.seen[j, torch.tensor(x, dtype=torch.long, device=device)] = True
        return logits

    def _decode_batch_fn(self) -> Callable[[list[list[int]]], list[str]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True)
        return lambda seqs: [self.tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


class _Rows:
    """Per wave row: its sample, the position of its first completion token (prompt length + the
    shift its images make), the uniforms of its completion tokens, the completion tokens so far
    (`count`, updated when a turn ends or is extended), its last sampled token and the cache length
    when it was parked; `at[p]` is the row at batch position p (a permutation of the rows); `seen`
    [rows, V], by batch position, the tokens of each row so far (for the repetition penalty);
    `drafter`, told every token of each row, when this wave decodes with drafts."""

    def __init__(self, sample_of: list[int], start: list[int], uniforms: torch.Tensor):
        n = len(sample_of)
        self.sample_of, self.start, self.uniforms = sample_of, start, uniforms
        self.count, self.last, self.parked_at = [0] * n, [0] * n, [0] * n
        self.at = list(range(n))
        self.seen: torch.Tensor | None = None
        self.drafter: Drafter | None = None
        self.accept: list[float] = []
        self.retry_at: list[int] = []


class _OneTurn:
    """The driver of single-turn sampling: records each sample's one turn and never continues."""

    def __init__(self, n_samples: int):
        self.tokens: list[list[int]] = [[] for _ in range(n_samples)]
        self.logprobs: list[list[float]] = [[] for _ in range(n_samples)]
        self.reasons: list[Literal["stop", "length"]] = ["length"] * n_samples

    def turn_ended(self, sample: int, token_ids: list[int], logprobs: list[float],
                   finish_reason: Literal["stop", "length"]) -> None:
        self.tokens[sample], self.logprobs[sample], self.reasons[sample] = token_ids, logprobs, finish_reason

    def continuations(self) -> dict[int, list[int]]:
        return {}
