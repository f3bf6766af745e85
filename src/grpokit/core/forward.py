"""The one training forward, and the plan that says how it runs, chosen once at start-up.

`completion_logprobs(model, mb, ...)` gives per-token logprobs [B, C] of a micro-batch's
completion tokens (and entropies, and a value head's values read off the same hidden states for
PPO). It computes each prompt of a micro-batch once for all its completions and packs the
sequences without padding (grpokit.modeling.prefix); models whose attention cannot take that layout
get the padded one (left-padded prompt | right-padded completion). External segments (tool or
environment tokens) are in the sequence like any other token: they are context, and the
micro-batch's `completion_mask` keeps them out of the loss.

`ForwardPlan` holds every speed decision of the training forward (packed or padded, where the
prefix-attention kernel takes over from dense masked attention, micro-batch merging, skipping
zero-advantage completions, the lm_head chunk, reuse of the sampler's logprobs, the reference),
made once by `choose_forward_plan`, printed in the start-up summary and passed explicitly; a
benchmark ablation or a test selects a part of it by argument (`overrides`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch

from grpokit.algos import LOSS_TYPES, chunked_logprobs, entropy_from_logits, is_local_mean, selective_log_softmax
from grpokit.core.batch import MicroBatch, make_micro_batches
from grpokit.rollout.base import capabilities_of
from grpokit.modeling.info import ModelInfo, text_config, unwrap
from grpokit.modeling.prefix import DENSE_ROW_TOKENS, MAX_SEGMENT_TOKENS, packed_hidden, scatter_to_grid
from grpokit.modeling.vision import multimodal_base, packed_inputs, padded_inputs
from grpokit.trajectory import Trajectories


def router_balance_loss(model, router_logits, attention_mask=None) -> torch.Tensor:
    """The model family's own load-balancing loss (transformers' `load_balancing_loss_func` of its
    modeling module) over `router_logits` (one [tokens, experts] tensor per MoE layer)."""
    import sys

    inner = unwrap(model)
    fn = getattr(sys.modules.get(type(inner).__module__), "load_balancing_loss_func", None)
    if fn is None:
        raise ValueError(f"{type(inner).__name__} returns router logits but its module has no "
                         "load_balancing_loss_func; set output_router_logits=False in its config.")
    cfg = text_config(inner)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None) or cfg.n_routed_experts
    return fn(tuple(router_logits), experts, cfg.num_experts_per_tok, attention_mask)


def uses_packed_forward(model) -> bool:
    """Whether `completion_logprobs` takes the shared-prefix packed path for this model."""
    return ModelInfo.of(model).packable


CPU_CHUNK_BYTES = 32 << 20
"""On CPU, rows per lm_head chunk are sized so one float32 [rows, V] buffer is about 32 MiB: glibc
serves such buffers from its heap after the first one (bigger ones are mmap'ed and page-faulted
afresh every time), and two of them are the logprob pass's whole extra memory."""


