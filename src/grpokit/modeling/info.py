"""Facts about a transformers model, read through its wrappers once: the base model under DDP /
FSDP / PEFT (`unwrap`), its text config, whether its lm_head is a plain linear map, and the
`ModelInfo` record the training forward's plan carries (so that no forward re-probes the model)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grpokit.modeling.prefix import supports_packed
from grpokit.modeling.vision import is_vision_model, uses_mrope, vision_tower_trained


def unwrap(model):
    """The transformers model under DDP/FSDP/PEFT wrappers (LoRA layers stay injected in it)."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def plain_linear_head(model) -> torch.nn.Linear | None:
    """The lm_head when logits are exactly hidden @ W.T (no bias, softcap or scale); else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if (type(head) is not torch.nn.Linear or head.bias is not None
            or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)):
        return None
    return head


def text_config(model):
    """The (unwrapped) model's text config: its language model's, for a multimodal config; None
    without one."""
    cfg = getattr(unwrap(model), "config", None)
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg


@dataclass(frozen=True)
class ModelInfo:
    """What the training forward needs to know about a model, read once (`ModelInfo.of`) and
    carried by the plan, so that no forward re-probes the model. Facts only (no module
    references): a frozen reference copy shares its policy's."""

    plain_head: bool          # logits are exactly hidden @ lm_head.weight.T (the chunked lm_head applies)
    packable: bool            # the decoder takes the packed shared-prefix layout (with a plain head)
    vlm: bool                 # encodes images (get_image_features)
    mrope: bool               # 3-D M-RoPE positions (Qwen-VL families)
    per_layer_inputs: bool    # per-layer token embeddings (Gemma 3n / Gemma 4)
    router: bool              # a mixture of experts returning router logits (its load-balancing loss)
    vision_trained: bool      # some vision-tower parameter is trained (features with gradients)

    @classmethod
    def of(cls, model) -> "ModelInfo":
        inner = unwrap(model)
        text = text_config(inner)
        plain = plain_linear_head(inner) is not None
        vlm = is_vision_model(inner)
        return cls(plain_head=plain, packable=plain and supports_packed(inner), vlm=vlm,
                   mrope=vlm and uses_mrope(inner), per_layer_inputs=bool(getattr(text, "hidden_size_per_layer_input",
                                                                                  None)),
                   router=bool(getattr(text, "output_router_logits", False)),
                   vision_trained=vlm and vision_tower_trained(inner))

    def describe(self) -> str:
        kinds = [name for name, on in (("vision-language", self.vlm), ("M-RoPE", self.mrope),
                                       ("per-layer inputs", self.per_layer_inputs), ("mixture of experts", self.router))
                 if on]
        return "model: " + (", ".join(kinds) if kinds else "text") + (
            "; vision tower trained" if self.vision_trained else "")
