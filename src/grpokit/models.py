"""Load the policy and its tokenizer, add LoRA, get a reference model, save.

Every loader takes a hub id, a local directory or an already loaded object, so that a TRL-style
script (`GRPOTrainer(model="Qwen/...")` or `GRPOTrainer(model=my_model)`) and the CLI share one path.

Conventions:
- dtype "auto" means float32 on CPU (bf16 matmuls have no hardware support on most CPUs and are
  hundreds of times slower) and bf16 on CUDA when the card supports it (else float32).
- The reference of a LoRA model is the base model with the adapter switched off
  (`reference_logits_context`), never a second copy. Without LoRA, `load_reference_model` makes a
  frozen copy; it is only needed when beta > 0.
- A tokenizer without a pad token gets `pad_token = eos_token` (the usual choice for causal LMs).
  Code that builds labels must therefore mask padding by position (attention mask / lengths), never
  by `input_ids == pad_token_id`, or the model never learns to emit EOS.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import string
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from grpokit.modeling.known import canonical_name, dequantizing, drop_quantization_config, is_gguf, resolve_model
from grpokit.modeling.tokenizers import load_pretrained_tokenizer

__all__ = [
    "CHAR_TOKENIZER_SPECIALS",
    "apply_lora",
    "default_dtype",
    "load_model",
    "load_reference_model",
    "load_tokenizer",
    "new_char_tokenizer",
    "new_chat_tokenizer",
    "new_model_from_config",
    "new_vision_model",
    "new_vision_processor",
    "reference_logits_context",
    "resolve_device",
    "resolve_dtype",
    "save_model",
    "starter_model_path",
]

# Special tokens of the character-level tokenizer, in id order (pad=0, bos=1, eos=2, unk=3).
CHAR_TOKENIZER_SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


# --------------------------------------------------------------------------------------------
# devices and dtypes
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto"/None -> cuda if available else cpu; anything else is passed to torch.device."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: str | torch.device | None = "cpu") -> torch.dtype:
    """The compute dtype we default to on `device`: bf16 on CUDA if supported, else float32."""
    device = resolve_device(device)
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_DTYPE_NAMES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = "cpu") -> torch.dtype:
    """Turn "auto"/None/"bf16"/"float32"/torch.dtype into a torch.dtype for `device`."""
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r} is not understood; use 'auto', 'float32', 'bfloat16' or 'float16'")
    return _DTYPE_NAMES[key]


# --------------------------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------------------------


def new_char_tokenizer(chat_template: str | None = None):
    """A character-level tokenizer over printable ASCII, built with the `tokenizers` library.

    Every character is one token (WordLevel over single characters); ids 0-3 are
    <pad>, <bos>, <eos>, <unk>; nothing is added automatically around the text (no BOS/EOS
    post-processor), so `decode(encode(s)) == s` for printable ASCII. Returns a
    `PreTrainedTokenizerFast` with pad/bos/eos/unk set and right padding (use `load_tokenizer`
    or set `padding_side` for generation).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate([*CHAR_TOKENIZER_SPECIALS, *chars])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    pad, bos, eos, unk = CHAR_TOKENIZER_SPECIALS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\ntools:' }}{%- for t in tools %}{%- set f = t.function if t.function is "
    "defined else t %}{{ ' ' + f.name + '(' + (f.parameters.properties | list | join(', ')) + ')' }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}{{ '<|im_start|>assistant\\n' + (m.content or '') }}"
    "{%- for tc in (m.tool_calls or []) %}{%- set f = tc.function if tc.function is defined else tc %}"
    "{{ '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments if f.arguments is string "
    "else f.arguments | tojson) + '}\\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}{{ '<|im_start|>user\\n<tool_response>\\n' + (m.content | string) + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + (m.content | string) + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""The chat template of `new_chat_tokenizer`: Qwen's turn markers and tool-call format (JSON in
<tool_call> tags, results in <tool_response> tags as a user turn), with the tools listed in one
short system line (`tools: multiply(a, b)`) instead of their whole JSON schema."""


def new_chat_tokenizer():
    """The character-level tokenizer with chat and tool-calling tokens: `<|im_start|>` and
    `<|im_end|>` (the EOS: a turn ends on it) as special tokens, the four tool tags as single
    tokens, `CHAT_TEMPLATE`, and transformers' `response_template` for parsing tool calls (saved
    with the tokenizer). The built-in tool tasks' starter model uses it."""
    from grpokit.envs.chat import QWEN_JSON

    tokenizer = new_char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS)})
    tokenizer.add_tokens(list(TOOL_TOKENS))
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.response_template = QWEN_JSON
    return tokenizer


