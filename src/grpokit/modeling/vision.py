"""Vision-language models in the rollout and the training forward: image features once per group.

A transformers vision-language model (`AutoModelForImageTextToText`: Qwen2-VL, Qwen2.5-VL,
LLaVA, LLaVA-NeXT, Gemma 3, ...) encodes a prompt's images with its vision tower (and projector)
into features that replace the prompt's image tokens. The G completions of a group share the
prompt, so its features are computed once (`ImageFeatures.of`) and handed to the model for every
row that holds the prompt, through transformers' precomputed `mm_encoder_outputs` argument: the
model then merges them and does everything else of its family itself (Qwen's 3-D M-RoPE
positions, Gemma 3's bidirectional attention over image tokens). With the vision tower frozen
(no trainable parameter in it), the features of a step are computed once, without gradients,
and serve the rollout's prefill and every training forward of the step; with it trained, once per
group in each training forward, with gradients (the rows' copies are one tensor indexed, so the
tower gets the sum of their gradients).

The packed shared-prefix layout (grpokit.modeling.prefix) carries the image tokens in each segment's
prompt; the multimodal base model takes the packed rows with the features in row order, the
4-D mask and explicit positions: for M-RoPE families, each prompt's 3-D positions
(`rope_positions`, the model's own `get_rope_index`) and, for its completions, the text positions
shifted by the prompt's delta, as in the plain layout.
"""

from __future__ import annotations

from typing import Any

import torch

from grpokit.data.vision import VisionInputs


def is_vision_model(model) -> bool:
    """Whether the (unwrapped) model encodes images (has the multimodal `get_image_features`)."""
    return callable(getattr(model, "get_image_features", None)) and hasattr(getattr(model, "config", None),
                                                                           "vision_config")


def multimodal_base(model):
    """The multimodal base model (vision tower + language model, no lm_head): `model.model`."""
    base = getattr(model, "model", None)
    if base is None or not callable(getattr(base, "get_image_features", None)):
        raise TypeError(f"{type(model).__name__} has no multimodal base model (.model with get_image_features).")
    return base


def uses_mrope(model) -> bool:
    """Whether positions are the 3-D M-RoPE of the Qwen-VL families (`get_rope_index`)."""
    return callable(getattr(getattr(model, "model", None), "get_rope_index", None))


def language_model_names(model) -> list[str]:
    """Module-name prefixes of the language model inside a vision-language model (LoRA's default
    targets are restricted to them, so the vision tower stays as it is)."""
    base = getattr(model, "model", None)
    lm = getattr(base, "language_model", None)
    for name, module in model.named_modules():
        if module is lm:
            return [name]
    return []


def language_model_lora_targets(model, target_modules=None) -> str:
    """LoRA's target modules of a vision-language model, kept to its language model (a regex for
    peft): `target_modules` None or "all-linear" means every linear layer of the language model,
    a list of names those of its layers with one of the names."""
    import re

    prefixes = language_model_names(model)
    if not prefixes:
        raise ValueError(f"{type(model).__name__}: cannot find the language model to put the LoRA adapter in.")
    inside = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and any(name.startswith(p + ".") for p in prefixes)]
    if target_modules in (None, "all-linear"):
        leaves = sorted({name.rsplit(".", 1)[-1] for name in inside})
    else:
        leaves = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    alternatives = "|".join(re.escape(p) for p in prefixes)
    return rf"^(?:{alternatives})\..*\.(?:{'|'.join(re.escape(x) for x in leaves)})$"


