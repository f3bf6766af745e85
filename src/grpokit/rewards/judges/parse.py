"""Reading a judge's answer: a JSON object validated by pydantic, else (lenient) the plain-text
forms small models write. A bad answer raises `BadAnswer` with what was wrong; the judge
retries it."""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["BadAnswer", "parse_ranking", "parse_scores", "parse_winner", "RANKING_SCHEMA", "SCORES_SCHEMA",
           "WINNER_SCHEMA"]

RANKING_SCHEMA = '{"ranking": [the candidates\' numbers, best first]}'
SCORES_SCHEMA = '{"scores": [one number from 0 to 10 per candidate, in the order shown]}'
WINNER_SCHEMA = '{"winner": "A" or "B" or "tie"}'


class BadAnswer(ValueError):
    """The judge's answer could not be read as the requested output."""


def _json_object(text: str) -> dict | None:
    """The first JSON object in `text` (code fences and prose around it allowed), or None."""
    stripped = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    for candidate in (stripped, *re.findall(r"\{.*?\}", text, flags=re.S), *re.findall(r"\{.*\}", text, flags=re.S)):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, TypeError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _models():
    from grpokit.tracking import import_optional

    pydantic = import_optional("pydantic", "judges validate answers with pydantic", "judges")
    BaseModel, ValidationError = pydantic.BaseModel, pydantic.ValidationError

    class Ranking(BaseModel):
        ranking: list[int]

    class Scores(BaseModel):
        scores: list[float]

    class Winner(BaseModel):
        winner: str

    return Ranking, Scores, Winner, ValidationError


def _validated(text: str, model_index: int) -> Any:
    obj = _json_object(text)
    if obj is None:
        return None
    *models, validation_error = _models()
    try:
        return models[model_index].model_validate(obj)
    except validation_error as e:
        raise BadAnswer(f"the JSON does not match the schema: {e.errors()[0]['msg']} in {obj}") from None


def parse_ranking(text: str, n: int, lenient: bool = True) -> list[int]:
    """A ranking of candidates 1..n, best first -> 0-based ids best first.
    '{"ranking": [2, 1, 3]}' -> [1, 0, 2]; lenient: '[2] > [1] > [3]' or '2, 1, 3' too."""
    answer = _validated(text, 0)
    if answer is not None:
        order = answer.ranking
    elif lenient:
        order = [int(x) for x in re.findall(r"\d+", text)]
        order = list(dict.fromkeys(x for x in order if 1 <= x <= n))  # first mention counts
    else:
        raise BadAnswer(f"no JSON object in the answer: {text[:200]!r}")
    if sorted(order) != list(range(1, n + 1)):
        raise BadAnswer(f"the ranking must list each of the numbers 1..{n} once, got {order} from {text[:200]!r}")
    return [x - 1 for x in order]


def parse_scores(text: str, n: int, lenient: bool = True) -> list[float]:
    """One score per candidate in the order shown. '{"scores": [7, 3]}' -> [7.0, 3.0]."""
    answer = _validated(text, 1)
    if answer is not None:
        scores = list(answer.scores)
    elif lenient:
        scores = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", text)]
    else:
        raise BadAnswer(f"no JSON object in the answer: {text[:200]!r}")
    if len(scores) != n or not all(math.isfinite(s) for s in scores):
        raise BadAnswer(f"expected {n} finite scores, got {scores} from {text[:200]!r}")
    return scores


def parse_winner(text: str, lenient: bool = True) -> float:
    """Which of two responses won: 'A' -> 1.0, 'B' -> 0.0, 'tie' -> 0.5."""
    answer = _validated(text, 2)
    if answer is not None:
        word = answer.winner.strip().strip("\"'[]()").lower()
    elif lenient:
        found = set(re.findall(r"\b(A|B|tie)\b", text, flags=re.I))
        words = {w.lower() for w in found}
        word = words.pop() if len(words) == 1 else ""
    else:
        raise BadAnswer(f"no JSON object in the answer: {text[:200]!r}")
    if word not in ("a", "b", "tie"):
        raise BadAnswer(f"the winner must be A, B or tie, got {text[:200]!r}")
    return {"a": 1.0, "b": 0.0, "tie": 0.5}[word]
