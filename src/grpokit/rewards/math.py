"""`accuracy`: is the completion's final answer equal to the gold answer?

Answer extraction from the completion, first match wins:
  1. the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), nested braces included,
  2. the last `<answer>...</answer>` block,
  3. the last number in the text (switch off with `last_number=False`).
The gold answer comes from a column (`gold_column`, default `answer`, else `solution`); a worked
solution is reduced the same way (last `\\boxed{}`, `<answer>`, or the text after GSM8K's `####`).

Comparison: a gold answer made only of words ("Paris", "B", "\\text{(B)}") is compared as a
normalised string (case, spaces, surrounding brackets and a final period ignored); anything else is
parsed and compared by math-verify (LaTeX, fractions, sets, intervals, 0.5 == \\frac{1}{2}).
A gold answer that is empty or that math-verify cannot parse gives None (not applicable) with a
warning, never a crash. math-verify's own signal-based timeouts are switched off (they fail off the
main thread); the RewardRunner's wall-clock timeout bounds every call instead.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

from grpokit.rewards.text import completion_text

__all__ = ["AccuracyReward", "accuracy_reward", "extract_answer", "extract_gold", "is_equivalent"]

logger = logging.getLogger("grpokit.rewards")

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")
_PLAIN = re.compile(r"[A-Za-z][A-Za-z \-'.]*")


def _balanced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at text[open_at] == "{", or None if it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        c = text[i]
        if c == "\\":  # skip escaped characters such as \{ and \}
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} / `\\boxed 5` in `text`."""
    for m in reversed(list(_BOX.finditer(text))):
        rest = m.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            content = _balanced(text, rest)
            if content is not None:
                return content.strip()
        elif rest > m.end():  # "\boxed 5": up to the next space or $
            token = re.match(r"[^\s$]+", text[rest:])
            if token:
                return token.group(0)
    return None


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    num = found[-1].replace(" ", "")
    if "," in num:
        num = num.replace(",", "") if _THOUSANDS.fullmatch(num) else num.rsplit(",", 1)[-1]
    return num or None