def vision_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The vision tower's and projector's parameters: those outside the language model and lm_head."""
    lm = set(language_model_names(model))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    out = []
    for name, p in model.named_parameters():
        if id(p) in head_ids or any(name == n or name.startswith(n + ".") for n in lm):
            continue
        out.append((name, p))
    return out


def vision_tower_trained(model) -> bool:
    """Whether any vision parameter is trained (then features are recomputed with gradients)."""
    return any(p.requires_grad for _, p in vision_parameters(model))


class ImageFeatures:
    """Image features of the prompts of a step, one vision-tower call per distinct prompt.

    `of(model, v)` computes (and, when the tower is frozen, caches for the step) the pooled
    output of `get_image_features` for VisionInputs `v`; `calls` counts the tower's calls."""

    def __init__(self):
        self._cache: dict[tuple[int, int], tuple[VisionInputs, Any]] = {}
        self.calls = 0

    def clear(self) -> None:
        self._cache.clear()

    def of(self, model, v: VisionInputs, *, grad: bool):
        key = (id(model), id(v))  # the policy's and a frozen reference copy's towers differ
        if not grad and key in self._cache:
            return self._cache[key][1]
        base = multimodal_base(model)
        device = next(model.parameters()).device
        kwargs = {k: t.to(device) for k, t in v.tensors.items()}
        pixel_values = kwargs.pop("pixel_values")
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out = base.get_image_features(pixel_values, **kwargs, return_dict=True)
        self.calls += 1
        pooled = out.pooler_output
        if not grad:
            self._cache[key] = (v, pooled)  # v kept alive: its id stays its own
        return pooled


def join_features(pooled: list) -> Any:
    """The features of several prompts' images in the form the family's forward takes: a tuple of
    per-image tensors where `get_image_features` gives a sequence, else one tensor (concatenated)."""
    if isinstance(pooled[0], (list, tuple)):
        return tuple(t for p in pooled for t in p)
    return torch.cat(list(pooled), dim=0)


def encoder_outputs(pooled: list) -> dict:
    """transformers' `mm_encoder_outputs` for the images of `pooled` (in token order)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return {"image": BaseModelOutputWithPooling(pooler_output=join_features(pooled))}


def image_kwargs(visions: list[VisionInputs]) -> dict[str, torch.Tensor]:
    """The per-image tensors besides pixel values (image_grid_thw, image_sizes, ...), of
    `visions`' images in order (the model reads them next to precomputed features)."""
    keys = [k for k in visions[0].tensors if "pixel" not in k] if visions else []
    return {k: torch.cat([v.tensors[k] for v in visions], dim=0) for k in keys}


def rope_positions(model, v: VisionInputs, prompt_ids: list[int]) -> tuple[torch.Tensor, int]:
    """M-RoPE: the prompt's [3, P] positions and its delta (text positions after the prompt are
    `index + delta` on all three axes), from the model's own `get_rope_index`; cached on `v`."""
    key = ("rope", id(model))
    if key not in v.cache:
        base = multimodal_base(model)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        kw = {k: t for k, t in v.tensors.items() if k in ("image_grid_thw",)}
        if "mm_token_type_ids" in v.token_tensors:
            kw["mm_token_type_ids"] = v.token_tensors["mm_token_type_ids"]
        pos, delta = base.get_rope_index(ids, **kw)
        v.cache[key] = (pos[:, 0], int(delta.reshape(-1)[0]))
    return v.cache[key]


def position_offset(model, v: VisionInputs | None, prompt_ids: list[int]) -> int:
    """What a prompt's images add to the position of each token after it (M-RoPE's delta; 0 else)."""
    if v is None or not uses_mrope(model):
        return 0
    return rope_positions(model, v, prompt_ids)[1]


def distinct(visions: list[VisionInputs | None]) -> tuple[list[VisionInputs], list[int]]:
    """The distinct VisionInputs of `visions` (by identity, first-seen order) and, per entry, its
    index among them (-1 for None)."""
    seen: dict[int, int] = {}
    out: list[VisionInputs] = []
    index = []
    for v in visions:
        if v is None:
            index.append(-1)
            continue
        if id(v) not in seen:
            seen[id(v)] = len(out)
            out.append(v)
        index.append(seen[id(v)])
    return out, index


# --------------------------------------------------------------------------------------------
# the training forward's model inputs
# --------------------------------------------------------------------------------------------

