"""Tokenizers for the stand-in models, built locally (nothing is downloaded).

Each family gets the special tokens, the chat template (the original one, as TRL keeps it in
`trl/chat_templates/`, so that TRL recognises it) and the pad/eos/bos choices of the tokenizer
that the real `trl-internal-testing` repo ships. No merges table (but Qwen3.5's, below): text is
tokenized one byte (Qwen) or one character (the others) per token.

Qwen (`qwen3`, and `qwen2.5` with GRPOKIT_TRL_COMPAT_FULL_VOCAB=1) is built to the real ids,
because TRL's tests hard-code them (a mocked `generate` returns `151645` for `<|im_end|>`,
`151643` for padding, `151657` for `<tool_call>` and a few dozen ordinary Qwen tokens in the
tool-call completions of tiny-Qwen3MoeForCausalLM). It is a byte-level BPE with Qwen's own
pipeline (NFC, Qwen's split regex, ByteLevel), so transformers' `Qwen2Tokenizer` (which
AutoTokenizer picks for model_type qwen2 whatever tokenizer_config.json says) rebuilds the very
same tokenizer from the vocabulary:

- ids 0..255 are the 256 byte-level characters in GPT-2's order, as in Qwen (`198` is "\\n",
  `220` is " ", `64` is "a", `0` is "!");
- the multi-character ordinary tokens that TRL's tests spell out (`QWEN_TEST_TOKENS`, read off
  the comments beside the id lists, e.g. `4913` = '{"', `17453` = "Done") have their real ids, so
  a test's mocked completion decodes to the text its comment shows;
- every other ordinary id decodes to a distinct filler `<f{id}>` (a random model samples any of
  the 151k ids, and each must decode to some text, as with the real vocabulary);
- with no merges, text is encoded one byte per token (decoding is exact; encoding gives other
  ids than the real tokenizer for multi-character pieces, which no TRL test depends on);
- the added tokens (`<|endoftext|>` 151643, `<|im_start|>` 151644, `<|im_end|>` 151645, ...,
  `<tool_call>` 151657 ...) have their real ids and special flags.

`qwen2.5` (tiny-Qwen2ForCausalLM-2.5 and its reward model, which most tests use) is compact by
default: the same 256 byte ids, then the added tokens from id 256 on (278 ids in all). A 151k-id
vocabulary makes every step's logits 500x wider, and the tests 3-5x slower on a CPU; the one
TRL test that hard-codes Qwen2.5 ids (test_train_with_mask_truncated_completions, whose mocked
generate returns 151645) is skipped on grpokit for another reason. Set
GRPOKIT_TRL_COMPAT_FULL_VOCAB=1 to build it with the real ids as well.

The other families (Llama 3.2, Mistral, Gemma 2, Cohere 2, GLM-4-MoE, GPT-OSS, Nemotron 3) are
small: their special tokens, then the printable ASCII characters. No TRL test hard-codes their
ids, and the small vocabulary keeps the models cheap.

The vision-language families (`VISION_FAMILIES`, for vision_repos.py) follow the same rules:
Qwen2-VL / Qwen2.5-VL are Qwen2.5's ids (compact by default), Gemma 3 / Gemma 4 / Llava /
Llava-Next are small, each with its image tokens (`<|image_pad|>`, `<start_of_image>`, `<|image|>`,
`<image>`, ...) and, where the processor reads them, the named tokens of its tokenizer_config.json
(`tokenizer.boi_token`, `tokenizer.image_token`, ...). Qwen3.5 / Qwen3.6 (one tokenizer, 248320
ids in the model) have the real ids, as test_train_with_tools_multimodal_response hard-codes them
(`<|im_end|>` 248046, `<tool_call>` 248058, and `QWEN3_5_TEST_TOKENS`), with Qwen3.5's split
regex, and 3000 merges learnt on the stand-ins' own templates and dataset rows (`trained_merges`),
the merged tokens on the lowest free ordinary ids: a prompt then takes about as many tokens as with
the real tokenizer (a 248k-wide log-softmax at every position of one byte per token made that test
take half an hour on a CPU). Decoding stays exact; the ids of merged pieces are not the real ones.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "chat_templates"

# The printable ASCII characters, one token each, plus the replacement character for anything else.
CHARS = ["\t", "\n", *[chr(c) for c in range(32, 127)]]
UNK_CHAR = "\ufffd"

# Ordinary (non-added) Qwen2/Qwen3 tokens spelled out by the comments of TRL's tests
# (tests/test_grpo_trainer.py: the tool-call and environment tests' mocked completions).
QWEN_TEST_TOKENS = {
    25: ":", 27: "<", 29: ">",  # single bytes, listed for completeness (GPT-2 byte order)
    293: " b", 314: " {", 330: ' "', 397: ">\n", 411: "out", 450: "dec", 497: '",', 522: "</",
    606: "name", 788: '":', 894: " any", 927: "sh", 944: "'t", 1318: "text", 1414: " know",
    1513: " don", 2765: " won", 4913: '{"', 5212: ' {"', 5392: " tool", 6023: "hi", 6659: "call",
    7692: "async", 9520: "step", 11248: "}}\n", 13477: "rement", 14172: "tool", 16252: " increment",
    16370: "arguments", 17453: "Done", 22785: "_tool", 35744: "increment", 64648: "multiply",
    93054: "_multiply", 95642: '"}}\n',
}
QWEN_NUM_ORDINARY = 151643  # ids 0..151642 are ordinary tokens, as in Qwen2/Qwen2.5/Qwen3

# (id, content, special) of the added tokens, as in the real tokenizer.json files.
QWEN2_5_ADDED = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True), (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True), (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True), (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False), (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False), (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
]
QWEN3_ADDED = QWEN2_5_ADDED + [
    (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]

# Qwen3.5 / Qwen3.6 (one tokenizer, 248320 ids in the model): ordinary ids 0..248043 (the same 256
# byte ids first), then the added tokens from 248044 on, as in Qwen/Qwen3.5-0.8B's tokenizer.json
# (the ids its config names: vision_start 248053, image_pad 248056, video_pad 248057).
QWEN3_5_NUM_ORDINARY = 248044
QWEN3_5_ADDED = [(QWEN3_5_NUM_ORDINARY + i, content, special) for i, (_, content, special) in enumerate(QWEN3_ADDED)] + [
    (248070, "<|audio_start|>", True), (248071, "<|audio_end|>", True), (248072, "<tts_pad>", True),
    (248073, "<tts_text_bos>", True), (248074, "<tts_text_eod>", True), (248075, "<tts_text_bos_single>", True),
    (248076, "<|audio_pad|>", True),
]
# Ordinary Qwen3.5 tokens spelled out by TRL's test_train_with_tools_multimodal_response (its mocked
# completions '<tool_call>\n<function=screenshot_tool>\n</function>\n</tool_call>', "I don't know any
# tool", "Done!"); 13744 + 30091 + 22076 decode to "=screenshot_tool" (how the real vocabulary splits
# it among the three is not known here, and no test depends on it).
QWEN3_5_TEST_TOKENS = {
    0: "!", 27: "<", 29: ">", 40: "I", 198: "\n",  # single bytes (GPT-2 byte order), listed for completeness
    510: "</", 866: " any", 914: "'t", 1366: " know", 1459: " don", 1628: "function", 5224: " tool",
    13744: "=screen", 16936: "Done", 22076: "_tool", 30091: "shot",
}


def gpt2_byte_order() -> list[int]:
    """The bytes in the order of GPT-2's (and Qwen's) byte-level alphabet: id i is byte order[i]."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def byte_level_alphabet() -> list[str]:
    """GPT-2's `bytes_to_unicode`, in id order: the character that stands for byte order[i]."""
    order = gpt2_byte_order()
    return [chr(b) if i < 188 else chr(256 + i - 188) for i, b in enumerate(order)]


