"""Images in prompts: the dataset's image columns, TRL's multimodal messages, the processor.

A row's images come from its `images` column (a list: several images per prompt) or its `image`
column (one image); a row with none (None or []) is a text prompt, in the same dataset. An image
is a PIL image, a path to an image file, a `datasets` Image value (decoded: a PIL image; not
decoded: {"bytes", "path"}) or an HWC uint8 array. Prompts take TRL's two forms:

- conversational: the images go in as `{"type": "image"}` content parts, before the text of the
  first user message (TRL's `prepare_multimodal_messages`), unless the messages already carry
  their own image parts (then each empty part takes the next image, in order);
- standard (a string): the text holds one image placeholder of the processor per image
  (`processor.image_token`, Gemma's `<start_of_image>`, ...), or none, and then one is put in front
  of the text for each image.

`encode_vision_prompt` renders the prompt with the processor's chat template and runs the
processor: token ids with every image's tokens expanded, and the processor's tensors
(`VisionInputs`) that the rollout and the training forward hand to the model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch

IMAGE_COLUMNS = ("images", "image")


@dataclass(eq=False)
class VisionInputs:
    """The processor's output for one prompt with images (besides input_ids / attention_mask).

    `tensors`: what the model's forward takes for these images (pixel_values, image_grid_thw,
    image_sizes, ...); `token_tensors`: those with one value per prompt token, [1, P]
    (token_type_ids, mm_token_type_ids), which the training forward lays out with the tokens.
    Compared by identity: the G samples of a group share one object, which is how the rollout
    and the training forward know that their images are the same."""

    tensors: dict[str, torch.Tensor]
    token_tensors: dict[str, torch.Tensor]
    num_images: int
    num_image_tokens: int
    cache: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)  # per (what, id(model)) values
    # [L] bool: the tokens that take the features (None: every image token, as in a prompt). Set for a
    # completion's images (tool results), where an image token the model sampled stays text.
    slots: torch.Tensor | None = None

    def to(self, device) -> "VisionInputs":
        return VisionInputs({k: v.to(device) for k, v in self.tensors.items()},
                            {k: v.to(device) for k, v in self.token_tensors.items()},
                            self.num_images, self.num_image_tokens, slots=self.slots)


def is_processor(obj) -> bool:
    """Whether `obj` is a multimodal processor (an image processor and a tokenizer)."""
    return getattr(obj, "image_processor", None) is not None and getattr(obj, "tokenizer", None) is not None


def tokenizer_of(processing_class):
    """The text tokenizer of a processing class (a processor's, or the tokenizer itself)."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def image_token(processor) -> str | None:
    """The placeholder a prompt's text holds for one image (before the processor expands it)."""
    for name in ("boi_token", "image_token"):
        tok = getattr(processor, name, None)
        if isinstance(tok, str) and tok:
            return tok
    return None


def image_token_ids(processor) -> set[int]:
    """Ids of the tokens that stand for image features in the expanded prompt."""
    tok = tokenizer_of(processor)
    ids = set()
    for name in ("image_token_id", "image_token_index"):
        value = getattr(processor, name, None)
        if isinstance(value, int):
            ids.add(value)
    token = getattr(processor, "image_token", None)
    if not ids and isinstance(token, str):
        value = tok.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != getattr(tok, "unk_token_id", None):
            ids.add(value)
    return ids


def load_processor(name_or_path: str, trust_remote_code: bool = False, **kwargs):
    """`AutoProcessor.from_pretrained`, also where torchvision is not installed: transformers
    then has no video processor for the families that declare one (Qwen2-VL, Qwen2.5-VL,
    Qwen3.5, ...) and refuses to build their processor at all; grpokit takes images only, so the
    processor is built with a video processor that says what is missing if it is ever called."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (ImportError, ValueError) as err:  # transformers raises either, naming torchvision
        if "torchvision" not in str(err).lower():
            raise
        return _processor_without_video(name_or_path, trust_remote_code=trust_remote_code, **kwargs)


def _processor_without_video(name_or_path: str, **kwargs):
    """`AutoProcessor.from_pretrained` with `AutoVideoProcessor.from_pretrained` answering, for the
    video processor it cannot build without torchvision, a stand-in that keeps the saved config and
    fails if called; every other part (image processor, tokenizer, audio feature extractor, the
    processor's own settings, its chat template) loads as usual."""
    import importlib

    from transformers import AutoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    auto = importlib.import_module("transformers.models.auto.video_processing_auto").AutoVideoProcessor
    original = auto.__dict__["from_pretrained"]

    def from_pretrained(cls, path, *args, **kw):
        try:
            return original.__func__(cls, path, *args, **kw)
        except (ImportError, ValueError) as err:
            if "torchvision" not in str(err).lower():
                raise
            try:
                config, _ = VideoProcessorMixin.get_video_processor_dict(path, **kw)
            except Exception:  # no saved video processor config
                config = {}
            return _video_unavailable(config.get("merge_size", 2), config)

    auto.from_pretrained = classmethod(from_pretrained)
    try:
        with _video_mixin_visible():
            return AutoProcessor.from_pretrained(name_or_path, **kwargs)
    finally:
        auto.from_pretrained = original


@contextlib.contextmanager
def _video_mixin_visible():
    """ProcessorMixin checks a sub-processor's class by its name on the transformers module, which
    leaves VideoProcessorMixin out without torchvision: make it visible for the duration."""
    import transformers.processing_utils as processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    module = processing_utils.transformers_module
    had = hasattr(module, "VideoProcessorMixin")
    if not had:
        module.VideoProcessorMixin = VideoProcessorMixin
    try:
        yield
    finally:
        if not had:
            del module.VideoProcessorMixin


def make_processor(processor_class, image_processor, tokenizer, chat_template: str | None = None):
    """`processor_class(image_processor=..., tokenizer=..., chat_template=...)` (a class or its
    name), also without torchvision: a family that declares a video processor gets a stand-in
    that says videos are not supported if it is ever called (transformers otherwise refuses to
    build the processor without torchvision, or without a video processor)."""
    from transformers.models.auto.processing_auto import processor_class_from_name

    cls = processor_class_from_name(processor_class) if isinstance(processor_class, str) else processor_class
    parts = {"image_processor": image_processor, "tokenizer": tokenizer}
    if "video_processor" in cls.get_attributes():  # images only: a stand-in that fails if ever called
        parts["video_processor"] = _video_unavailable(getattr(image_processor, "merge_size", 2))
    with _video_mixin_visible():
        return cls(**parts, chat_template=chat_template)


def _video_unavailable(merge_size: int, config: dict | None = None):
    from transformers.video_processing_utils import VideoProcessorMixin

    class VideoProcessingUnavailable(VideoProcessorMixin):
        """Stands in for a video processor where torchvision is missing; fails if called."""

        def __init__(self, merge_size: int = 2, config: dict | None = None):
            self.merge_size = merge_size
            self.config = dict(config or {})
            for key in ("patch_size", "temporal_patch_size"):  # some processors read these at init
                if key in self.config:
                    setattr(self, key, self.config[key])

        def __call__(self, *args, **kw):
            raise ImportError("this processor's video processor needs torchvision, which is not installed; "
                              "grpokit trains on images, not videos.")

        def to_dict(self):
            return dict(self.config)

    return VideoProcessingUnavailable(merge_size, config)


# --------------------------------------------------------------------------------------------
# a row's images
# --------------------------------------------------------------------------------------------

def images_of_row(row: dict) -> list | None:
    """The row's images as a list (from `images`, else `image`), or None when it has none."""
    if row.get("images") is not None:
        value = row["images"]
        images = list(value) if isinstance(value, (list, tuple)) else [value]
    elif row.get("image") is not None:
        images = [row["image"]]
    else:
        return None
    return images or None


def open_image(value, where: str):
    """A PIL RGB image from a PIL image, a file path, a datasets Image value or an HWC array;
    ValueError naming `where` (the row) and the fix otherwise."""
    from PIL import Image

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(os.fspath(value))
        elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
            import io

            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
        elif hasattr(value, "__array__"):
            import numpy as np

            image = Image.fromarray(np.asarray(value))
        else:
            raise TypeError(f"a {type(value).__name__} is not an image")
        image.load()
    except Exception as err:  # noqa: BLE001 - every way an image fails to open is the same error for the user
        shown = value if isinstance(value, (str, os.PathLike)) else type(value).__name__
        raise ValueError(f"{where}: cannot open the image {shown!r} ({err}). Give a PIL image, the path of an image "
                         "file, or a datasets Image column.") from None
    return image.convert("RGB") if image.mode != "RGB" else image


def multimodal_messages(messages: list[dict], n_images: int) -> list[dict]:
    """The messages with structured content: the images' `{"type": "image"}` parts before the
    first user message's text (unless the messages already hold their own image parts; then
    they must be `n_images`), every string content wrapped as a text part."""
    own = sum(1 for m in messages if isinstance(m.get("content"), list)
              for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")
    out, placed = [], own > 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if message.get("role") == "user" and not placed:
                parts = [{"type": "image"} for _ in range(n_images)] + parts
                placed = True
            message = {**message, "content": parts}
        out.append(message)
    if own and own != n_images:
        raise ValueError(f"the prompt's messages hold {own} image parts for {n_images} images in the row.")
    if not placed and n_images:
        raise ValueError("the prompt has no user message with text content to put its images in.")
    return out


def encode_vision_prompt(prompt, images: list | None, processor, *, where: str,
                         chat_template_kwargs: dict | None = None) -> tuple[list[int], VisionInputs | None]:
    """(token ids, VisionInputs or None) of one prompt and its images, through the processor."""
    opened = [open_image(img, f"{where}, image {k}") for k, img in enumerate(images or [])]
    if isinstance(prompt, str):
        text = prompt
        token = image_token(processor)
        if opened and token and token not in text:
            text = "".join(token + "\n" for _ in opened) + text
        templated = False
    else:
        messages = multimodal_messages(list(prompt), len(opened))  # content as parts, as TRL gives a VLM
        template = getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)
        if template is None:
            raise ValueError(f"{where}: conversational prompts need a chat template, and the processor has none.")
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(chat_template_kwargs or {}))
        templated = True
    if not opened:
        ids = tokenizer_of(processor)(text, add_special_tokens=not templated)["input_ids"]
        return list(ids), None
    return _processed(text, opened, processor, where=where, add_special_tokens=not templated)


def _processed(text: str, opened: list, processor, *, where: str, add_special_tokens: bool):
    """The processor's token ids (image tokens expanded) and VisionInputs for `text` and its images."""
    out = processor(text=[text], images=opened, return_tensors="pt", add_special_tokens=add_special_tokens)
    ids = out["input_ids"][0].tolist()
    length = len(ids)
    token_ids = image_token_ids(processor)
    n_tokens = sum(1 for t in ids if t in token_ids)
    if n_tokens == 0:
        raise ValueError(f"{where}: {len(opened)} image(s) but no image token after processing; the text or the "
                         "chat template has no image placeholder the processor expands "
                         f"({image_token(processor)!r}).")
    tensors, per_token = {}, {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask") or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == (1, length) and "pixel" not in key:
            per_token[key] = value
        else:
            tensors[key] = value
    return ids, VisionInputs(tensors, per_token, len(opened), n_tokens)


def encode_text_with_images(token_ids: list[int], images: list, processor, *, where: str):
    """Tokens rendered elsewhere (a tool result's turn, by the chat template: one placeholder per
    image) with their images put in by the processor: (the expanded ids, VisionInputs whose
    `slots` are all the image tokens of these ids)."""
    opened = [open_image(img, f"{where}, image {k}") for k, img in enumerate(images)]
    text = tokenizer_of(processor).decode(token_ids, skip_special_tokens=False)
    ids, v = _processed(text, opened, processor, where=where, add_special_tokens=False)
    token_ids_set = image_token_ids(processor)
    v.slots = torch.tensor([t in token_ids_set for t in ids], dtype=torch.bool)
    return ids, v


def join_vision(length: int, chunks: list[tuple[int, VisionInputs]]) -> VisionInputs | None:
    """One VisionInputs for a token span of `length` holding `chunks` ((offset, VisionInputs) with
    slots, in order): their per-image tensors concatenated, their per-token tensors and slots laid
    out at their offsets (0 / False elsewhere)."""
    if not chunks:
        return None
    keys = list(chunks[0][1].tensors)
    tensors = {k: torch.cat([v.tensors[k] for _, v in chunks], dim=0) for k in keys}
    per_token: dict[str, torch.Tensor] = {}
    slots = torch.zeros(length, dtype=torch.bool)
    for offset, v in chunks:
        assert v.slots is not None  # chunks carry their slots (see above)
        n = v.slots.numel()
        slots[offset:offset + n] = v.slots
        for k, t in v.token_tensors.items():
            grid = per_token.setdefault(k, torch.zeros((1, length), dtype=t.dtype))
            grid[0, offset:offset + n] = t[0]
    return VisionInputs(tensors, per_token, sum(v.num_images for _, v in chunks),
                        sum(v.num_image_tokens for _, v in chunks), slots=slots)


def check_processor(processor, model_name: str) -> None:
    """A processor that cannot put images in a prompt: one line saying so, before step 1."""
    if not is_processor(processor):
        raise ValueError(f"the dataset has images, but the processing class of {model_name} is a tokenizer: pass the "
                         "model's processor (AutoProcessor.from_pretrained(...)) as processing_class.")
    if not image_token_ids(processor):
        raise ValueError(f"the processor of {model_name} ({type(processor).__name__}) has no image token "
                         "(processor.image_token / image_token_id), so images cannot be placed in the prompt.")


def encode_rows(dataset, processor, *, max_prompt_length: int | None,
                chat_template_kwargs: dict | None = None) -> tuple[list[list[int]], list[VisionInputs | None]]:
    """Every row's prompt token ids (image tokens expanded) and VisionInputs (None for a row
    without images), checked before step 1: an image that does not open (row named), a prompt
    over `max_prompt_length` (with its count of image tokens)."""
    columns = set(dataset.column_names)
    if "prompt" not in columns:
        raise ValueError(f"the dataset has no 'prompt' column; its columns are {sorted(columns)}.")
    ids_out, vision_out = [], []
    for i in range(len(dataset)):
        try:  # a datasets Image column opens its images when a row is read
            row = dataset[i]
        except (OSError, ValueError) as err:
            raise ValueError(f"row {i}: cannot open its image ({err}). Give a PIL image, the path of an image file, or "
                             "a datasets Image column.") from None
        ids, vision = encode_vision_prompt(row["prompt"], images_of_row(row), processor, where=f"row {i}",
                                           chat_template_kwargs=chat_template_kwargs)
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if vision is None:
                raise ValueError(f"prompt of row {i} is {len(ids)} tokens long, over max_prompt_length="
                                 f"{max_prompt_length}. Raise max_prompt_length or filter/shorten the long prompts.")
            raise ValueError(f"prompt of row {i} is {len(ids)} tokens long ({vision.num_image_tokens} of them for its "
                             f"{vision.num_images} image(s)), over max_prompt_length={max_prompt_length}. Raise "
                             "max_prompt_length, or give smaller images (the processor's max_pixels / size) or fewer "
                             "per prompt.")
        ids_out.append(ids)
        vision_out.append(vision)
    return ids_out, vision_out