def lm_head_chunk_rows(head: torch.nn.Linear, chunk_size: int | None = None) -> int:
    """Rows of completion positions per lm_head chunk (see CPU_CHUNK_BYTES; 1024 on GPU)."""
    if chunk_size is not None:
        return chunk_size
    if head.weight.device.type == "cpu":
        return max(16, CPU_CHUNK_BYTES // (4 * head.weight.shape[0]))
    return 1024


def completion_logprobs(model, mb: MicroBatch, *, temperature: float, with_entropy: bool = False,
                        chunk_size: int | None = None, packed: bool | None = None,
                        max_segment_tokens: int = MAX_SEGMENT_TOKENS, dense_row_tokens: int = DENSE_ROW_TOKENS,
                        value_head=None, router_aux: bool = False, info: ModelInfo | None = None,
                        image_features=None):
    """Per-token logprobs [B, C] of the completion tokens under `model` (at `temperature`), and
    their entropies when asked (0 on padding): `(logps, entropy or None)`, or with a
    `value_head` (a module mapping hidden states [..., H] to values [...], PPO's critic)
    `(logps, entropy or None, values [B, C])`: the value of the state before each token, read off
    the same hidden states (the one that predicts token t values "prompt + t tokens").

    `packed` (default: whenever the model supports it, see `uses_packed_forward`; the trainer
    passes its ForwardPlan's choice): each prompt once per group, no padding
    (grpokit.modeling.prefix; one group a row: on CPU, rows that join several short groups saved
    padding but lost more in the masked attention), rows longer than `dense_row_tokens` through
    the prefix-attention kernel. Otherwise the padded [B, P + C] layout. Either way only the
    completion positions go through the lm_head, `chunk_size` rows at a time (None: ~32 MiB of
    fp32 logits on CPU, 1024 rows on GPU), so no [B, P+C, V] (or full [K, V] fp32) logits
    tensor is ever kept. `router_aux=True` (a mixture-of-experts model): the model's own
    load-balancing loss over the tokens of the forward is appended to the returned tuple.
    `info`: the model's facts (the run passes its plan's, read once); None reads them now.
    `image_features`: the step's image-feature cache (grpokit.modeling.vision.ImageFeatures; the
    run's), so each distinct prompt's images are encoded once (with a frozen tower, once a step).
    A micro-batch holding images in tool results takes the padded layout (the plan says so)."""
    t = temperature if temperature > 0 else 1.0
    info = info if info is not None else ModelInfo.of(model)
    inner = unwrap(model)
    head = inner.get_output_embeddings() if info.plain_head else None
    if head is not None:
        chunk_size = lm_head_chunk_rows(head, chunk_size)
    if packed is None:
        packed = info.packable
    shape = (int(mb.completion_ids.shape[0]), int(mb.completion_ids.shape[1]))
    # prompts with images: features once per distinct prompt (grpokit.modeling.vision), with gradients
    # only when the vision tower is trained
    tool_images = mb.completion_vision is not None and any(v is not None for v in mb.completion_vision)
    vision = tool_images or (mb.vision is not None and any(v is not None for v in mb.vision))
    vision_grad = vision and info.vision_trained
    if tool_images:  # images inside completions (tool results): the padded layout places them
        packed = False

    aux: list = []  # the router's load-balancing loss, when asked

    def done(logps, entropy, hidden_to_grid):
        out = (logps, entropy if with_entropy else None)
        out = out if value_head is None else out + (hidden_to_grid(value_head),)
        return out + (aux[0] if aux else torch.zeros((), device=logps.device),) if router_aux else out

    if packed:
        if head is None or not info.packable:
            raise ValueError(f"{type(inner).__name__} cannot take the packed shared-prefix forward "
                             "(needs eager/sdpa full attention and a plain linear lm_head); use packed=False.")
        layout = mb.layout(max_segment_tokens)
        if layout.targets.numel() == 0:  # every completion empty: nothing to score
            # (0 times a trained parameter, so that backward runs: with LoRA the head is frozen)
            trained = next((q for q in inner.parameters() if q.requires_grad), head.weight)
            zeros = torch.zeros(shape, device=mb.device) + 0.0 * trained.sum()
            return done(zeros, zeros, lambda vh: zeros + 0.0 * sum(p.sum() for p in vh.parameters()))
        # the backbone call goes through the module that holds the LoRA layers (if any); with images,
        # the multimodal base model (vision tower + language model) with the features once per group
        extra = None
        if vision:
            decoder = multimodal_base(inner)
            extra = packed_inputs(inner, mb, layout, image_features, grad=vision_grad)
        else:
            decoder = inner.get_decoder()
        decoded = packed_hidden(decoder, layout, next(decoder.parameters()).dtype, dense_row_tokens=dense_row_tokens,
                                router_logits=router_aux, extra=extra)
        hidden: torch.Tensor
        if router_aux:
            hidden, routed = decoded
            aux.append(router_balance_loss(inner, routed))
        else:
            hidden = decoded
        if hidden.dtype != head.weight.dtype:  # cast_lm_head_to_fp32: the head's matmul in float32
            hidden = hidden.to(head.weight.dtype)
        out = chunked_logprobs(hidden, head.weight, layout.targets, temperature=t, chunk_size=chunk_size,
                               return_entropy=with_entropy)
        logps, entropy = (cast(tuple[torch.Tensor, torch.Tensor], out) if with_entropy
                          else (cast(torch.Tensor, out), None))
        return done(scatter_to_grid(logps, layout, shape),
                    scatter_to_grid(entropy, layout, shape) if entropy is not None else None,
                    lambda vh: scatter_to_grid(vh(hidden), layout, shape))
    p, c = mb.prompt_width, shape[1]
    inputs = (padded_inputs(inner, mb, image_features, grad=vision_grad) if vision else
              {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "position_ids": mb.position_ids})
    if head is not None and hasattr(inner, "get_decoder"):
        backbone = multimodal_base(inner) if vision else inner.get_decoder()
        states = backbone(**inputs, use_cache=False, **({"output_router_logits": True} if router_aux else {}))
        if router_aux:
            aux.append(router_balance_loss(inner, states.router_logits, mb.attention_mask))
        hidden = states.last_hidden_state[:, p - 1:p - 1 + c]  # position t predicts token t+1
        out = chunked_logprobs(hidden, head.weight, mb.completion_ids, temperature=t,
                               chunk_size=chunk_size, return_entropy=with_entropy)
        logps, entropy = (cast(tuple[torch.Tensor, torch.Tensor], out) if with_entropy
                          else (cast(torch.Tensor, out), None))
        return done(logps, entropy, lambda vh: vh(hidden))
    out = model(**inputs, use_cache=False, output_hidden_states=value_head is not None,
                **({} if value_head is not None else {"logits_to_keep": c + 1}),
                **({"output_router_logits": True} if router_aux else {}))
    if router_aux:
        aux.append(out.aux_loss)
    logits = out.logits[:, -(c + 1):-1] / t
    logps = selective_log_softmax(logits, mb.completion_ids)
    return done(logps, entropy_from_logits(logits.detach()) if with_entropy else None,
                lambda vh: vh(out.hidden_states[-1][:, p - 1:p - 1 + c]))


def score_with_training_forward(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], images: list,
                                *, temperature: float, pad_id: int, device: torch.device,
                                image_features=None) -> torch.Tensor:
    """Logprobs [N, longest completion] of sampled completions (prompt i, completion i, prompt i's
    images) under `model` by the padded training forward: how the hf-generate engine scores what
    a `generate` without scores sampled for prompts with images."""
    n = len(prompt_ids)
    traj = Trajectories(row_index=list(range(n)), prompts=[None] * n, completions=[None] * n,
                        prompt_ids=[list(p) for p in prompt_ids], completion_ids=completion_ids,
                        sampling_logps=[[0.0] * len(c) for c in completion_ids],
                        truncated=torch.zeros(n, dtype=torch.bool), images=images)
    (mb,) = make_micro_batches(traj, n, pad_id=pad_id, device=device, mask_truncated=False)
    return completion_logprobs(model, mb, temperature=temperature, packed=False, image_features=image_features)[0]