def to_byte_level(text: str) -> str:
    encoder = dict(zip(gpt2_byte_order(), byte_level_alphabet()))
    return "".join(encoder[b] for b in text.encode("utf-8"))


# transformers' Qwen2Tokenizer split regex (= Qwen's tokenizer.json)
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# transformers' Qwen3_5Tokenizer split regex (also marks, \p{M}, go with the letters)
QWEN3_5_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3.5's tokenizer gets merges (learnt on the stand-ins' templates and datasets, `trained_merges`)
# so that its prompts take about as many tokens as with the real one: one byte per token made the
# tools system prompt of test_train_with_tools_multimodal_response ~1200 tokens, and every training
# step computes the 248k-wide log-softmax at every position.
QWEN3_5_MERGES = 3000


# family -> how to build it. "small" families: (leading specials, trailing specials); a token is
# (content, special). The chat template is the original one (see chat_templates/README in TRL).
FAMILIES = {
    "qwen2.5": dict(added=QWEN2_5_ADDED, template="qwen2_5.jinja", eos="<|im_end|>", pad="<|endoftext|>",
                    model_max_length=131072, compact=os.environ.get("GRPOKIT_TRL_COMPAT_FULL_VOCAB", "") in ("", "0")),
    "qwen3": dict(added=QWEN3_ADDED, template="qwen3.jinja", eos="<|im_end|>", pad="<|endoftext|>",
                  model_max_length=131072),
    "llama3.2": dict(
        leading=[], trailing=[("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|start_header_id|>", True),
                              ("<|end_header_id|>", True), ("<|eot_id|>", True), ("<|eom_id|>", True),
                              ("<|python_tag|>", True), ("<|finetune_right_pad_id|>", True)],
        template="llama3_2.jinja", bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, model_max_length=131072),
    "mistral0.2": dict(
        leading=[("<unk>", True), ("<s>", True), ("</s>", True)], trailing=[], unk="<unk>",
        # mistralai/Mistral-7B-Instruct-v0.2's template (TRL keeps no copy of it)
        template_text=(
            "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
        ),
        bos="<s>", eos="</s>", add_bos=True, model_max_length=1000000000000000019884624838656),
    "gemma2": dict(
        leading=[("<pad>", True), ("<eos>", True), ("<bos>", True), ("<unk>", True)],
        trailing=[("<start_of_turn>", True), ("<end_of_turn>", True)], unk="<unk>",
        template="gemma.jinja", bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True, model_max_length=8192),
    "cohere2": dict(
        leading=[("<PAD>", True), ("<UNK>", True), ("<BOS_TOKEN>", True), ("<EOS_TOKEN>", True)],
        trailing=[("<|START_OF_TURN_TOKEN|>", True), ("<|END_OF_TURN_TOKEN|>", True), ("<|USER_TOKEN|>", True),
                  ("<|CHATBOT_TOKEN|>", True), ("<|SYSTEM_TOKEN|>", True), ("<|START_RESPONSE|>", True),
                  ("<|END_RESPONSE|>", True), ("<|START_THINKING|>", True), ("<|END_THINKING|>", True)],
        unk="<UNK>", template="cohere2.jinja", bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>",
        add_bos=True, model_max_length=8192),
    "glm4moe": dict(
        leading=[], trailing=[("<|endoftext|>", True), ("[MASK]", True), ("[gMASK]", True), ("[sMASK]", True),
                              ("<sop>", True), ("<eop>", True), ("<|system|>", True), ("<|user|>", True),
                              ("<|assistant|>", True), ("<|observation|>", True), ("<think>", False),
                              ("</think>", False), ("<tool_call>", False), ("</tool_call>", False),
                              ("<tool_response>", False), ("</tool_response>", False), ("<arg_key>", False),
                              ("</arg_key>", False), ("<arg_value>", False), ("</arg_value>", False)],
        template="glm4moe.jinja", eos="<|endoftext|>", pad="<|endoftext|>", model_max_length=128000),
    "gptoss": dict(
        leading=[], trailing=[("<|startoftext|>", True), ("<|endoftext|>", True), ("<|return|>", True),
                              ("<|constrain|>", True), ("<|channel|>", True), ("<|start|>", True),
                              ("<|end|>", True), ("<|message|>", True), ("<|call|>", True)],
        template="gptoss.jinja", bos="<|startoftext|>", eos="<|return|>", pad="<|endoftext|>",
        model_max_length=1000000000000000019884624838656),
    "nemotron3": dict(
        leading=[("<unk>", True), ("<s>", True), ("</s>", True)],
        trailing=[("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False), ("</think>", False),
                  ("<tool_call>", False), ("</tool_call>", False), ("<tool_response>", False),
                  ("</tool_response>", False)],
        unk="<unk>", template="nemotron_3_nano.jinja", bos="<s>", eos="<|im_end|>", model_max_length=262144),
}

# The vision-language families (vision_repos.py): each source model's special tokens, image tokens
# and original chat template (TRL's copies in trl/chat_templates/; Gemma 4's is the canonical Gemma 4
# template that TRL keeps as diffusion_gemma.jinja). `extra` are the named model-specific tokens of
# the real tokenizer_config.json (`tokenizer.boi_token`, `tokenizer.image_token`, ...), which the
# Gemma processors read.
_COMPACT_QWEN2_5 = os.environ.get("GRPOKIT_TRL_COMPAT_FULL_VOCAB", "") in ("", "0")
_GEMMA_LEADING = [("<pad>", True), ("<eos>", True), ("<bos>", True), ("<unk>", True), ("<mask>", True)]
_LLAMA2_LEADING = [("<unk>", True), ("<s>", True), ("</s>", True)]
_HUGE = 1000000000000000019884624838656  # "no limit", as the SentencePiece-era tokenizer configs say
VISION_FAMILIES = {
    # Qwen2-VL / Qwen2.5-VL: Qwen2.5's vocabulary (compact by default, as "qwen2.5") and the VL template
    "qwen2-vl": dict(added=QWEN2_5_ADDED, template="qwen2_5_vl.jinja", eos="<|im_end|>", pad="<|endoftext|>",
                     model_max_length=32768, compact=_COMPACT_QWEN2_5),
    "qwen2.5-vl": dict(added=QWEN2_5_ADDED, template="qwen2_5_vl.jinja", eos="<|im_end|>", pad="<|endoftext|>",
                       model_max_length=131072, compact=_COMPACT_QWEN2_5),
    # Qwen3.5 (Qwen/Qwen3.5-0.8B: thinking off by default) and Qwen3.6: the real 248k ids, as a TRL
    # test's mocked completions hard-code them
    "qwen3.5": dict(added=QWEN3_5_ADDED, num_ordinary=QWEN3_5_NUM_ORDINARY, test_tokens=QWEN3_5_TEST_TOKENS,
                    pretokenize_regex=QWEN3_5_PRETOKENIZE_REGEX, merges=QWEN3_5_MERGES,
                    template="qwen3_5_nothink.jinja", eos="<|im_end|>", pad="<|endoftext|>", model_max_length=262144),
    "qwen3.6": dict(added=QWEN3_5_ADDED, num_ordinary=QWEN3_5_NUM_ORDINARY, test_tokens=QWEN3_5_TEST_TOKENS,
                    pretokenize_regex=QWEN3_5_PRETOKENIZE_REGEX, merges=QWEN3_5_MERGES,
                    template="qwen3_6.jinja", eos="<|im_end|>", pad="<|endoftext|>", model_max_length=262144),
    "gemma3": dict(
        leading=_GEMMA_LEADING,
        trailing=[("<start_of_turn>", True), ("<end_of_turn>", True), ("<start_of_image>", True),
                  ("<end_of_image>", True), ("<image_soft_token>", True)],
        unk="<unk>", template="gemma3.jinja", bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
        model_max_length=_HUGE,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}),
    "gemma4": dict(
        leading=_GEMMA_LEADING,
        trailing=[("<|turn>", True), ("<turn|>", True), ("<|image>", True), ("<image|>", True), ("<|image|>", True),
                  ("<|audio>", True), ("<audio|>", True), ("<|audio|>", True), ("<|video|>", True),
                  ("<|think|>", False), ("<|channel>", False), ("<channel|>", False), ("<|tool>", False),
                  ("<tool|>", False), ("<|tool_call>", False), ("<tool_call|>", False), ("<|tool_response>", False),
                  ("<tool_response|>", False), ('<|"|>', False)],
        unk="<unk>", template="gemma4.jinja", bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
        model_max_length=_HUGE,
        extra={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>", "boa_token": "<|audio>",
               "eoa_token": "<audio|>", "audio_token": "<|audio|>"}),
    # llava-hf/llava-v1.6-mistral-7b-hf: Mistral-7B-Instruct-v0.2's tokens, then <image> and <pad>
    "llava_next": dict(
        leading=_LLAMA2_LEADING, trailing=[("<image>", True), ("<pad>", True)], unk="<unk>",
        template="llava_next.jinja", bos="<s>", eos="</s>", pad="<pad>", add_bos=True, model_max_length=_HUGE),
    # llava-hf/llava-1.5-7b-hf: Llama 2's tokens, then <image> and <pad>; its template (TRL keeps no copy)
    "llava": dict(
        leading=_LLAMA2_LEADING, trailing=[("<image>", True), ("<pad>", True)], unk="<unk>",
        template_text=(
            "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
            "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
            "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
            "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
            "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
            "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
        ),
        bos="<s>", eos="</s>", pad="<pad>", add_bos=True, model_max_length=_HUGE),
}
FAMILIES.update(VISION_FAMILIES)


