"""Tiny models and a tokenizer built from a config, for benchmarks (nothing is downloaded).

`build_model(size, ...)` returns a randomly initialised causal LM (fixed seed) and
`build_tokenizer(vocab_size)` a `PreTrainedTokenizerFast` whose vocabulary matches it:

- ids 0..2 are `<pad>`, `<eos>`, `<bos>`;
- then the 95 printable ASCII characters, one token each (so any ASCII stop string can be
  spelled, and spans several tokens);
- then filler words `w<i>` up to `vocab_size` (decoded as the word, glued to its neighbours).

A random model samples nearly uniformly over a 32k vocabulary, so it would almost never emit EOS
and every completion would run to `max_tokens`. `make_eos_likely(model, eos_id, p)` makes EOS
likely without training: every input embedding gets one shared constant coordinate, which the
residual stream carries to the final hidden state, and the EOS row of the (tied) output
embedding gets a larger value on that coordinate, i.e. a constant extra logit for EOS. The extra
logit is set so that EOS has probability about `p` at each step, hence geometric completion
lengths with mean about 1/p. Both `model.generate` and the engine sample the same model.
"""

from __future__ import annotations

import math

import torch

PAD, EOS, BOS = 0, 1, 2
_SPECIALS = ["<pad>", "<eos>", "<bos>"]
_CHARS = [chr(c) for c in range(32, 127)]

# name -> (config class name, kwargs). "bench" is the ~25M-parameter Qwen2-shaped benchmark model.
SIZES = {
    "bench": dict(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True,
    ),
}


def build_tokenizer(vocab_size: int):
    """A character-level + filler-word tokenizer with `vocab_size` ids (see module doc)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = _SPECIALS + _CHARS
    if vocab_size < len(words):
        raise ValueError(f"vocab_size must be at least {len(words)}, got {vocab_size}")
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        additional_special_tokens=[],
    )


def build_model(size: str = "bench", arch: str = "qwen2", seed: int = 0, dtype=torch.float32):
    """A randomly initialised causal LM ("qwen2", "llama" or "gpt2" shaped) in eval mode."""
    import transformers as tf

    kw = dict(SIZES[size])
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=kw["vocab_size"], n_embd=kw["hidden_size"], n_layer=kw["num_hidden_layers"],
            n_head=kw["num_attention_heads"], n_positions=2048, bos_token_id=BOS, eos_token_id=EOS,
            pad_token_id=PAD,
        )
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cls_cfg, cls_model = {
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        }[arch]
        cfg = cls_cfg(**kw, max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=PAD)
        model = cls_model(cfg)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    return model.to(dtype).eval()


@torch.no_grad()
def make_eos_likely(model, eos_id: int = EOS, p: float = 1 / 64, dim: int = 0, c: float = 0.5):
    """Give EOS a constant extra logit so that it has probability ~p per step (see module doc)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings().weight
    if emb.data_ptr() != out.data_ptr():
        raise ValueError("make_eos_likely expects tied input/output embeddings")
    vocab = emb.shape[0]
    emb[:, dim] = c
    ids = torch.randint(3, vocab, (4, 64), generator=torch.Generator().manual_seed(1))
    # The final hidden state carries the shared coordinate; measure it, then correct three times on the
    # measured mean EOS probability (the coordinate varies a little from position to position).
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][..., dim].mean().item()
    delta = math.log(p / (1 - p) * (vocab - 1))
    for _ in range(3):
        emb[eos_id, dim] = c + delta / h
        p_now = model(input_ids=ids).logits.softmax(-1)[..., eos_id].mean().item()
        delta += math.log(p / p_now)
    emb[eos_id, dim] = c + delta / h
    return model


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