def _features(model, visions: list[VisionInputs], features: ImageFeatures | None, grad: bool) -> list:
    features = features if features is not None else ImageFeatures()
    return [features.of(model, v, grad=grad) for v in visions]


def image_token_id(model) -> int:
    """The id of the token that stands for image features in the model's prompts."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}'s config names no image token (image_token_id / image_token_index).")


def _embeds(model, input_ids, prompt_image_mask, pooled: list):
    """Token embeddings with the image slots (`prompt_image_mask`: the prompts' image tokens and
    the images of tool results) replaced by their features. An image token the model sampled in a
    completion is an ordinary token, embedded as the rollout's decode step embedded it (the
    model's own merge would take it for a placeholder)."""
    embeds = multimodal_base(model).get_input_embeddings()(input_ids)
    if pooled:
        joined = join_features(pooled)
        flat = (torch.cat([t.reshape(-1, embeds.shape[-1]) for t in joined]) if isinstance(joined, tuple)
                else joined.reshape(-1, embeds.shape[-1]))
        n = int(prompt_image_mask.sum())
        if n != flat.shape[0]:
            raise ValueError(f"the prompts hold {n} image tokens for {flat.shape[0]} image features.")
        embeds = embeds.masked_scatter(prompt_image_mask[..., None].to(embeds.device), flat.to(embeds.dtype))
    return embeds


def _per_layer_inputs(model, input_ids, image_mask) -> dict[str, Any]:
    """Models with per-layer token embeddings (Gemma 3n / Gemma 4: `per_layer_inputs`) read them
    off the token ids, which a forward from `inputs_embeds` does not give: computed here from the
    ids with the prompt image tokens as padding, as the model's own forward does."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    lm = getattr(multimodal_base(model), "language_model", None)
    if not getattr(text, "hidden_size_per_layer_input", None) or lm is None or not hasattr(lm, "get_per_layer_inputs"):
        return {}
    pad = getattr(text, "pad_token_id", None) or 0
    return {"per_layer_inputs": lm.get_per_layer_inputs(torch.where(image_mask, pad, input_ids))}


def token_grids(prompt_visions: list, shape: tuple[int, int], width: int,
                completion_visions: list | None = None) -> dict[str, torch.Tensor]:
    """The per-token tensors (token_type_ids, mm_token_type_ids, ...) of a [rows, columns] token
    grid whose prompts are left-padded to `width`: row b's prompt values end at `width`, its
    completion images' values (`completion_visions[b]`) start there, 0 (text) elsewhere."""
    completion_visions = completion_visions or [None] * shape[0]
    keys = {k for v in list(prompt_visions) + list(completion_visions) if v is not None for k in v.token_tensors}
    grids = {}
    for key in sorted(keys):
        grid = torch.zeros(shape, dtype=torch.long)
        for b, (v, cv) in enumerate(zip(prompt_visions, completion_visions)):
            if v is not None and key in v.token_tensors:
                values = v.token_tensors[key].reshape(-1)
                grid[b, width - values.numel():width] = values
            if cv is not None and key in cv.token_tensors:
                values = cv.token_tensors[key].reshape(-1)
                grid[b, width:width + values.numel()] = values
        grids[key] = grid
    return grids