def chat_template(family: str) -> str:
    spec = FAMILIES[family]
    return spec["template_text"] if "template_text" in spec else (TEMPLATES / spec["template"]).read_text()


def _char_pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")


def is_compact(family: str) -> bool:
    return bool(FAMILIES[family].get("compact"))


def merge_corpus() -> list[str]:
    """The text the merges are learnt from: the stand-ins' chat templates (the tools system prompts
    are in them) and the zen datasets' rows (their generator scripts' source), line by line."""
    here = Path(__file__).resolve().parent
    files = sorted(TEMPLATES.glob("*.jinja")) + [here / "zen_data.py", here / "zen_image_data.py"]
    return [line for file in files for line in file.read_text().splitlines(keepends=True)]


def trained_merges(regex: str, num_merges: int) -> list[tuple[str, str]]:
    """`num_merges` byte-level BPE merges learnt on `merge_corpus()` with Qwen's pre-tokenizer
    (deterministic: same corpus, same merges)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + num_merges, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(merge_corpus(), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _qwen_backend(spec):
    """Byte-level BPE over Qwen's ids (see the module docstring), with Qwen's pipeline."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    alphabet = byte_level_alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    added = spec["added"]
    if spec.get("compact"):  # the added tokens right after the 256 bytes
        added = [(256 + j, content, special) for j, (_, content, special) in enumerate(added)]
    regex = spec.get("pretokenize_regex", QWEN_PRETOKENIZE_REGEX)
    merges = []
    if not spec.get("compact"):
        for i, text in spec.get("test_tokens", QWEN_TEST_TOKENS).items():
            if i >= 256:
                vocab[to_byte_level(text)] = i
        if spec.get("merges"):  # the merged tokens take the lowest ordinary ids that no test names
            merges = trained_merges(regex, spec["merges"])
            free = (i for i in range(256, spec["num_ordinary"]) if i not in set(vocab.values()))
            for left, right in merges:
                if left + right not in vocab:
                    vocab[left + right] = next(free)
        taken = set(vocab.values())
        for i in range(256, spec.get("num_ordinary", QWEN_NUM_ORDINARY)):
            if i not in taken:
                vocab[f"<f{i}>"] = i
    for i, content, _ in added:
        vocab[content] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                                   continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                                   byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    return backend, [(content, special) for _, content, special in added]


