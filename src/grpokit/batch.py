"""Typed data between the steps of the loop, and the training forward that turns it into logprobs.

Shapes: N = prompts * G samples per step (groups contiguous: rows g*G .. g*G+G-1 share a prompt),
B = rows of one micro-batch, P = longest prompt of the micro-batch, C = longest completion.
A field never changes meaning on the way: `rewards` stay rewards, `advantages` are separate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpokit.algos import chunked_logprobs, entropy_from_logits, selective_log_softmax


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
    """Padded tensors of B samples: prompts left-padded to P, completions right-padded to C."""

    input_ids: torch.Tensor         # [B, P + C]
    attention_mask: torch.Tensor    # [B, P + C]
    position_ids: torch.Tensor      # [B, P + C]
    completion_ids: torch.Tensor    # [B, C]
    completion_mask: torch.Tensor   # [B, C] float: 1 = token in the loss
    advantages: torch.Tensor        # [B]
    sampling_logps: torch.Tensor    # [B, C] (0 where masked)
    rows: slice                     # which rows of the Rollout these are
    old_logps: torch.Tensor | None = None   # [B, C] when num_iterations > 1
    ref_logps: torch.Tensor | None = None   # [B, C] when beta > 0

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.completion_ids.shape[1]


def make_micro_batches(rollout: Rollout, size: int, *, pad_id: int, device, mask_truncated: bool) -> list[MicroBatch]:
    """Split the N samples into micro-batches of `size` consecutive rows (groups stay whole when
    size is a multiple of G) and pad each to its own longest prompt/completion."""
    out = []
    n = len(rollout.completion_ids)
    for start in range(0, n, size):
        rows = slice(start, min(start + size, n))
        p_ids, c_ids = rollout.prompt_ids[rows], rollout.completion_ids[rows]
        b, p, c = len(p_ids), max(map(len, p_ids)), max(map(len, c_ids))
        input_ids = torch.full((b, p + c), pad_id, dtype=torch.long)
        attention = torch.zeros((b, p + c), dtype=torch.long)
        comp_mask = torch.zeros((b, c))
        samp = torch.zeros((b, c))
        for i, (pi, ci) in enumerate(zip(p_ids, c_ids)):
            input_ids[i, p - len(pi):p] = torch.tensor(pi)
            input_ids[i, p:p + len(ci)] = torch.tensor(ci)
            attention[i, p - len(pi):p + len(ci)] = 1
            comp_mask[i, :len(ci)] = 1.0
            samp[i, :len(ci)] = torch.tensor(rollout.sampling_logps[rows][i], dtype=torch.float32)
        if mask_truncated:
            comp_mask[rollout.truncated[rows]] = 0.0
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        out.append(MicroBatch(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            position_ids=position_ids.to(device), completion_ids=input_ids[:, p:].to(device),
            completion_mask=comp_mask.to(device), advantages=rollout.advantages[rows].to(device),
            sampling_logps=samp.to(device), rows=rows,
        ))
    return out


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


def completion_logprobs(model, mb: MicroBatch, *, temperature: float, with_entropy: bool = False,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token logprobs [B, C] of the completion tokens under `model` (at `temperature`), and
    their entropies when asked. Only the C completion positions go through the lm_head, chunk by
    chunk, so no [B, P+C, V] (or full [B*C, V] fp32) logits tensor is ever kept."""
    t = temperature if temperature > 0 else 1.0
    inner = _unwrap(model)
    head = _plain_linear_head(inner)
    p, c = mb.prompt_width, mb.completion_ids.shape[1]
    if head is not None and hasattr(inner, "get_decoder"):
        # The backbone call goes through `model` pieces that hold the LoRA layers (if any).
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
