"""The `trl-internal-testing` vision-language models, rebuilt locally from TRL's own recipes.

Each entry follows the matching script of TRL's `scripts/generate_tiny_models/for_conditional_generation/`:
the script loads the source model's config (`AutoConfig.from_pretrained(MODEL_ID, text_config=...,
vision_config=..., ...)`, which merges the given sub-config keys into the source's), builds the
model class on it with transformers' own initialisation (these scripts call no
`init_weights_tiny_model`), casts it (bfloat16; Llava float16; Qwen3.5's linear-attention `A_log`
and norm weight back to float32) and pushes it with the source model's processor (the image
processor resized where the script says so) and generation config. Here:

- `SOURCES` holds the source models' config.json (the fields that matter for the tiny model; the
  rest take the config classes' defaults, which transformers sets to the reference checkpoints').
  `ConfigClass.from_dict(source, **overrides)` is what `AutoConfig.from_pretrained(MODEL_ID,
  **overrides)` does with it, so a stand-in's config is the one TRL's script makes. Special-token
  ids are written as token strings and mapped through the stand-in tokenizer;
- the tokenizer is `tokenizer_families`' (the family's special and image tokens, its original chat
  template): Qwen3.5 / Qwen3.6 with the real 248k ids (a TRL test's mocked completions hard-code
  them), Qwen2-VL / Qwen2.5-VL with Qwen2.5's compact ids (as tiny-Qwen2ForCausalLM-2.5;
  GRPOKIT_TRL_COMPAT_FULL_VOCAB=1 for the real ones), the others one character per token. With a
  small vocabulary the config's `vocab_size` (and Gemma 4's `vocab_size_per_layer_input`) is the
  tokenizer's length;
- the processor is the source model's class with the family's image processor settings (its
  preprocessor_config.json values; the sizes TRL's scripts set: Gemma 3 at 224 px, Gemma 4 at 70
  soft tokens), saved as transformers saves a processor (processor_config.json with the image,
  video and audio sub-configs, the tokenizer files, chat_template.jinja). The video processors of
  Qwen2-VL, Qwen2.5-VL, Qwen3.5 and Gemma 4 need torchvision in transformers 5, so only their
  config is written (`_ConfigOnly`); loading the processor with `AutoProcessor` then needs
  torchvision, as for the real repos (Gemma 3, Llava and Llava-Next load without it).

Built only when a vision test is selected (`hub_cache.build(..., image_datasets=True)`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from . import tokenizer_families

ORG = "trl-internal-testing"

# --- the source models' config.json -------------------------------------------------------------

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_HALF = [0.5, 0.5, 0.5]

# google/gemma-3-4b-it
GEMMA3_4B_IT = {
    "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": "<start_of_image>", "eoi_token_index": "<end_of_image>", "image_token_index": "<image_soft_token>",
    "eos_token_id": ["<eos>", "<end_of_turn>"], "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "text_config": {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "vocab_size": 262208, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
        "pad_token_id": "<pad>", "bos_token_id": "<bos>", "eos_token_id": "<eos>",
    },
    "vision_config": {
        "model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
        "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False,
    },
}

# google/gemma-4-E2B-it (as transformers 5.5 wrote it; 5.24 turns `global_head_dim` into the
# full-attention layers' per_layer_config when it loads it)
GEMMA4_E2B_IT = {
    "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
    "boi_token_id": "<|image>", "eoi_token_id": "<image|>", "image_token_id": "<|image|>", "video_token_id": "<|video|>",
    "boa_token_id": "<|audio>", "eoa_token_index": "<audio|>", "audio_token_id": "<|audio|>",
    "eos_token_id": ["<eos>", "<turn|>"], "initializer_range": 0.02, "tie_word_embeddings": True,
    "text_config": {
        "model_type": "gemma4_text", "hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
        "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "global_head_dim": 512,
        "hidden_size_per_layer_input": 256, "vocab_size": 262144, "vocab_size_per_layer_input": 262144,
        "num_kv_shared_layers": 20, "sliding_window": 512, "final_logit_softcapping": 30.0,
        "use_double_wide_mlp": True, "attention_k_eq_v": False, "enable_moe_block": False,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-06, "tie_word_embeddings": True,
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "pad_token_id": "<pad>", "bos_token_id": "<bos>", "eos_token_id": "<eos>",
    },
    "vision_config": {
        "model_type": "gemma4_vision", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
        "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64, "patch_size": 16,
        "pooling_kernel_size": 3, "position_embedding_size": 10240, "default_output_length": 280,
        "use_clipped_linears": True, "standardize": False, "rms_norm_eps": 1e-06,
    },
    "audio_config": {"model_type": "gemma4_audio"},
}

# llava-hf/llava-v1.6-mistral-7b-hf
LLAVA_V1_6_MISTRAL_7B = {
    "model_type": "llava_next", "architectures": ["LlavaNextForConditionalGeneration"],
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": "<image>", "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    "text_config": {
        "model_type": "mistral", "architectures": ["MistralForCausalLM"], "_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
        "intermediate_size": 14336, "max_position_embeddings": 32768, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32064,
        "dtype": "bfloat16",  # the upstream slip that TRL's script clears (text_config "dtype": None)
        "pad_token_id": "<pad>",
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000,
    },
}

# llava-hf/llava-1.5-7b-hf
LLAVA_1_5_7B = {
    "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
    "image_token_index": "<image>", "pad_token_id": "<pad>", "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    "text_config": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "vocab_size": 32064, "pad_token_id": "<pad>",
    },
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000,
    },
}

_QWEN_VL_IDS = {
    "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>", "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>", "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
}

# Qwen/Qwen2-VL-2B-Instruct (the flat layout of transformers 4.x: the text fields at the root)
QWEN2_VL_2B_INSTRUCT = {
    "model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"], **_QWEN_VL_IDS,
    "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 28, "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3, "hidden_size": 1536,
        "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
    },
}

# Qwen/Qwen2.5-VL-3B-Instruct (flat layout too)
QWEN2_5_VL_3B_INSTRUCT = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], **_QWEN_VL_IDS,
    "attention_dropout": 0.0, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70, "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}

_QWEN3_5_ROPE = {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                 "rope_theta": 10000000, "partial_rotary_factor": 0.25}
_QWEN3_5_IDS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}

# Qwen/Qwen3.5-0.8B
QWEN3_5_0_8B = {
    "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"], **_QWEN3_5_IDS,
    "tie_word_embeddings": True,
    "text_config": {
        "model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "attn_output_gate": True,
        "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "vocab_size": 248320, "tie_word_embeddings": True,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "rope_parameters": dict(_QWEN3_5_ROPE),
        "eos_token_id": "<|endoftext|>",
    },
    "vision_config": {
        "model_type": "qwen3_5", "depth": 12, "hidden_size": 768, "intermediate_size": 3072, "num_heads": 12,
        "out_hidden_size": 1024, "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
    },
}

# Qwen/Qwen3.6-35B-A3B
QWEN3_6_35B_A3B = {
    "model_type": "qwen3_5_moe", "architectures": ["Qwen3_5MoeForConditionalGeneration"], **_QWEN3_5_IDS,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_5_moe_text", "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
        "num_key_value_heads": 2, "head_dim": 256, "attn_output_gate": True, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "num_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "router_aux_loss_coef": 0.001,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "vocab_size": 248320, "tie_word_embeddings": False,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False, "rope_parameters": dict(_QWEN3_5_ROPE),
        "eos_token_id": "<|endoftext|>",
    },
    "vision_config": {
        "model_type": "qwen3_5_moe", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "out_hidden_size": 2048, "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
    },
}

# --- TRL's scripts: the overrides, the processor, the generation config --------------------------

_QWEN_VL_ROPE = {"type": "default", "mrope_section": [1, 1], "rope_type": "default"}
_TINY_TEXT = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2}
_GEMMA4_IMAGE_TOKENS = 70  # TRL: the smallest max_soft_tokens Gemma 4 supports; 70 * 3**2 = 630 patches
# The one size not TRL's: Llava-Next's tiles are 112 px instead of 336 (its grid pinpoints scaled
# alike), the same anyres path (base tile + 2 grid tiles, unpadding, image newlines) with 4x4 instead
# of 24x24 patches a tile: ~290 instead of ~1450 tokens a prompt, and test_train_vlm on it 5x faster
# on a CPU (180 s with 336 px).
_LLAVA_NEXT_TILE = 112
_LLAVA_NEXT_PINPOINTS = [[h * _LLAVA_NEXT_TILE // 336, w * _LLAVA_NEXT_TILE // 336]
                         for h, w in LLAVA_V1_6_MISTRAL_7B["image_grid_pinpoints"]]

# Qwen3.5 and Qwen3.6 share their processor (Qwen/Qwen3.5-0.8B's preprocessor and video configs)
_QWEN3_5_PROCESSOR = ("Qwen3VLProcessor", "Qwen2VLImageProcessorPil",
                      dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
                           temporal_patch_size=2, merge_size=2, image_mean=_HALF, image_std=_HALF),
                      {},
                      dict(video_processor_type="Qwen3VLVideoProcessor", patch_size=16, temporal_patch_size=2,
                           merge_size=2, size={"shortest_edge": 4096, "longest_edge": 25165824}, fps=2,
                           do_sample_frames=True, image_mean=_HALF, image_std=_HALF),
                      None)

# Generation configs of the source models (token strings, mapped per tokenizer)
_QWEN_VL_GEN = dict(bos="<|endoftext|>", pad="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], do_sample=True,
                    repetition_penalty=1.05, temperature=0.1, top_k=1, top_p=0.001)

# repo id -> recipe. family: tokenizer_families' family; source, overrides: the script's
# AutoConfig.from_pretrained(MODEL_ID, **overrides); set_text / set_vision / set_root: the attributes a
# script sets on the loaded config (Gemma 4); processor: (class, image processor class, its kwargs,
# the processor's own kwargs, video processor config or None, feature extractor class or None);
# gen: the generation config (None: the one transformers derives from the model config, as for
# Qwen3.5, which publishes none).
REPOS = {
    f"{ORG}/tiny-Gemma3ForConditionalGeneration": dict(
        family="gemma3", model_cls="Gemma3ForConditionalGeneration", config_cls="Gemma3Config", source=GEMMA3_4B_IT,
        overrides=dict(
            text_config=dict(_TINY_TEXT, layer_types=None, intermediate_size=32),
            vision_config=dict(_TINY_TEXT, embed_dim=64, intermediate_size=32, image_size=224)),
        processor=("Gemma3Processor", "Gemma3ImageProcessorPil",
                   dict(size={"height": 224, "width": 224}, image_mean=_HALF, image_std=_HALF, resample=2,
                        do_convert_rgb=None, do_pan_and_scan=None),
                   dict(image_seq_length=256), None, None),
        gen=dict(bos="<bos>", pad="<pad>", eos=["<eos>", "<end_of_turn>"], cache_implementation="hybrid",
                 do_sample=True, top_k=64, top_p=0.95),
        dtype="bfloat16"),
    f"{ORG}/tiny-Gemma4ForConditionalGeneration": dict(
        family="gemma4", model_cls="Gemma4ForConditionalGeneration", config_cls="Gemma4Config", source=GEMMA4_E2B_IT,
        overrides={},
        set_text=dict(_TINY_TEXT, intermediate_size=32, layer_types=["sliding_attention", "full_attention"],
                      num_kv_shared_layers=0, global_head_dim=8, hidden_size_per_layer_input=16),
        set_vision=dict(_TINY_TEXT, embed_dim=64, intermediate_size=32, position_embedding_size=_GEMMA4_IMAGE_TOKENS * 9,
                        default_output_length=_GEMMA4_IMAGE_TOKENS),
        set_root=dict(audio_config=None),
        processor=("Gemma4Processor", "Gemma4ImageProcessorPil",
                   dict(max_soft_tokens=_GEMMA4_IMAGE_TOKENS, image_seq_length=_GEMMA4_IMAGE_TOKENS),
                   dict(image_seq_length=_GEMMA4_IMAGE_TOKENS, audio_seq_length=750, audio_ms_per_token=40),
                   dict(video_processor_type="Gemma4VideoProcessor", patch_size=16, max_soft_tokens=70,
                        pooling_kernel_size=3, num_frames=32, do_sample_frames=True, do_normalize=True,
                        image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0]),
                   "Gemma4AudioFeatureExtractor"),
        gen=dict(bos="<bos>", pad="<pad>", eos=["<eos>", "<turn|>", "<|tool_response>"], do_sample=True,
                 temperature=1.0, top_k=64, top_p=0.95),
        dtype="bfloat16"),
    f"{ORG}/tiny-LlavaNextForConditionalGeneration": dict(
        family="llava_next", model_cls="LlavaNextForConditionalGeneration", config_cls="LlavaNextConfig",
        source=LLAVA_V1_6_MISTRAL_7B,
        overrides=dict(text_config=dict(_TINY_TEXT, layer_types=None, dtype=None),
                       vision_config=dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4,
                                          image_size=_LLAVA_NEXT_TILE),
                       image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS),
        processor=("LlavaNextProcessor", "LlavaNextImageProcessorPil",
                   dict(size={"shortest_edge": _LLAVA_NEXT_TILE},
                        crop_size={"height": _LLAVA_NEXT_TILE, "width": _LLAVA_NEXT_TILE},
                        image_grid_pinpoints=_LLAVA_NEXT_PINPOINTS, image_mean=_CLIP_MEAN,
                        image_std=_CLIP_STD, resample=3, do_center_crop=True, do_pad=True),
                   dict(patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                        num_additional_image_tokens=1), None, None),
        gen=dict(bos="<s>", pad="<pad>", eos=["</s>"]),
        dtype="bfloat16"),
    f"{ORG}/tiny-LlavaForConditionalGeneration": dict(
        family="llava", model_cls="LlavaForConditionalGeneration", config_cls="LlavaConfig", source=LLAVA_1_5_7B,
        overrides=dict(text_config=dict(_TINY_TEXT, layer_types=None),
                       vision_config=dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4)),
        processor=("LlavaProcessor", "CLIPImageProcessorPil",
                   dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, image_mean=_CLIP_MEAN,
                        image_std=_CLIP_STD, resample=3, do_center_crop=True),
                   dict(patch_size=14, vision_feature_select_strategy="default", image_token="<image>",
                        num_additional_image_tokens=1), None, None),
        gen=dict(bos="<s>", pad="<pad>", eos=["</s>"]),
        dtype="float16"),
    f"{ORG}/tiny-Qwen2_5_VLForConditionalGeneration": dict(
        family="qwen2.5-vl", model_cls="Qwen2_5_VLForConditionalGeneration", config_cls="Qwen2_5_VLConfig",
        source=QWEN2_5_VL_3B_INSTRUCT,
        overrides=dict(
            text_config=dict(_TINY_TEXT, layer_types=None, rope_scaling=dict(_QWEN_VL_ROPE)),
            vision_config=dict(hidden_size=16, num_heads=4, depth=2, fullatt_block_indexes=[1], out_hidden_size=16),
            rope_scaling=dict(_QWEN_VL_ROPE), num_hidden_layers=2, hidden_size=16, num_attention_heads=4),
        processor=("Qwen2_5_VLProcessor", "Qwen2VLImageProcessorPil",
                   dict(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14, temporal_patch_size=2,
                        merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
                   {},
                   dict(video_processor_type="Qwen2VLVideoProcessor", patch_size=14, temporal_patch_size=2,
                        merge_size=2, size={"shortest_edge": 3136, "longest_edge": 12845056},
                        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
                   None),
        gen=dict(_QWEN_VL_GEN, temperature=1e-06, top_k=None, top_p=None),
        dtype="bfloat16"),
    f"{ORG}/tiny-Qwen2VLForConditionalGeneration": dict(
        family="qwen2-vl", model_cls="Qwen2VLForConditionalGeneration", config_cls="Qwen2VLConfig",
        source=QWEN2_VL_2B_INSTRUCT,
        overrides=dict(
            text_config=dict(_TINY_TEXT, layer_types=None, rope_scaling=dict(_QWEN_VL_ROPE)),
            vision_config=dict(hidden_size=16, num_heads=4, embed_dim=64, depth=2),
            rope_scaling=dict(_QWEN_VL_ROPE)),
        processor=("Qwen2VLProcessor", "Qwen2VLImageProcessorPil",
                   dict(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14, temporal_patch_size=2,
                        merge_size=2, image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
                   {},
                   dict(video_processor_type="Qwen2VLVideoProcessor", patch_size=14, temporal_patch_size=2,
                        merge_size=2, size={"shortest_edge": 3136, "longest_edge": 12845056},
                        image_mean=_CLIP_MEAN, image_std=_CLIP_STD),
                   None),
        gen=dict(_QWEN_VL_GEN, temperature=0.01),
        dtype="bfloat16"),
    f"{ORG}/tiny-Qwen3_5ForConditionalGeneration-NoThink": dict(
        family="qwen3.5", model_cls="Qwen3_5ForConditionalGeneration", config_cls="Qwen3_5Config",
        source=QWEN3_5_0_8B,
        overrides=dict(
            text_config=dict(_TINY_TEXT, layer_types=["linear_attention", "full_attention"], full_attention_interval=2),
            vision_config=dict(hidden_size=16, depth=2, num_heads=4, intermediate_size=32, out_hidden_size=16)),
        processor=_QWEN3_5_PROCESSOR,
        gen=None,
        fp32_linear_attn=True,
        dtype="bfloat16"),
    f"{ORG}/tiny-Qwen3_5MoeForConditionalGeneration-3.6": dict(
        family="qwen3.6", model_cls="Qwen3_5MoeForConditionalGeneration", config_cls="Qwen3_5MoeConfig",
        source=QWEN3_6_35B_A3B,
        overrides=dict(
            text_config=dict(_TINY_TEXT, layer_types=["linear_attention", "full_attention"], full_attention_interval=2,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             shared_expert_intermediate_size=32),
            vision_config=dict(hidden_size=16, depth=2, num_heads=4, intermediate_size=32, out_hidden_size=16)),
        processor=_QWEN3_5_PROCESSOR,
        gen=dict(bos="<|endoftext|>", pad="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], do_sample=True,
                 temperature=1.0, top_k=20, top_p=0.95),
        dtype="bfloat16"),
}

_ID_KEY_SUFFIXES = ("_token_id", "_token_index", "_token_ids")


def _full_vocab(family: str) -> bool:
    """Whether the stand-in tokenizer has the source model's ids (then the vocab sizes stay)."""
    return family.startswith("qwen") and not tokenizer_families.is_compact(family)