def build_tokenizer(family: str):
    """A `PreTrainedTokenizerFast` of `family` (see FAMILIES), padding on the right as the hub ones."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[family]
    if family.startswith("qwen"):
        backend, added = _qwen_backend(spec)
    else:
        tokens = [*spec["leading"], *[(c, None) for c in CHARS]]
        unk = spec.get("unk")
        if unk is None:
            tokens.append((UNK_CHAR, None))
            unk = UNK_CHAR
        tokens += spec["trailing"]
        vocab = {content: i for i, (content, _) in enumerate(tokens)}
        added = [(content, special) for content, special in tokens if special is not None]
        backend = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        backend.pre_tokenizer = _char_pre_tokenizer()
        backend.decoder = decoders.Fuse()
    backend.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in added if not s])
    backend.add_special_tokens([AddedToken(c, special=True, normalized=False) for c, s in added if s])
    if spec.get("add_bos"):
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, backend.token_to_id(bos))])
    kwargs = {k: spec[k] for k in ("bos", "eos", "pad") if spec.get(k)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **{f"{k}_token": v for k, v in kwargs.items()},
        unk_token=spec.get("unk"),
        clean_up_tokenization_spaces=False,
        model_max_length=spec["model_max_length"],
        padding_side="right",
        **({"extra_special_tokens": dict(spec["extra"])} if spec.get("extra") else {}),
    )
    tokenizer.chat_template = chat_template(family)
    if family.startswith("qwen"):
        tokenizer.init_kwargs.update(errors="replace", split_special_tokens=False, add_prefix_space=False)
    return tokenizer


def save_tokenizer(tokenizer, family: str, out_dir: Path) -> None:
    """save_pretrained, declaring the tokenizer class the real repo declares (Qwen2Tokenizer for Qwen)."""
    import json

    tokenizer.save_pretrained(out_dir)
    if family.startswith("qwen"):
        config_file = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        config["tokenizer_class"] = "Qwen2Tokenizer"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
