"""The `trl-internal-testing` text models, rebuilt locally from TRL's own recipes.

Each entry follows the matching script of TRL's `scripts/generate_tiny_models/` (same
architecture, same tiny sizes, same extra config fields, weights initialised as its
`init_weights_tiny_model` does and stored in bfloat16), with the tokenizer of
`tokenizer_families` and the generation config of the model it was cut from. Where the TRL
script sizes the vocabulary with `len(tokenizer.vocab)`, the stand-in does the same with its own
tokenizer (the real size for Qwen3; small for the others and, by default, for Qwen2.5, whose
models then get `len(tokenizer)` rows instead of the source config's 152064).

One deviation from TRL's recipe: a small vocabulary would make a random model sample its stop
tokens every few completions, where the real ones (128k-262k ids) practically never do, so the
untied small-vocabulary causal LMs get `make_eos_rare`.

The vision-language models are in vision_repos.py.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from . import tokenizer_families

REMOTE_CODE = Path(__file__).resolve().parent / "remote_code"

_TINY = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32)
_TINY_RM = dict(_TINY, hidden_size=16)  # the sequence classifiers are a little wider


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# Generation configs of the source models (the eos lists as token strings, mapped per tokenizer).
_QWEN2_5_GEN = dict(bos="<|endoftext|>", pad="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], do_sample=True,
                    repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
_QWEN3_GEN = dict(bos="<|endoftext|>", pad="<|endoftext|>", eos=["<|im_end|>", "<|endoftext|>"], do_sample=True,
                  temperature=0.6, top_k=20, top_p=0.95)
_LLAMA3_2_GEN = dict(bos="<|begin_of_text|>", eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], do_sample=True,
                     temperature=0.6, top_p=0.9)

# repo id -> (tokenizer family, model class, config class, config kwargs, generation config)
REPOS = {
    "trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": (
        "qwen2.5", "Qwen2ForCausalLM", "Qwen2Config",
        dict(_TINY, vocab_size="len", bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"), _QWEN2_5_GEN),
    "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5": (
        # AutoConfig of Qwen/Qwen2.5-32B-Instruct, resized
        "qwen2.5", "Qwen2ForSequenceClassification", "Qwen2Config",
        dict(_TINY_RM, num_labels=1, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
             rms_norm_eps=1e-06, sliding_window=131072, max_window_layers=64, use_sliding_window=False,
             bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"), _QWEN2_5_GEN),
    "trl-internal-testing/tiny-Qwen3ForCausalLM": (
        "qwen3", "Qwen3ForCausalLM", "Qwen3Config",
        dict(_TINY, vocab_size="len", bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"), _QWEN3_GEN),
    "trl-internal-testing/tiny-Qwen3MoeForCausalLM": (
        "qwen3", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
        dict(_TINY, vocab_size=151936, num_experts=4, num_experts_per_tok=2, max_position_embeddings=40960,
             rope_theta=1000000.0, norm_topk_prob=True, bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>",
             head_dim=128, max_window_layers=48), _QWEN3_GEN),
    "trl-internal-testing/tiny-Qwen3ForSequenceClassification": (
        # AutoConfig of Qwen/Qwen3-4B, resized
        "qwen3", "Qwen3ForSequenceClassification", "Qwen3Config",
        dict(_TINY_RM, num_labels=1, vocab_size=151936, head_dim=128, max_position_embeddings=40960,
             rope_theta=1000000.0, rms_norm_eps=1e-06, tie_word_embeddings=True, max_window_layers=36,
             bos_token_id="<|endoftext|>", eos_token_id="<|im_end|>"), _QWEN3_GEN),
    "trl-internal-testing/tiny-LlamaForCausalLM-3.2": (
        "llama3.2", "LlamaForCausalLM", "LlamaConfig", dict(_TINY, vocab_size="len"), _LLAMA3_2_GEN),
    "trl-internal-testing/tiny-LlamaForSequenceClassification-3.2": (
        # AutoConfig of meta-llama/Llama-3.2-1B-Instruct, resized
        "llama3.2", "LlamaForSequenceClassification", "LlamaConfig",
        dict(_TINY_RM, num_labels=1, vocab_size="len", head_dim=64, max_position_embeddings=131072,
             rope_theta=500000.0, rms_norm_eps=1e-05, tie_word_embeddings=True), _LLAMA3_2_GEN),
    "trl-internal-testing/tiny-MistralForCausalLM-0.2": (
        "mistral0.2", "MistralForCausalLM", "MistralConfig", dict(_TINY, vocab_size="len"),
        dict(bos="<s>", eos=["</s>"])),
    "trl-internal-testing/tiny-GptOssForCausalLM": (
        "gptoss", "GptOssForCausalLM", "GptOssConfig",
        dict(_TINY, vocab_size="len", num_local_experts=4, num_experts_per_tok=2),
        dict(bos="<|startoftext|>", pad="<|endoftext|>", eos=["<|return|>", "<|endoftext|>", "<|call|>"],
             do_sample=True)),
    "trl-internal-testing/tiny-Gemma2ForCausalLM": (
        "gemma2", "Gemma2ForCausalLM", "Gemma2Config", dict(_TINY, vocab_size="len"),
        dict(bos="<bos>", pad="<pad>", eos=["<eos>", "<end_of_turn>"], cache_implementation="hybrid")),
    "trl-internal-testing/tiny-Cohere2ForCausalLM": (
        "cohere2", "Cohere2ForCausalLM", "Cohere2Config",
        dict(_TINY, vocab_size="len", logit_scale=1.0, rope_theta=50000, cache_implementation="hybrid", layer_switch=4,
             order_of_interleaved_layers="local_attn_first", position_embedding_type="rope_gptj", rotary_pct=1.0,
             use_embedding_sharing=True, use_gated_activation=True, use_parallel_block=True,
             use_parallel_embedding=False, use_qk_norm=False),
        dict(bos="<BOS_TOKEN>", pad="<PAD>", eos=["<EOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"])),
    "trl-internal-testing/tiny-Glm4MoeForCausalLM": (
        "glm4moe", "Glm4MoeForCausalLM", "Glm4MoeConfig",
        dict(_TINY, vocab_size="len", moe_intermediate_size=32, head_dim=2, n_routed_experts=4, num_experts_per_tok=2,
             attention_bias=True, rope_theta=1000000, routed_scaling_factor=2.5, use_qk_norm=True,
             num_nextn_predict_layers=1),
        dict(pad="<|endoftext|>", eos=["<|endoftext|>", "<|user|>", "<|observation|>"])),
    "trl-internal-testing/tiny-NemotronHForCausalLM-nano": (
        "nemotron3", "NemotronHForCausalLM", "NemotronHConfig",
        dict(vocab_size="len", hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
             layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4, mamba_n_groups=1,
             ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=32, moe_shared_expert_intermediate_size=32, use_mamba_kernels=False),
        dict(bos="<s>", eos=["</s>", "<|im_end|>"])),
    "trl-internal-testing/tiny-RemoteForCausalLM": (
        # a LlamaForCausalLM subclass under model_type "remote", loadable only with trust_remote_code=True
        "llama3.2", "remote", "RemoteConfig", dict(_TINY, vocab_size="len"), _LLAMA3_2_GEN),
}

_REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_remote.RemoteConfig",
    "AutoModel": "modeling_remote.RemoteModel",
    "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
    "AutoModelForSequenceClassification": "modeling_remote.RemoteForSequenceClassification",
}


def small_vocab(repo_id: str) -> bool:
    """Whether the stand-in's vocabulary is much smaller than the real one (all but Qwen3, and
    Qwen2.5 unless GRPOKIT_TRL_COMPAT_FULL_VOCAB=1)."""
    family = REPOS[repo_id][0]
    return not family.startswith("qwen") or tokenizer_families.is_compact(family)


def init_weights_tiny_model(model):
    """TRL's `scripts/generate_tiny_models/_common.py:init_weights_tiny_model`."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def make_eos_rare(model, eos_ids: list[int], dim: int = 0, value: float = 4.0, eos_weight: float = -30.0) -> None:
    """Make the stop tokens (almost) never sampled, as with the real 128k-262k-id vocabularies.

    A random model samples about uniformly, so with the real vocabularies an end-of-sequence
    token comes out with probability ~1e-5 per token and completions run to
    max_completion_length (test_train_with_mask_truncated_completions_all_masked relies on it);
    with a vocabulary of ~100-300 ids it would come out every few completions. Every input
    embedding gets one shared constant coordinate, which the residual stream carries to the final
    hidden state, and the stop tokens' rows of the output embedding a large negative weight on it.
    Not done for tied embeddings (Gemma 2, Cohere 2): there a stop token in the input (Gemma's
    chat template has <end_of_turn> in every prompt) would then predict itself with probability 1.
    """
    import torch

    if model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr():
        return
    with torch.no_grad():
        model.get_input_embeddings().weight[:, dim] = value
        model.get_output_embeddings().weight[eos_ids, dim] = eos_weight