def extract_answer(text: str, *, answer_tags: bool = True, last_number: bool = True) -> str | None:
    """The completion's final answer as a string, or None when it gives none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if answer_tags:
        tags = _ANSWER_TAG.findall(text)
        if tags:
            return tags[-1].strip()
    return _last_number(text) if last_number else None


def extract_gold(gold) -> str | None:
    """A gold column value (a bare answer or a worked solution) -> the answer string."""
    if gold is None:
        return None
    if isinstance(gold, (int, float)) and not isinstance(gold, bool):
        return repr(gold) if isinstance(gold, float) else str(gold)
    text = str(gold)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:  # GSM8K
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def _unwrap_text(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _TEXT_WRAP.sub(r"\1", s)
    return s.replace("$", "").strip()


def _is_plain(gold: str) -> bool:
    return bool(_PLAIN.fullmatch(_unwrap_text(gold).strip(" ()[]{}.:*")))


def normalize_string(s: str) -> str:
    s = _unwrap_text(s).replace("\\", " ")
    s = " ".join(s.casefold().split())
    return s.strip(" ()[]{}.:*\"'")


class _QuietMathVerify(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader", "math_verify.utils"):
        logging.getLogger(name).addFilter(_QuietMathVerify())
    return math_verify


@functools.lru_cache(maxsize=16384)
def _parse(s: str) -> tuple:
    """math-verify parse of an answer string; () when nothing parses. Signal timeouts are off."""
    mv = _math_verify()
    tries = [s] if ("\\boxed" in s or "$" in s) else ["\\boxed{" + s + "}", s]
    for t in tries:
        try:
            parsed = mv.parse(t, parsing_timeout=None)
        except Exception:  # malformed LaTeX: latex2sympy raises on some inputs
            parsed = []
        if any(not isinstance(x, str) for x in parsed):  # a string alone means "could not parse"
            return tuple(parsed)
    return ()


@functools.lru_cache(maxsize=16384)
def _verify(gold: str, pred: str, float_rounding: int, numeric_precision: int) -> bool:
    g, p = _parse(gold), _parse(pred)
    if not g or not p:
        return False
    try:
        return bool(_math_verify().verify(list(g), list(p), float_rounding=float_rounding,
                                          numeric_precision=numeric_precision, timeout_seconds=None))
    except Exception:
        return False


def is_equivalent(gold: str, pred: str | None, mode: str = "auto", float_rounding: int = 6,
                  numeric_precision: int = 15) -> bool | None:
    """Is `pred` the same answer as `gold`? None when the gold answer cannot be used."""
    if gold is None or not gold.strip():
        return None
    if mode == "string" or (mode == "auto" and _is_plain(gold)):
        return pred is not None and normalize_string(pred) == normalize_string(gold)
    if not _parse(gold):
        return None
    if pred is None:
        return False
    if pred.strip() == gold.strip():
        return True
    return _verify(gold, pred, float_rounding, numeric_precision)


class AccuracyReward:
    """1.0 if the completion's answer equals the gold answer, 0.0 if not, None if the gold is unusable.

    gold_column: the column holding the gold answer (default: `answer`, else `solution`).
    mode: "auto" (words -> string match, else math-verify), "math" or "string".
    answer_tags / last_number: extraction fallbacks after \\boxed{} (see the module docstring).
    correct / incorrect: the reward values.
    """

    def __init__(self, gold_column: str | None = None, mode: str = "auto", answer_tags: bool = True,
                 last_number: bool = True, correct: float = 1.0, incorrect: float = 0.0,
                 float_rounding: int = 6, numeric_precision: int = 15):
        if mode not in ("auto", "math", "string"):
            raise ValueError(f"accuracy: mode={mode!r}; use auto, math or string.")
        self.__name__ = "accuracy"
        self.gold_column, self.mode = gold_column, mode
        self.answer_tags, self.last_number = answer_tags, last_number
        self.correct, self.incorrect = float(correct), float(incorrect)
        self.float_rounding, self.numeric_precision = float_rounding, numeric_precision
        self._warned: set[str] = set()

    def _column(self, columns) -> str:
        if self.gold_column is not None:
            if self.gold_column not in columns:
                raise ValueError(f"gold_column {self.gold_column!r} is not a dataset column "
                                 f"(columns: {sorted(columns)}).")
            return self.gold_column
        for name in ("answer", "solution"):
            if name in columns:
                return name
        raise ValueError(f"needs the gold answer in a column named 'answer' or 'solution' (columns: "
                         f"{sorted(columns)}); or set reward_kwargs {{'accuracy': {{'gold_column': ...}}}}.")

    def check_columns(self, columns: set[str]) -> None:
        self._column(columns)

    def __setstate__(self, state: dict) -> None:
        """Unpickled in a worker process: import and warm up math-verify now, outside any timed call."""
        self.__dict__.update(state)
        _parse("\\frac{1}{2}")
        _verify("(x+1)^2", "x^2+2x+1", self.float_rounding, self.numeric_precision)

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float | None]:
        golds = columns[self._column(columns)]
        return [self.score(completion_text(c), g) for c, g in zip(completions, golds)]

    def score(self, text: str, gold) -> float | None:
        gold_str = extract_gold(gold)
        pred = extract_answer(text, answer_tags=self.answer_tags, last_number=self.last_number)
        ok = is_equivalent(gold_str, pred, self.mode, self.float_rounding, self.numeric_precision) \
            if gold_str is not None else None
        if ok is None:
            key = repr(gold)[:200]
            if key not in self._warned and len(self._warned) < 20:
                self._warned.add(key)
                logger.warning("accuracy: cannot parse the gold answer %s; its rows get None (not applicable).", key)
            return None
        return self.correct if ok else self.incorrect


accuracy_reward = AccuracyReward()


class ReasoningAccuracyReward(AccuracyReward):
    """TRL's `reasoning_accuracy_reward`: `accuracy` on the text after the last reasoning delimiter
    (default `</think>`); a completion without one scores `incorrect` (its reasoning never ended)."""

    def __init__(self, reasoning_delimiters: Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.__name__ = "reasoning_accuracy_reward"
        self.delimiters = list(reasoning_delimiters or ["</think>"])

    def score(self, text: str, gold) -> float | None:
        cut = max((text.rfind(d) + len(d) for d in self.delimiters if d in text), default=-1)
        if cut < 0:
            return self.incorrect if extract_gold(gold) is not None else None
        return super().score(text[cut:], gold)