VISION_FAMILIES = {
    # family: (processor class, image processor class, image placeholder tokens, model config kwargs)
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLImageProcessorPil", ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")),
    "llava": ("LlavaProcessor", "CLIPImageProcessorPil", ("<image>",)),
}
"""The vision-language families `new_vision_processor` / `new_vision_model` build from scratch."""


def vision_chat_template(placeholder: str) -> str:
    """`CHAT_TEMPLATE` for messages whose content is a string or a list of parts: an image part
    becomes `placeholder` (which the processor expands into the image's tokens), a text part its text."""
    content = ("{%- if m.content is string %}{{ m.content }}{%- else %}{%- for part in m.content %}"
               "{%- if part.type == 'image' %}{{ '" + placeholder + "' }}{%- elif part.type == 'text' %}"
               "{{ part.text }}{%- endif %}{%- endfor %}{%- endif %}")
    return ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' }}" + content + "{{ '<|im_end|>\\n' }}"
            "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")


def new_vision_processor(family: str = "qwen2_vl", image_size: int = 56):
    """A processor for a from-scratch vision-language model of `family` ("qwen2_vl" or "llava"):
    the chat tokenizer (`new_chat_tokenizer`, with the family's image tokens), the family's image
    processor (PIL backend; images resized to about `image_size` pixels a side) and
    `vision_chat_template`. The built-in vision task's starter model and the tests use it."""
    import transformers.models.auto.image_processing_auto  # noqa: F401  (registers the image processors)
    import importlib

    from grpokit.data.vision import make_processor

    if family not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {family!r}; use one of {', '.join(VISION_FAMILIES)}")
    processor_name, image_name, tokens = VISION_FAMILIES[family]
    tokenizer = new_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHAT_TOKENS) + list(tokens)})
    tokenizer.chat_template = vision_chat_template("".join(tokens))
    transformers = importlib.import_module("transformers")
    if family == "qwen2_vl":
        image_processor = getattr(transformers, image_name)(min_pixels=image_size * image_size,
                                                             max_pixels=image_size * image_size)
        extra = {}
    else:
        image_processor = getattr(transformers, image_name)(size={"shortest_edge": image_size},
                                                             crop_size={"height": image_size, "width": image_size})
        extra = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    processor = make_processor(processor_name, image_processor, tokenizer, chat_template=tokenizer.chat_template)
    for key, value in extra.items():
        setattr(processor, key, value)
    return processor