def _seed(repo_id: str) -> int:
    return int(hashlib.sha256(repo_id.encode()).hexdigest()[:8], 16)


def build_model(repo_id: str, tokenizer, out_dir: Path) -> None:
    """Write the model `repo_id` (config, bf16 safetensors, generation config, remote code) to out_dir."""
    import torch
    import transformers
    from transformers import GenerationConfig

    family, model_cls, config_cls, config_kwargs, gen = REPOS[repo_id]
    kwargs = dict(config_kwargs)
    if kwargs.get("vocab_size") == "len" or tokenizer_families.is_compact(family):
        kwargs["vocab_size"] = len(tokenizer)
    if not family.startswith("qwen"):  # the Qwen entries name their (real) special ids themselves
        for key in ("bos", "pad"):
            if gen.get(key):
                kwargs.setdefault(f"{key}_token_id", gen[key])
        kwargs.setdefault("eos_token_id", gen["eos"][0])
    for key, value in list(kwargs.items()):  # special tokens given by name -> this tokenizer's ids
        if key.endswith("_token_id") and isinstance(value, str):
            kwargs[key] = tokenizer.convert_tokens_to_ids(value)
    torch.manual_seed(_seed(repo_id))
    if model_cls == "remote":
        from .remote_code.configuration_remote import RemoteConfig
        from .remote_code.modeling_remote import RemoteForCausalLM

        config = RemoteConfig(**kwargs)
        config.auto_map = dict(_REMOTE_AUTO_MAP)
        model = RemoteForCausalLM(config)
    else:
        config = getattr(transformers, config_cls)(**kwargs)
        if getattr(config, "layer_types", None) is not None:  # TRL's scripts trim it to the layer count
            config.layer_types = config.layer_types[: config.num_hidden_layers]
        model = getattr(transformers, model_cls)(config)
    model = model.to(dtype=torch.bfloat16)
    init_weights_tiny_model(model)
    if model_cls == "NemotronHForCausalLM":  # the upstream model keeps the Mamba mixer's A_log and D in fp32
        for i, block_type in enumerate(config.layers_block_type):
            if block_type == "mamba":
                mixer = model.model.layers[i].mixer
                mixer.A_log.data = mixer.A_log.data.float()
                mixer.D.data = mixer.D.data.float()
    extra = {k: v for k, v in gen.items() if k not in ("bos", "pad", "eos")}
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(gen[k]) for k in ("bos", "pad") if gen.get(k)}
    eos = _ids(tokenizer, *gen["eos"])
    if small_vocab(repo_id) and hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None \
            and "SequenceClassification" not in model_cls:
        make_eos_rare(model, sorted(set(eos + [tokenizer.eos_token_id])))
    model.generation_config = GenerationConfig(**ids, eos_token_id=eos if len(eos) > 1 else eos[0], **extra)
    model.save_pretrained(out_dir)
    if model_cls == "remote":
        for name in ("configuration_remote.py", "modeling_remote.py"):
            shutil.copyfile(REMOTE_CODE / name, out_dir / name)
