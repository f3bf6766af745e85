"""Length shaping: DAPO's soft overlong punishment and the cosine length reward of
"Demystifying Long Chain-of-Thought Reasoning in LLMs" (Yeo et al., 2025)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from grpokit.rewards.math import AccuracyReward
from grpokit.rewards.registry import reward_factory
from grpokit.rewards.text import completion_text

__all__ = ["SoftOverlongPunishment", "CosineLengthReward"]


class SoftOverlongPunishment:
    """DAPO (Yu et al., 2025), eq. 13, as TRL's `get_soft_overlong_punishment`, on token counts L:

        0                                  if L <= max_completion_len - soft_punish_cache
        (max_len - cache - L) / cache      if max_len - cache < L <= max_len   (linear, 0 -> -1)
        -1                                 if L > max_completion_len

    e.g. max_completion_len=100, soft_punish_cache=20: L=80 -> 0, L=90 -> -0.5, L=100 -> -1.
    """

    use_process_pool = False  # cheap: pickling the ids would cost more than the computation

    def __init__(self, max_completion_len: int, soft_punish_cache: int):
        if not (0 <= soft_punish_cache <= max_completion_len) or max_completion_len <= 0:
            raise ValueError(f"soft_overlong_punishment: need 0 <= soft_punish_cache ({soft_punish_cache}) <= "
                             f"max_completion_len ({max_completion_len}), max_completion_len > 0.")
        self.__name__ = "soft_overlong_punishment"
        self.max_completion_len, self.soft_punish_cache = int(max_completion_len), int(soft_punish_cache)

    def penalty(self, length: int) -> float:
        start = self.max_completion_len - self.soft_punish_cache
        if length <= start:
            return 0.0
        if length <= self.max_completion_len:
            return (start - length) / self.soft_punish_cache
        return -1.0

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids: Sequence | None = None,
                 **columns) -> list[float]:
        if completion_ids is None:
            raise ValueError("soft_overlong_punishment needs completion_ids (the completions' token ids).")
        return [self.penalty(len(ids)) for ids in completion_ids]


class CosineLengthReward:
    """Correct answers: max_value_correct at length 0, falling along a half cosine to
    min_value_correct at max_len. Wrong answers: min_value_wrong at length 0, rising to
    max_value_wrong at max_len (a wrong answer is punished less when it thought longer):

        r = lo + (hi - lo) * (1 + cos(pi * min(L / max_len, 1))) / 2
        correct: lo, hi = min_value_correct, max_value_correct
        wrong:   lo, hi = max_value_wrong, min_value_wrong

    e.g. defaults, L = max_len / 2 (cos = 0): correct 0.75, wrong -0.75.
    Lengths over max_len get `exceed_length` when set (the paper's r_e), else the L = max_len value.
    unit: "tokens" (completion_ids), "chars", or "auto" (tokens when completion_ids are given).
    Correctness is judged by `accuracy` (its kwargs via `accuracy_kwargs`); None when it gives None.
    """

    def __init__(self, max_len: int = 1000, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0, exceed_length: float | None = None,
                 unit: str = "auto", accuracy_kwargs: dict | None = None):
        if max_len <= 0:
            raise ValueError(f"cosine_length: max_len must be > 0, got {max_len}.")
        if unit not in ("auto", "tokens", "chars"):
            raise ValueError(f"cosine_length: unit={unit!r}; use auto, tokens or chars.")
        self.__name__ = "cosine_length"
        self.max_len, self.unit, self.exceed_length = int(max_len), unit, exceed_length
        self.correct_range = (float(min_value_correct), float(max_value_correct))
        self.wrong_range = (float(max_value_wrong), float(min_value_wrong))
        self.accuracy = AccuracyReward(**(accuracy_kwargs or {}))

    def check_columns(self, columns: set[str]) -> None:
        self.accuracy.check_columns(columns)

    def value(self, length: int, correct: bool) -> float:
        if length > self.max_len and self.exceed_length is not None:
            return float(self.exceed_length)
        lo, hi = self.correct_range if correct else self.wrong_range
        return lo + (hi - lo) * (1.0 + math.cos(math.pi * min(length / self.max_len, 1.0))) / 2.0

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids: Sequence | None = None,
                 **columns) -> list[float | None]:
        if self.unit == "tokens" and completion_ids is None:
            raise ValueError("cosine_length with unit='tokens' needs completion_ids.")
        token_ids = completion_ids if self.unit != "chars" else None  # lengths in tokens where given
        correct = self.accuracy(prompts, completions, completion_ids, **columns)
        out: list[float | None] = []
        for i, (c, ok) in enumerate(zip(completions, correct)):
            length = len(token_ids[i]) if token_ids is not None else len(completion_text(c))
            out.append(None if ok is None else self.value(length, ok == self.accuracy.correct))
        return out


@reward_factory
def trl_soft_overlong_punishment(max_completion_len: int = 1280, soft_punish_cache: int = 256):
    """TRL's CLI entry `get_soft_overlong_punishment`: DAPO's length penalty with the values TRL's
    grpo script uses (max_completion_len=1280, soft_punish_cache=256)."""
    reward = SoftOverlongPunishment(max_completion_len=max_completion_len, soft_punish_cache=soft_punish_cache)
    return reward