def _resolve(value, tokenizer, family: str, key: str = ""):
    """Token strings under *_token_id / *_token_index keys -> this tokenizer's ids; vocab sizes ->
    len(tokenizer) for a small vocabulary (root and text config; the vision towers' are left)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k in ("vocab_size", "vocab_size_per_layer_input") and isinstance(v, int) and not _full_vocab(family) \
                    and "vision" not in key:
                out[k] = len(tokenizer)
            else:
                out[k] = _resolve(v, tokenizer, family, k if not key else f"{key}.{k}")
        return out
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith(_ID_KEY_SUFFIXES) or leaf == "eos_token_id":
        if isinstance(value, str):
            return _token_id(tokenizer, value)
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return [_token_id(tokenizer, v) for v in value]
    return copy.deepcopy(value)


def _token_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"token {token!r} is not in the stand-in tokenizer")
    return i


def build_config(repo_id: str, tokenizer):
    """The config TRL's script makes: ConfigClass.from_dict(source, **overrides), then its setattr's."""
    import transformers

    spec = REPOS[repo_id]
    family = spec["family"]
    source = _resolve(spec["source"], tokenizer, family)
    overrides = _resolve(spec["overrides"], tokenizer, family)
    config_cls = getattr(transformers, spec["config_cls"])
    if spec.get("set_text") or spec.get("set_vision"):
        # Gemma 4's script loads the config and sets attributes on it; transformers 5.5 wrote them
        # into config.json as they are, and this is how 5.24 loads that file
        source["text_config"].update(_resolve(spec.get("set_text", {}), tokenizer, family))
        source["vision_config"].update(_resolve(spec.get("set_vision", {}), tokenizer, family))
        source.update(spec.get("set_root", {}))
    config = config_cls.from_dict(source, **overrides)
    config.architectures = [spec["model_cls"]]
    return config


class _ConfigOnly:
    """A stand-in for a video processor that needs torchvision: it carries the real one's config
    (written into processor_config.json) and refuses to process anything."""

    def __init__(self, config: dict):
        self.config = dict(config)
        self.merge_size = config.get("merge_size", 2)
        self.patch_size = config.get("patch_size")
        self.temporal_patch_size = config.get("temporal_patch_size")

    def __call__(self, *args, **kwargs):
        raise ImportError("this stand-in was built without torchvision; its video processor is config only")

    def to_dict(self):
        return dict(self.config)

    def to_json_string(self):
        return json.dumps(self.config, indent=2, sort_keys=True) + "\n"


def build_processor(repo_id: str, tokenizer):
    """The source model's processor class around the stand-in tokenizer and the family's image processor."""
    import transformers
    import transformers.processing_utils as processing_utils
    from transformers.video_processing_utils import VideoProcessorMixin

    spec = REPOS[repo_id]
    proc_name, image_name, image_kwargs, proc_kwargs, video_config, feature_name = spec["processor"]
    image_kwargs = dict(image_kwargs)
    extra_attrs = {k: image_kwargs.pop(k) for k in ("image_seq_length",) if k in image_kwargs}
    image_processor = getattr(transformers, image_name)(**image_kwargs)
    for key, value in extra_attrs.items():
        setattr(image_processor, key, value)
    parts = dict(image_processor=image_processor, tokenizer=tokenizer)
    if feature_name is not None:
        parts["feature_extractor"] = getattr(transformers, feature_name)()
    module = processing_utils.transformers_module
    had_mixin = hasattr(module, "VideoProcessorMixin")
    if video_config is not None:
        config_only = type("VideoProcessorConfigOnly", (_ConfigOnly, VideoProcessorMixin), {})
        parts["video_processor"] = config_only(video_config)
    if not had_mixin:  # ProcessorMixin checks the class by its name on the transformers module
        module.VideoProcessorMixin = VideoProcessorMixin
    try:
        processor = getattr(transformers, proc_name)(**parts, chat_template=tokenizer.chat_template, **proc_kwargs)
    finally:
        if not had_mixin:
            del module.VideoProcessorMixin
    return processor


def build_model(repo_id: str, tokenizer, out_dir: Path, seed: int) -> None:
    """Write the model (config, weights, generation config) and its processor to out_dir."""
    import torch
    import transformers
    from transformers import GenerationConfig

    spec = REPOS[repo_id]
    config = build_config(repo_id, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, spec["model_cls"])(config).to(dtype=getattr(torch, spec["dtype"]))
    if spec.get("fp32_linear_attn"):  # Qwen3.5 keeps these in float32 (TRL's script casts them back)
        text = config.text_config
        for i, layer_type in enumerate(text.layer_types):
            if layer_type == "linear_attention":
                linear_attn = model.model.language_model.layers[i].linear_attn
                linear_attn.A_log.data = linear_attn.A_log.data.float()
                linear_attn.norm.weight.data = linear_attn.norm.weight.data.float()
    gen = spec["gen"]
    if gen is not None:
        extra = {k: v for k, v in gen.items() if k not in ("bos", "pad", "eos") and v is not None}
        ids = {f"{k}_token_id": _token_id(tokenizer, gen[k]) for k in ("bos", "pad") if gen.get(k)}
        eos = [_token_id(tokenizer, t) for t in gen["eos"]]
        model.generation_config = GenerationConfig(**ids, eos_token_id=eos if len(eos) > 1 else eos[0], **extra)
    model.save_pretrained(out_dir)
    processor = build_processor(repo_id, tokenizer)
    processor.save_pretrained(out_dir)
    if spec["family"].startswith("qwen"):  # the tokenizer class the real repos declare
        config_file = Path(out_dir) / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text())
        tok_config["tokenizer_class"] = "Qwen2Tokenizer"
        config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
