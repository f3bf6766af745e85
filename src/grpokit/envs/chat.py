"""Tool calling through the tokenizer's chat template: can it render tools, how a model's turn is
parsed (transformers' `parse_response` with the tokenizer's `response_template`), and which tokens
follow a turn when tool results come back.

transformers parses a response with the tokenizer's `response_template` (a dict spec of the
model's output format). Hub tokenizers increasingly ship one; for those that do not, grpokit sets
one for the tool-call formats it recognises in the chat template (`TOOL_CALL_FORMATS`): Qwen2.5 /
Qwen3's JSON in `<tool_call>` tags, Qwen3.5's XML `<function=...>` calls, Llama 3's bare JSON.
Any other template needs `tokenizer.response_template` set by the user (the error says so).
"""

from __future__ import annotations

from typing import Any, Callable

QWEN_JSON = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True,
                       "content": "json", "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
QWEN_XML = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "reasoning_content": {"open": "<think>", "close_pattern": r"</think>\s*", "content": "text"},
        "tool_calls": {"open_pattern": r"<tool_call>\s*<function=(?P<name>[^\n>]+)>",
                       "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "xml-inline",
                       "content_args": {"tag_pattern": r"<parameter=(?P<key>[^>\n]+)>\s*(?P<value>.*?)\s*</parameter>",
                                        "value_parser": {"name": "text"}},
                       "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
LLAMA3_JSON = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "fields": {
        "tool_calls": {"open_pattern": r'\{"name":\s*"(?P<name>[^"]+)",\s*"parameters":\s*',
                       "close_pattern": r"\}<\|eot_id\|>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{content}"}}},
        "content": {"close_pattern": r"<\|eot_id\|>\s*", "content": "text"},
    },
}

TOOL_CALL_FORMATS: list[tuple[str, Callable[[str], bool], dict]] = [
    ("qwen-xml", lambda t: "<|im_start|>" in t and "<function=" in t and "<tool_call>" in t, QWEN_XML),
    ("qwen-json", lambda t: "<|im_start|>" in t and '<tool_call>\\n{"name": "' in t.replace("\n", "\\n"), QWEN_JSON),
    ("llama3-json", lambda t: "<|start_header_id|>" in t and '"parameters": ' in t, LLAMA3_JSON),
]
"""(name, test on the chat template's source, response_template) in the order tried."""


def _template_source(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return "\n".join(str(v) for v in t.values())
    return t or ""


def ensure_response_template(tokenizer) -> str:
    """Give `tokenizer` a `response_template` for parsing tool calls (its own if it has one);
    returns where it came from. Raises ValueError naming the fix when the format is unknown."""
    if getattr(tokenizer, "response_template", None) is not None:
        return "the tokenizer's own response_template"
    source = _template_source(tokenizer)
    for name, matches, template in TOOL_CALL_FORMATS:
        if matches(source):
            tokenizer.response_template = template
            return f"grpokit's {name} response_template"
    raise ValueError("tools: grpokit cannot tell how this tokenizer's model writes tool calls (its chat template is "
                     f"none of {', '.join(n for n, _, _ in TOOL_CALL_FORMATS)}). Set tokenizer.response_template "
                     "(transformers' response-parsing spec for its output format) before building the trainer.")


def supports_tool_calling(tokenizer) -> bool:
    """Whether the chat template renders a whole tool exchange (user -> assistant with
    tool_calls -> tool): the tool's name, its argument and the tool's result must all appear."""
    if getattr(tokenizer, "chat_template", None) is None:
        return False
    name, key, value, result = "tool_name_7f3a", "arg_key_9b2c", "arg_val_4d1e", "tool_result_c8e5"
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": name, "arguments": {key: value}}}]},
                {"role": "tool", "name": name, "content": result}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that refuses the roles (jinja's TemplateError, TypeError, ...)
        return False
    return all(s in text for s in (name, key, value, result))


def check_tool_template(tokenizer) -> str:
    """Raise ValueError (naming the fix) unless the tokenizer can render and parse tool calls."""
    if not supports_tool_calling(tokenizer):
        raise ValueError("tools / environment_factory: the tokenizer's chat template cannot render a tool-calling "
                         "conversation (user -> assistant with tool_calls -> tool). Use a model whose template "
                         "supports tools (Qwen2.5, Qwen3, Llama 3.1+, ...) or pass processing_class= with such a "
                         "template (tokenizer.chat_template).")
    return ensure_response_template(tokenizer)


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def tool_suffix_ids(tokenizer, tool_messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """The tokens that follow a model turn ending in its EOS when `tool_messages` answer it: the
    tool results and the header of the next assistant turn, as the chat template renders them
    (measured on a one-call conversation, so the model's own turn is never re-encoded): what the
    template renders after the assistant turn's EOS."""
    kw = dict(chat_template_kwargs or {})
    call = [{"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}]
    head = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
    prefix = _ids(tokenizer.apply_chat_template(head, tokenize=True, add_generation_prompt=False, **kw))
    full = _ids(tokenizer.apply_chat_template(head + list(tool_messages), tokenize=True, add_generation_prompt=True,
                                              **kw))
    eos = tokenizer.eos_token_id
    turn_ends = sum(t == eos for t in prefix)
    full_ends = [i for i, t in enumerate(full) if t == eos]
    if turn_ends and len(full_ends) > turn_ends:
        # the assistant turn ends at its EOS, the k-th of the conversation however the template renders
        # that turn's content (Qwen3 drops an empty think block once a tool message follows)
        return full[full_ends[turn_ends - 1] + 1:]
    if full[:len(prefix)] != prefix:
        raise ValueError("the chat template renders an assistant turn differently once a tool message follows it "
                         "and ends turns without the EOS token, so tool results cannot be appended token by token.")
    return full[len(prefix):]


def parse_turn(tokenizer, turn_ids: list[int], prefix_ids: list[int], tools: list | None) -> tuple[dict, bool]:
    """One model turn as a message (transformers' `parse_response`), and whether its tool calls
    were malformed (unparseable, or a call without a function name): then the message is the
    turn's text with no tool calls, and the conversation ends there."""
    def as_text() -> dict:  # the turn's text, no tool calls (decoded only when the parse is not used)
        return {"role": "assistant", "content": tokenizer.decode(turn_ids, skip_special_tokens=True)}

    try:
        message = tokenizer.parse_response(turn_ids, prefix=prefix_ids[-64:], tools=tools or None)
    except Exception:  # noqa: BLE001 - any parser failure is a malformed turn
        fallback = as_text()
        return fallback, _looks_like_call(fallback["content"])
    if not isinstance(message, dict):
        return as_text(), True
    calls = message.get("tool_calls")
    if calls is None:
        return {"role": "assistant", **{k: v for k, v in message.items() if k != "role"}}, False
    if not isinstance(calls, list) or not all(_valid_call(c) for c in calls):
        return as_text(), True
    for c in calls:
        fn = c.get("function", c)
        if fn.get("arguments") is None:
            fn["arguments"] = {}
    return {"role": "assistant", "content": message.get("content") or "", **{
        k: v for k, v in message.items() if k not in ("role", "content")}}, False


def _valid_call(call: Any) -> bool:
    if not isinstance(call, dict):
        return False
    fn = call.get("function", call)
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments", {}),
                                                                                   (dict, type(None)))


def _looks_like_call(text: str) -> bool:
    return "<tool_call>" in text or "<function=" in text