def new_vision_model(processor, family: str = "qwen2_vl", hidden_size: int = 32, layers: int = 2,
                     vision_hidden_size: int = 32, vision_layers: int = 2, seed: int | None = None):
    """A freshly initialised tiny vision-language model of `family` for `processor`
    (`new_vision_processor`), float32."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tok = processor.tokenizer
    heads = max(1, hidden_size // 8)
    text = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tok),
                max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    if family == "qwen2_vl":
        ids = tok.convert_tokens_to_ids(list(VISION_FAMILIES[family][2]))
        head_dim = hidden_size // heads
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [head_dim // 8, head_dim // 8,
                                                                             head_dim // 2 - head_dim // 4],
                                   "rope_theta": 10000.0}
        config = AutoConfig.for_model(
            "qwen2_vl", text_config=text,
            vision_config=dict(depth=vision_layers, embed_dim=vision_hidden_size, hidden_size=hidden_size,
                               num_heads=max(1, vision_hidden_size // 8), mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            image_token_id=ids[1], vision_start_token_id=ids[0], vision_end_token_id=ids[2])
    elif family == "llava":
        size = processor.image_processor.crop_size["height"]
        config = AutoConfig.for_model(
            "llava", text_config=dict(text, model_type="llama"),
            vision_config=dict(model_type="clip_vision_model", hidden_size=vision_hidden_size,
                               intermediate_size=2 * vision_hidden_size, num_hidden_layers=vision_layers,
                               num_attention_heads=max(1, vision_hidden_size // 8), image_size=size, patch_size=14,
                               projection_dim=vision_hidden_size),
            image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-1, projector_hidden_act="gelu")
    else:
        raise ValueError(f"unknown vision family {family!r}; use one of {', '.join(VISION_FAMILIES)}")
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def load_tokenizer(name_or_path_or_tokenizer: Any, padding_side: str = "left", trust_remote_code: bool = False):
    """Load a tokenizer (hub id, local dir, or pass an object through) ready for batched generation.

    - `padding_side` is set ("left" for generation, the default).
    - "char" builds the character-level tokenizer of the starter model (`new_char_tokenizer`).
    - A built-in model name ("smollm2-135m-instruct") or a `.gguf` file reads the GGUF file's
      tokenizer (grpokit.modeling.known).
    - When the tokenizer has no pad token, `pad_token` is set to `eos_token` (and a `<pad>` token
      is added when there is no EOS either; then `len(tokenizer)` grows and the model's
      embeddings must be resized with `model.resize_token_embeddings(len(tokenizer))`).
    """
    if isinstance(name_or_path_or_tokenizer, str | os.PathLike):
        if str(name_or_path_or_tokenizer) == "char":
            tokenizer = new_char_tokenizer()
        elif str(name_or_path_or_tokenizer) == "char-chat":
            tokenizer = new_chat_tokenizer()
        else:  # as saved (the generic fast class where the folder names it); a built-in name's or .gguf file's own
            tokenizer = load_pretrained_tokenizer(name_or_path_or_tokenizer, trust_remote_code=trust_remote_code)
    else:
        tokenizer = name_or_path_or_tokenizer
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            warnings.warn(
                "tokenizer has neither a pad nor an eos token: adding '<pad>'; resize the model's "
                "embeddings with model.resize_token_embeddings(len(tokenizer))",
                stacklevel=2,
            )
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def new_model_from_config(model_config: dict[str, Any], tokenizer=None, seed: int | None = None):
    """A freshly initialised causal LM from a config dict (e.g. {"model_type": "llama", ...}).

    `model_type` is any causal-LM type transformers knows ("llama", "qwen2", "gpt2", ...); the other
    keys are that config's kwargs. With a tokenizer, vocab_size and the pad/bos/eos ids are taken
    from it unless given. `seed` makes the initialisation reproducible.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(model_config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise ValueError("model_config needs a 'model_type' key, e.g. {'model_type': 'llama', 'hidden_size': 64}")
    if tokenizer is not None:
        kwargs.setdefault("vocab_size", len(tokenizer))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, name, None)
            if value is not None:
                kwargs.setdefault(name, value)
    config = AutoConfig.for_model(model_type, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if tokenizer is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def _is_peft_adapter_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").exists() and not (p / "config.json").exists()


def load_model(
    name_or_path_or_model: Any,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
):
    """Load a causal LM for training or generation.

    name_or_path_or_model:
        a hub id ("Qwen/Qwen2.5-0.5B-Instruct"), a local directory written by `save_pretrained`
        or `save_model`, a LoRA adapter directory (loaded as base model + adapter, trainable), a
        built-in model name ("smollm2-135m-instruct", the `smollm2` extra) or a `.gguf` file
        (dequantized, grpokit.modeling.known), or an already loaded model (moved to `device`; cast
        only when `dtype` is not "auto").
    dtype: "auto" (float32 on CPU, bf16 on CUDA when supported), "float32", "bfloat16", ... or a torch.dtype.
    device: "cpu", "cuda", "cuda:1", "auto" (cuda if available), or None to leave it where it is.
    """
    target = resolve_device(device) if device is not None else None
    if isinstance(name_or_path_or_model, torch.nn.Module):
        model = name_or_path_or_model
        if dtype is not None and dtype != "auto":
            model = model.to(resolve_dtype(dtype, target or "cpu"))
        return model.to(target) if target is not None else model

    name = str(name_or_path_or_model)
    torch_dtype = resolve_dtype(dtype, target or "cpu")
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"model path {name!r} does not exist")
    name = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    folder, gguf = resolve_model(name)
    if is_gguf(gguf):
        model = _load_gguf_model(name, folder, gguf, torch_dtype, trust_remote_code, from_pretrained_kwargs)
    elif _is_peft_adapter_dir(name):
        from peft import AutoPeftModelForCausalLM

        base = json.loads((Path(name) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"the LoRA adapter in {name!r} does not name its base model (base_model_name_or_path is empty): "
                "load the base with load_model(base) and the adapter with peft.PeftModel.from_pretrained(base, path)"
            )
        if is_gguf(resolve_model(base)[1]):  # a built-in name or a .gguf file: transformers cannot load it alone
            from peft import PeftModel

            base_model = load_model(base, dtype=torch_dtype, device=None, trust_remote_code=trust_remote_code,
                                    **from_pretrained_kwargs)
            model = PeftModel.from_pretrained(base_model, name, is_trainable=True)
        else:
            model = AutoPeftModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, is_trainable=True, trust_remote_code=trust_remote_code,
                **from_pretrained_kwargs
            )
    else:
        from transformers import AutoModelForCausalLM

        try:
            auto = _vision_auto_class(name, trust_remote_code) or AutoModelForCausalLM
            model = auto.from_pretrained(
                name, dtype=torch_dtype, trust_remote_code=trust_remote_code, **from_pretrained_kwargs
            )
        except OSError as e:  # not on the hub / no network / no such folder: one line naming the model
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(f"cannot load the model {name!r}: {first} Check the hub id or the local path; "
                          "offline (HF_HUB_OFFLINE=1) only models already in the local cache are found.") from e
    # transformers declares PreTrainedModel.to with @wraps(nn.Module.to), which types it unbound
    return model.to(target) if target is not None else model  # type: ignore[arg-type]


