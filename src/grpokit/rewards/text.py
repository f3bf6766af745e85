"""Completions as text: strings stay strings, conversational completions (lists of messages) give
the content of their assistant messages."""

from __future__ import annotations

from typing import Any

__all__ = ["completion_text", "content_text", "is_conversational"]


def content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def completion_text(completion: Any) -> str:
    """`"text"` -> "text"; `[{"role": "assistant", "content": "text"}, ...]` -> the assistant content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
        return "\n".join(content_text(m.get("content")) for m in (assistant or messages))
    return "" if completion is None else str(completion)


def is_conversational(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) and "role" in m for m in x)