def padded_inputs(model, mb, features: ImageFeatures | None, *, grad: bool) -> dict[str, Any]:
    """Keyword arguments for the multimodal base model on the padded [B, P + C] layout of `mb`:
    the embeddings with each distinct prompt's image features (computed once) in its rows' image
    tokens, and each row's completion images (tool results, `mb.completion_vision`) in their slots;
    the per-image tensors of those images in token order; the per-token tensors laid out as the
    tokens (left-padded prompt, the completion's own, 0 elsewhere); and the positions (M-RoPE: the
    model's own `get_rope_index` over the batch)."""
    n_rows = mb.input_ids.shape[0]
    visions, index = distinct(mb.vision if mb.vision is not None else [None] * n_rows)
    pooled = _features(model, visions, features, grad)
    completion = mb.completion_vision if mb.completion_vision is not None else [None] * n_rows
    p = mb.prompt_width
    image_mask = torch.zeros(mb.input_ids.shape, dtype=torch.bool, device=mb.device)
    token = image_token_id(model)
    ordered, feats = [], []  # every image's VisionInputs and features, in token order (row by row)
    for b in range(n_rows):
        if index[b] >= 0:
            v = mb.vision[b]
            if v.slots is not None:  # a conversation's images so far (the rollout's whole-context scoring)
                image_mask[b, p - v.slots.numel():p] = v.slots.to(mb.device)
            else:
                image_mask[b, :p] = mb.input_ids[b, :p] == token
            ordered.append(v)
            feats.append(pooled[index[b]])
        cv = completion[b]
        if cv is not None:
            image_mask[b, p:p + cv.slots.numel()] = cv.slots.to(mb.device)
            ordered.append(cv)
            feats.append(_features(model, [cv], features, grad)[0])
    kw: dict[str, Any] = {"attention_mask": mb.attention_mask,
                          "inputs_embeds": _embeds(model, mb.input_ids, image_mask, feats),
                          **_per_layer_inputs(model, mb.input_ids, image_mask)}
    per_image = {k: t.to(mb.device) for k, t in image_kwargs(ordered).items()} if ordered else {}
    kw.update({k: t for k, t in per_image.items() if k != "image_grid_thw"})
    prompts = [mb.vision[b] if index[b] >= 0 else None for b in range(n_rows)]
    tokens = {k: t.to(mb.device) for k, t in token_grids(prompts, tuple(mb.input_ids.shape), p, completion).items()}
    if uses_mrope(model):
        kw["position_ids"], _ = multimodal_base(model).get_rope_index(
            mb.input_ids, mm_token_type_ids=tokens.get("mm_token_type_ids", torch.zeros_like(mb.input_ids)),
            image_grid_thw=per_image.get("image_grid_thw"), attention_mask=mb.attention_mask)
    else:
        kw["position_ids"] = mb.position_ids
    kw.update({k: t for k, t in tokens.items() if k != "mm_token_type_ids"})
    return kw


def packed_inputs(model, mb, layout, features: ImageFeatures | None, *, grad: bool) -> dict[str, Any]:
    """Keyword arguments for the multimodal base model on the packed rows of `layout` (besides
    its 4-D mask): the embeddings with each segment's prompt image features (once per distinct
    prompt) in its image tokens, and the positions (M-RoPE: each prompt's 3-D positions, its
    completions' text positions shifted by the prompt's delta)."""
    visions, index = distinct(mb.vision)
    pooled = _features(model, visions, features, grad)
    segs = [(start, p, length, b) for start, p, length, b in layout.segments if index[b] >= 0]
    width = layout.input_ids.shape[1]
    flat_ids = layout.input_ids.reshape(-1)
    image_mask = torch.zeros(flat_ids.shape, dtype=torch.bool, device=flat_ids.device)
    token = image_token_id(model)
    for start, p, _, _ in segs:
        image_mask[start:start + p] = flat_ids[start:start + p] == token
    grid_mask = image_mask.view(layout.input_ids.shape)
    kw: dict[str, Any] = {"inputs_embeds": _embeds(model, layout.input_ids, grid_mask,
                                                   [pooled[index[b]] for *_, b in segs]),
                          **_per_layer_inputs(model, layout.input_ids, grid_mask)}
    positions = layout.position_ids
    if uses_mrope(model):
        positions = positions[None].repeat(3, 1, 1)
        for start, p, length, b in segs:
            p3, delta = rope_positions(model, mb.vision[b], mb.prompt_token_ids[b])
            r, t0 = divmod(start, width)
            positions[:, r, t0:t0 + p] = p3.to(positions.device)
            positions[:, r, t0 + p:t0 + length] += delta
    kw["position_ids"] = positions
    return kw