def sampler_logps_are_old_logps(model, engine, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                                min_p: float | None = None, repetition_penalty: float = 1.0) -> bool:
    """Whether the sampler's per-token logprobs can stand in for the old policy's (num_iterations > 1).

    True for an engine that declares `exact_fp32_logprobs` (grpokit's HF engine on float32/float64
    weights without active dropout: it samples in eval mode) and samples the training module
    itself, at temperature > 0 with no top-p/top-k/min-p truncation and no repetition penalty (the
    sampled distribution is then the trainer's softmax(logits / T)). Both logprobs are then the
    same function of the same weights, computed in a different batch layout: measured on
    Qwen2/Llama/GPT-2 (tiny and the ~25M benchmark model, T = 1 and 0.7), max |sampler - trainer| =
    1e-6 to 8e-6 nats, i.e. importance ratios within 1e-5 of 1, the same size as the
    packed-vs-padded difference of the training forward itself (tests/unit/test_batch.py). bf16 is
    not covered by that measurement, so it keeps computing (the trainer's module is checked too: it
    may have been cast since the engine declared)."""
    caps = capabilities_of(engine)
    if not caps.exact_fp32_logprobs or caps.sampler_differs_from_trainer or temperature <= 0:
        return False
    if top_p < 1.0 or (top_k or 0) > 0 or (min_p or 0.0) > 0 or repetition_penalty != 1.0:
        return False
    inner = unwrap(model)
    if not {p.dtype for p in inner.parameters()} <= {torch.float32, torch.float64}:
        return False
    return unwrap(engine.model) is inner


