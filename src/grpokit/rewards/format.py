"""Format rewards: `<think>...</think><answer>...</answer>` (strict and soft) and a user regex."""

from __future__ import annotations

import re
from collections.abc import Sequence

from grpokit.rewards.registry import reward_factory
from grpokit.rewards.text import completion_text

__all__ = ["ThinkAnswerFormat", "SoftThinkAnswerFormat", "RegexReward", "think_answer_format",
           "soft_think_answer_format"]

# strict: the whole completion is one think block then one answer block, whitespace around only,
# and no stray <think>/<answer> tags inside either block
_STRICT = re.compile(r"\s*<think>((?:(?!</?think>|</?answer>).)*)</think>\s*"
                     r"<answer>((?:(?!</?think>|</?answer>).)*)</answer>\s*", re.DOTALL)
_SOFT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)


class ThinkAnswerFormat:
    """1.0 when the completion has the reasoning format, else 0.0.

    strict=True: exactly `<think>...</think>` then `<answer>...</answer>` and nothing else (both
    blocks non-empty). strict=False: the two blocks appear, in that order, anywhere.
    think_prefilled=True: the chat template already opened `<think>` in the prompt (DeepSeek-R1,
    Qwen3), so the completion starts inside the think block.
    """

    def __init__(self, strict: bool = True, think_prefilled: bool = False, reward: float = 1.0,
                 penalty: float = 0.0):
        self.__name__ = "think_answer_format" if strict else "soft_think_answer_format"
        self.strict, self.think_prefilled = strict, think_prefilled
        self.reward, self.penalty = float(reward), float(penalty)

    def matches(self, text: str) -> bool:
        if self.think_prefilled and not text.lstrip().startswith("<think>"):
            text = "<think>" + text
        if not self.strict:
            return _SOFT.search(text) is not None
        m = _STRICT.fullmatch(text)
        return m is not None and bool(m.group(1).strip()) and bool(m.group(2).strip())

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float]:
        return [self.reward if self.matches(completion_text(c)) else self.penalty for c in completions]


class SoftThinkAnswerFormat(ThinkAnswerFormat):
    """`ThinkAnswerFormat(strict=False)` under its own registry name (`soft_format`)."""

    def __init__(self, think_prefilled: bool = False, reward: float = 1.0, penalty: float = 0.0):
        super().__init__(strict=False, think_prefilled=think_prefilled, reward=reward, penalty=penalty)


def _flags(flags: str | int) -> int:
    if isinstance(flags, int):
        return flags
    table = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}
    out = 0
    for ch in flags:
        if ch not in table:
            raise ValueError(f"regex: unknown flag {ch!r} in {flags!r}; use letters from 'imsxa'.")
        out |= table[ch]
    return out


class RegexReward:
    """`match_reward` when the completion matches `pattern`, else `miss_reward`.

    how: "search" (anywhere), "match" (at the start) or "fullmatch" (the whole completion).
    flags: letters from "imsxa" (re.IGNORECASE, MULTILINE, DOTALL, VERBOSE, ASCII) or an int.
    """

    def __init__(self, pattern: str, flags: str | int = "", how: str = "search", match_reward: float = 1.0,
                 miss_reward: float = 0.0, name: str = "regex"):
        if how not in ("search", "match", "fullmatch"):
            raise ValueError(f"regex: how={how!r}; use search, match or fullmatch.")
        try:
            self.regex = re.compile(pattern, _flags(flags))
        except re.error as e:
            raise ValueError(f"regex: cannot compile {pattern!r}: {e}") from None
        self.__name__ = name
        self.how, self.match_reward, self.miss_reward = how, float(match_reward), float(miss_reward)

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float]:
        find = getattr(self.regex, self.how)
        return [self.match_reward if find(completion_text(c)) else self.miss_reward for c in completions]


think_answer_format = ThinkAnswerFormat()
soft_think_answer_format = SoftThinkAnswerFormat()


@reward_factory
def think_format_reward(**kwargs) -> RegexReward:
    """TRL's `think_format_reward`: 1 when the completion starts with one `<think>...</think>`
    block (and has no second `<think>`), else 0 (TRL's pattern, DOTALL | MULTILINE, matched at the start)."""
    return RegexReward(r"^<think>(?!.*<think>)(.*?)</think>.*$", flags="sm", how="match",
                       name="think_format_reward", **kwargs)

