"""Tiny models and tokenizers made in the test, never downloaded (shared by all test files).

    from tests.helpers import make_char_tokenizer, make_tiny_model
    tok = make_char_tokenizer()                       # ~100 tokens, one per character
    model = make_tiny_model(tok, arch="qwen2")       # ~30k params, float32, seeded
"""

from __future__ import annotations

from grpokit.models import new_char_tokenizer, new_model_from_config

# A minimal ChatML-like template for tests of the conversational format.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

_ARCH_CONFIGS = {
    "llama": {"model_type": "llama", "num_key_value_heads": 2, "intermediate_size": 64},
    "qwen2": {"model_type": "qwen2", "num_key_value_heads": 2, "intermediate_size": 64},
    "gpt2": {"model_type": "gpt2"},
}


def make_char_tokenizer(chat_template: str | None = None, padding_side: str = "left"):
    """The character-level tokenizer (pad=0, bos=1, eos=2, unk=3); pass CHAT_TEMPLATE for chat tests."""
    tokenizer = new_char_tokenizer(chat_template=chat_template)
    tokenizer.padding_side = padding_side
    return tokenizer


def make_tiny_model(
    tokenizer,
    arch: str = "qwen2",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
    **config_kwargs,
):
    """A freshly initialised tiny causal LM (float32, eval mode) sized for `tokenizer`."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"arch must be one of {sorted(_ARCH_CONFIGS)}, got {arch!r}")
    config = dict(_ARCH_CONFIGS[arch])
    if arch == "gpt2":
        config.update(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions)
    else:
        config.update(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            max_position_embeddings=max_positions,
        )
    config.update(config_kwargs)
    model = new_model_from_config(config, tokenizer, seed=seed)
    return model.eval()