# --------------------------------------------------------------------------------------------
# the forward plan
# --------------------------------------------------------------------------------------------

OLD_LOGPS = ("current", "sampler", "recomputed")
REFERENCES = ("none", "adapter_off", "frozen_copy")


@dataclass(frozen=True)
class ForwardPlan:
    """How the training forward runs, decided once (`choose_forward_plan`)."""

    packed: bool                  # shared-prefix packed layout (else padded)
    chunk_rows: int | None        # completion positions per lm_head chunk (None: no plain linear head)
    dense_row_tokens: int = DENSE_ROW_TOKENS   # packed rows up to this many tokens: dense masked attention
    max_segment_tokens: int = MAX_SEGMENT_TOKENS
    merge: bool = False           # join micro-batches into fewer forwards (additive losses only)
    skip_zero_advantage: bool = False   # leave advantage-0 completions out of the forward (beta = 0)
    never_empty: bool = False     # several ranks: every forward runs the whole model (same collectives)
    old_logps: str = "current"    # current (num_iterations = 1) | sampler (reused) | recomputed once per batch
    reference: str = "none"       # none (beta = 0) | adapter_off (LoRA) | frozen_copy
    sampler_differs: bool = False    # the engine samples from another copy of the policy (vLLM): its log-probs
                                     # feed the importance-sampling correction and the off-policy mask
    model: ModelInfo | None = None   # the model's facts, read once (None: each forward reads them)
    tool_images_padded: bool = False  # micro-batches holding images in tool results take the padded layout

    def __post_init__(self):
        if self.old_logps not in OLD_LOGPS:
            raise ValueError(f"ForwardPlan.old_logps={self.old_logps!r}: use one of {', '.join(OLD_LOGPS)}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"ForwardPlan.reference={self.reference!r}: use one of {', '.join(REFERENCES)}.")

    def forward_kwargs(self) -> dict[str, Any]:
        """The arguments of `completion_logprobs` that this plan fixes."""
        return {"packed": self.packed, "chunk_size": self.chunk_rows, "max_segment_tokens": self.max_segment_tokens,
                "dense_row_tokens": self.dense_row_tokens, "info": self.model}

    def describe(self) -> list[str]:
        """The summary's lines: what the training forward does, and what it skips."""
        layout = (f"packed shared-prefix rows (each prompt once per micro-batch, no padding; prefix-attention "
                  f"kernel on rows over {self.dense_row_tokens} tokens)" if self.packed
                  else "padded rows (left-padded prompt | right-padded completion)")
        lines = [f"forward: {layout}; lm_head in chunks of "
                 + (f"{self.chunk_rows} positions" if self.chunk_rows else "full logits (no plain linear head)")]
        extras = [("micro-batches merged while they fit one padded micro-batch" if self.merge else None),
                  ("advantage-0 completions left out of the forward" if self.skip_zero_advantage else None),
                  ("every rank runs as many whole-model forwards as the others" if self.never_empty else None)]
        if self.packed and self.tool_images_padded:
            extras.append("micro-batches holding images in tool results: padded rows (they place the images)")
        if any(extras):
            lines.append("  " + "; ".join(e for e in extras if e))
        lines.append({"current": "skipped: old logprobs (num_iterations=1: they equal the current ones)",
                      "sampler": "old logprobs: the sampler's, reused (same weights, fp32, untruncated sampling)",
                      "recomputed": "old logprobs: computed once per generated batch"}[self.old_logps])
        lines.append({"none": "skipped: reference model (beta=0)",
                      "adapter_off": "reference: base model with the adapter off (LoRA)",
                      "frozen_copy": "reference: frozen copy of the initial model"}[self.reference])
        return lines


def choose_forward_plan(cfg, model, engine, *, world_size: int, is_peft: bool, needs_reference: bool,
                        overrides: dict[str, Any] | None = None, external_sampler: bool = False,
                        tool_images: bool = False) -> ForwardPlan:
    """Every decision of the training forward for this run's config, model and engine.

    `external_sampler`: the completions come from elsewhere (TRL's rollout_func), so their
    log-probs are not known to be the trainer's: the old policy's are recomputed (TRL's meaning;
    the sampler's feed only the importance-sampling correction where it is on), unless the caller
    declares them the trainer's own with the override `{"old_logps": "sampler"}`.

    `overrides` replaces fields of the result (benchmark ablations, tests): e.g.
    `{"packed": False}`, `{"merge": False}`, `{"skip_zero_advantage": False}`,
    `{"dense_row_tokens": 1 << 30}`; a field that would make the run wrong (packed on a model that
    cannot take it, merging a per-micro-batch loss) is an error. `tool_images`: tool results may
    hold images (a vision-language model with tools): such micro-batches take the padded layout.
    The model's facts are read here, once (`ModelInfo`), and carried by the plan."""
    inner = unwrap(model)
    info = ModelInfo.of(model)
    head = inner.get_output_embeddings() if info.plain_head else None
    # pad_to_multiple_of asks for fixed padded shapes: the padded layout (the packed one has no padding)
    packed = info.packable and not cfg.pad_to_multiple_of
    # the algorithm's config says whether its loss is a mean per micro-batch (GRPO's: its aggregation's entry)
    local_means = cfg.loss_is_local_mean()
    # the entropy mask (a per-micro-batch quantile) and the entropy bonus (a per-micro-batch mean,
    # zero-advantage tokens included) are defined per micro-batch of TRL's layout
    # (so is a MoE router's load-balancing loss: a mean over each micro-batch's tokens, all rows)
    entropy_mask = cfg.per_micro_batch_terms() or info.router
    old = "current"
    # off-policy updates on one generation: num_iterations passes, or steps_per_generation chunks
    reused = cfg.reuses_generation()
    if reused:
        sampling = cfg.sampling()
        old = "sampler" if not external_sampler and not cfg.samples_stale() and sampler_logps_are_old_logps(
            model, engine, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
            min_p=sampling["min_p"], repetition_penalty=sampling["repetition_penalty"]) else "recomputed"
    fields: dict[str, Any] = dict(
        packed=packed,
        chunk_rows=lm_head_chunk_rows(head) if head is not None else None,
        # micro-batches may be joined when the loss is a plain sum over them (global normalisers:
        # not the local means: grpo, bnpo, sapo, luspo) and no entropy mask or bonus is on
        merge=packed and not local_means and not entropy_mask,
        skip_zero_advantage=not cfg.penalises_reference() and not entropy_mask,
        never_empty=world_size > 1,
        old_logps=old,
        reference="none" if not needs_reference else ("adapter_off" if is_peft else "frozen_copy"),
        model=info, tool_images_padded=tool_images,
        # a generation worker sampling ahead (max_staleness > 0) samples from older weights
        sampler_differs=capabilities_of(engine).sampler_differs_from_trainer or cfg.samples_stale(),
    )
    for key, value in (overrides or {}).items():
        if key not in {f.name for f in dataclasses.fields(ForwardPlan)}:
            raise ValueError(f"forward_plan: unknown field {key!r}; the fields are "
                             f"{', '.join(f.name for f in dataclasses.fields(ForwardPlan))}.")
        fields[key] = value
    plan = ForwardPlan(**fields)
    if plan.packed and not packed:
        raise ValueError(f"forward_plan: packed=True, but {type(inner).__name__} cannot take the packed forward.")
    if plan.merge and (local_means or entropy_mask or not plan.packed):
        raise ValueError("forward_plan: merge=True needs the packed forward and a loss with global normalisers "
                         f"(not the local means {', '.join(t for t in LOSS_TYPES if is_local_mean(t))}) without the entropy mask or "
                         "bonus.")
    if plan.skip_zero_advantage and (cfg.penalises_reference() or entropy_mask):
        raise ValueError("forward_plan: skip_zero_advantage=True needs beta=0 and no entropy mask or bonus.")
    if plan.old_logps == "sampler" and old != "sampler" and not external_sampler:
        raise ValueError("forward_plan: old_logps='sampler', but the sampler's logprobs are not the old policy's here.")
    if world_size > 1 and not plan.never_empty:
        raise ValueError("forward_plan: never_empty=False on several ranks would let their collectives differ.")
    return plan