def _load_gguf_model(name: str, folder: str, gguf: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool,
                     kwargs: dict[str, Any]):
    """A built-in model name or a .gguf file (grpokit.modeling.known): transformers' GGUF reader,
    every weight dequantized into a plain dense model, and the GGUF quantisation config dropped, so
    that the model trains, and `save_pretrained` / a checkpoint write it as an ordinary safetensors
    model (transformers refuses to serialize a model that still carries it). Its `name_or_path`
    becomes the built-in name (or the file's path), which `load_model` / `load_tokenizer` and a
    LoRA adapter's base_model_name_or_path resolve again."""
    from transformers import AutoModelForCausalLM

    if kwargs.get("quantization_config") is not None:
        raise ValueError(f"{name!r} is a GGUF model: grpokit loads it dequantized into a dense model and cannot "
                         "quantize it again; drop quantization_config (LoRA works without it).")
    kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, **dequantizing(gguf), **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load the GGUF model {name!r} ({os.path.join(folder, gguf['gguf_file'])}): {first}") from e
    drop_quantization_config(model)
    label = canonical_name(name) or os.path.join(folder, gguf["gguf_file"])
    model.name_or_path = label
    model.config.name_or_path = label
    return model


def _vision_auto_class(name: str, trust_remote_code: bool):
    """AutoModelForImageTextToText when `name`'s config is a vision-language model's (as TRL
    loads them), else None (a causal LM)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None  # the causal-LM path says what is wrong with the name
    if getattr(config, "vision_config", None) is None:
        return None
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return AutoModelForImageTextToText if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES else None


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel`, without importing peft (~10 MB, 250 modules) when
    nothing has: a PeftModel cannot exist before peft is imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)



def apply_lora(model, peft_config):
    """Wrap `model` with a LoRA adapter: base weights frozen, adapter weights trainable.

    peft_config: a `peft.LoraConfig` or a dict of its fields (YAML), e.g.
    {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}; task_type defaults to CAUSAL_LM
    and target_modules to peft's per-architecture default.
    """
    from peft import LoraConfig, PeftConfig, get_peft_model

    if is_peft_model(model):
        raise ValueError("model already has a PEFT adapter; pass the base model to apply_lora")
    if isinstance(peft_config, dict):
        fields = dict(peft_config)
        fields.setdefault("task_type", "CAUSAL_LM")
        peft_config = LoraConfig(**fields)
    elif not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig or a dict, got {type(peft_config).__name__}")
    peft_model = get_peft_model(model, peft_config)
    return peft_model


@contextlib.contextmanager
def reference_logits_context(model):
    """Within this context `model(...)` returns the reference (base) model's logits, without gradients.

    For a LoRA/PEFT model the adapter is disabled, so the base model serves as the reference with no
    second copy in memory. For a model without an adapter there is nothing to switch off: this raises
    ValueError (use `load_reference_model` for a frozen copy); silently returning the policy's own
    logits would make the KL term zero.
    """
    if not is_peft_model(model):
        raise ValueError(
            "reference_logits_context needs a LoRA/PEFT model (the reference is the base model with the "
            "adapter disabled); for a full fine-tune load a frozen copy with load_reference_model()"
        )
    with model.disable_adapter(), torch.no_grad():
        yield model


def cast_lm_head_to_fp32(model) -> None:
    """TRL's `cast_lm_head_to_fp32`: the output projection in float32 (weights and matmul) while the
    rest of the model stays in its dtype; logits come out float32. A tied input embedding keeps
    returning the model's dtype. An lm_head with a LoRA adapter is refused (as TRL)."""
    import torch.nn.functional as F

    from grpokit.modeling.info import unwrap

    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError("cast_lm_head_to_fp32=True: the model has no output projection (lm_head) to cast.")
    if hasattr(head, "base_layer"):  # a peft tuner layer
        raise ValueError("cast_lm_head_to_fp32=True is not supported when the lm_head carries a LoRA adapter "
                         "(target_modules includes lm_head); remove it from target_modules, or set "
                         "cast_lm_head_to_fp32=False.")
    original = head.weight.dtype
    head.float()

    def forward(hidden_states):
        bias = None if head.bias is None else head.bias.float()
        return F.linear(hidden_states.float(), head.weight, bias)

    head.forward = forward
    embed = inner.get_input_embeddings()
    if embed is not None and embed.weight is head.weight and original != torch.float32:
        embed.register_forward_hook(lambda module, args, output: output.to(original))


def load_reference_model(
    model_or_path: Any,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """A frozen, eval-mode reference model for beta > 0 without LoRA.

    model_or_path: a hub id or path (loaded fresh, so load it *before* training changes anything on
    disk) or a loaded model (deep-copied, so the policy can keep training). `device=None` keeps a
    copied model on its device and puts a loaded one on CPU. LoRA models need no copy: use
    `reference_logits_context`.
    """
    if isinstance(model_or_path, torch.nn.Module):
        if is_peft_model(model_or_path):
            raise ValueError("a LoRA model's reference is its base model: use reference_logits_context(model)")
        ref = copy.deepcopy(model_or_path)
        if dtype is not None and dtype != "auto":
            ref = ref.to(resolve_dtype(dtype))
        if device is not None:
            ref = ref.to(resolve_device(device))
    else:
        ref = load_model(model_or_path, dtype=dtype, device=device or "cpu", trust_remote_code=trust_remote_code)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def save_model(model, tokenizer, path: str | os.PathLike, merge_lora: bool = False) -> Path:
    """Save a model and its tokenizer so `load_model(path)` / `load_tokenizer(path)` read them back.

    - Plain model: `save_pretrained` (safetensors, config.json, generation_config.json) into `path`.
    - LoRA/PEFT model: the adapter (adapter_model.safetensors, adapter_config.json) into `path`;
      with `merge_lora=True` also the merged full model into `path/merged` (made from a copy, so the
      model being trained keeps its adapter).
    The tokenizer (if given) is saved next to each. Returns the directory of the full model when one
    was written (path, or path/merged), else the adapter directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unwrapped = getattr(model, "module", model)  # DDP / torch.compile wrappers
    unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)
    unwrapped.save_pretrained(str(path))
    if tokenizer is not None:
        _save_tokenizer(tokenizer, path)
    if not is_peft_model(unwrapped):
        return path
    if not merge_lora:
        return path
    merged_dir = path / "merged"
    merged = copy.deepcopy(unwrapped).merge_and_unload()
    merged.save_pretrained(str(merged_dir))
    if tokenizer is not None:
        _save_tokenizer(tokenizer, merged_dir)
    return merged_dir


def _save_tokenizer(tokenizer, path: Path) -> None:
    """save_pretrained, naming transformers v5's generic "TokenizersBackend" class by its older name
    "PreTrainedTokenizerFast", which transformers v4 and v5 both load."""
    tokenizer.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


STARTER_MODELS = {"multiply": "starter-multiply", "guess": "starter-guess", "colors": "starter-colors"}
"""Built-in tasks with a starter model of their own (src/grpokit/assets/<dir>); the others use `starter`."""


def starter_model_path(task: str | None = None) -> str:
    """Directory of a tiny starter model shipped with the package (src/grpokit/assets/starter, or
    the task's own, `STARTER_MODELS`).

    `starter` is a ~1M-parameter Llama-shaped model with a character-level tokenizer, warm-started
    with a short SFT on the built-in `arithmetic` task (see configs/starter_sft.yaml, made by
    scripts/make_starter_model.sh). `grpokit train` with no arguments starts from it.
    `starter-multiply` has the chat tokenizer (`new_chat_tokenizer`) and calls the multiply tool
    (configs/starter_multiply_sft.yaml). `starter-colors` is a tiny Qwen2-VL-shaped
    vision-language model with its processor, for the `colors` task (scripts/make_vision_starter.py).
    """
    name = STARTER_MODELS.get(task or "", "starter")
    path = resources.files("grpokit") / "assets" / name
    path = Path(str(path))
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the starter model is missing at {path}; rebuild it with "
            + ("scripts/make_vision_starter.py" if task == "colors" else "scripts/make_starter_model.sh"
               + (f" configs/starter_{task}_sft.yaml" if name != "starter" else ""))
        )
    return str(path)
