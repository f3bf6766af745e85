"""Built-in tasks with tools: problems a small model cannot solve alone, and can with a tool.

`multiply`: "What is 347*86?" (a 3-digit times a 2-digit number). A model of a million parameters
cannot multiply; with the `multiply` tool it calls `multiply(a=347, b=86)`, reads 29842 and answers
it. The reward is the exact product in the final answer. Prompts are conversational (the tool's
schema reaches the model through the chat template's `tools=`).

Its starter model (src/grpokit/assets/starter-multiply, configs/starter_multiply_sft.yaml) is
fine-tuned on a sloppy teacher that guesses the product without the tool in most of its answers:
it can call the tool (high pass@8) but prefers to guess (low greedy accuracy), which GRPO fixes.
"""

from __future__ import annotations

import random
import re
from typing import Any

from grpokit.data.tasks import Task, completion_text, fraction_hash, in_eval_split


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product a * b.
    """
    return int(a) * int(b)


_FINAL_INT = re.compile(r"\s*(-?\d+)\s*$")


def final_integer(completion: Any) -> int | None:
    """The integer a completion's final answer is (the last message's whole content), else None."""
    m = _FINAL_INT.fullmatch(completion_text(completion) or "")
    return int(m.group(1)) if m else None


def multiply_reward(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the final answer is exactly the product (column "answer"), else 0.0."""
    if answer is None:
        raise ValueError("multiply_reward needs the dataset column 'answer'")
    return [1.0 if final_integer(c) == int(a) else 0.0 for c, a in zip(completions, answer, strict=True)]


def used_tool(completion: Any) -> bool:
    return isinstance(completion, list) and any(m.get("role") == "tool" for m in completion if isinstance(m, dict))


def _multiply_is_correct(completion: Any, answer: Any = None, **row) -> bool:
    return answer is not None and final_integer(completion) == int(answer)


def make_multiply_task(seed: int = 0, num_train: int | None = 20000, num_eval: int = 200, *,
                       reference_guess_rate: float = 0.0) -> Task:
    """Products a*b with 100 <= a <= 999, 10 <= b <= 99, asked as "What is a*b?".

    About a tenth of the 81,000 problems (by a hash of the problem, in_eval_split) form the eval
    pool. reference_guess_rate: the fraction of SFT reference transcripts in which the teacher
    answers a guess of the right size without calling the tool (chosen by a hash of problem and
    seed); the others call multiply and answer its result.
    """
    import datasets

    if not 0.0 <= reference_guess_rate <= 1.0:
        raise ValueError(f"reference_guess_rate must be in [0, 1], got {reference_guess_rate}")
    problems = [(a, b) for a in range(100, 1000) for b in range(10, 100)]
    random.Random(seed).shuffle(problems)
    eval_pool: list[tuple[int, int]] = []
    train_pool: list[tuple[int, int]] = []
    for a, b in problems:
        (eval_pool if in_eval_split(f"{a}*{b}") else train_pool).append((a, b))
    train_rows = train_pool if num_train is None else train_pool[:num_train]

    def to_dataset(rows):
        return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": f"What is {a}*{b}?"}]
                                                      for a, b in rows],
                                           "a": [a for a, _ in rows], "b": [b for _, b in rows],
                                           "answer": [a * b for a, b in rows]})

    def reference_completion(row: dict[str, Any]) -> list[dict]:
        a, b = int(row["a"]), int(row["b"])
        if fraction_hash(f"guess:{seed}:{a}*{b}") < reference_guess_rate:
            rng = random.Random(f"{seed}:{a}*{b}")
            guess = a * b + rng.choice([-1, 1]) * rng.randint(1, max(1, a * b // 10))
            return [{"role": "assistant", "content": str(guess)}]
        call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": a, "b": b}}}
        return [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "multiply", "content": str(a * b)},
                {"role": "assistant", "content": str(a * b)}]

    return Task(
        name="multiply",
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_pool[:num_eval]),
        reward_funcs=[multiply_reward],
        reward_weights=None,
        extract_answer=lambda text: str(final_integer(text)) if final_integer(text) is not None else None,
        is_correct=_multiply_is_correct,
        max_completion_length=96,
        reference_completion=reference_completion,
        description="3-digit x 2-digit multiplication with a multiply tool; reward: exact product",
        tools=[multiply],
    )


# --------------------------------------------------------------------------------------------
# guess the number: a multi-turn environment with feedback
# --------------------------------------------------------------------------------------------

GUESS_LOW, GUESS_HIGH = 1, 7


class GuessTheNumber:
    """TRL-style environment: `reset(secret=...)` takes the row's secret (so the G conversations of a
    prompt play the same game), the tool `guess(n)` answers "higher", "lower" or "correct", and
    `get_reward()` is 1.0 for solving it in one guess, 0.2 less for each extra guess (at least 0.2),
    0.0 when unsolved. Bisection solves 1..7 in at most 3 guesses (mean reward 0.71); scanning
    upwards from 1 needs up to 7."""

    def reset(self, secret: int = 4, **row) -> None:
        self.secret, self.guesses, self.solved = int(secret), 0, False

    def guess(self, n: int) -> str:
        """Guess the secret number.

        Args:
            n: The number guessed.
        """
        if self.solved:
            return "already solved"
        self.guesses += 1
        if int(n) == self.secret:
            self.solved = True
            return "correct"
        return "higher" if int(n) < self.secret else "lower"

    def get_reward(self) -> float:
        return max(0.2, 1.0 - 0.2 * (self.guesses - 1)) if self.solved else 0.0


def _guess_is_correct(completion: Any, secret: Any = None, **row) -> bool:
    """Solved: a tool message says "correct"."""
    return isinstance(completion, list) and any(
        isinstance(m, dict) and m.get("role") == "tool" and m.get("content") == "correct" for m in completion)


def _bisection(secret: int, low: int, high: int) -> list[int]:
    out = []
    while True:
        mid = (low + high) // 2
        out.append(mid)
        if mid == secret:
            return out
        low, high = (mid + 1, high) if mid < secret else (low, mid - 1)


def make_guess_task(seed: int = 0, num_train: int | None = 2000, num_eval: int = 70, *,
                    reference_scan_rate: float = 0.0) -> Task:
    """Guess a number between 1 and 7 with the `guess` tool of the GuessTheNumber environment; the
    reward is the environment's (fewer guesses, more reward). Rows: the prompt and the `secret`.
    There are only 7 games, so the eval split is the same games, seeded differently (it measures
    the strategy, not memory). reference_scan_rate: the fraction of SFT transcripts in which the
    teacher scans upwards from 1 instead of bisecting (chosen by a hash of row and seed)."""
    import datasets

    rng = random.Random(seed)
    prompt = [{"role": "user", "content": f"Guess my number between {GUESS_LOW} and {GUESS_HIGH}."}]

    def rows(n, salt):
        secrets = [rng.randint(GUESS_LOW, GUESS_HIGH) for _ in range(n)]
        return datasets.Dataset.from_dict({"prompt": [prompt] * n, "secret": secrets,
                                           "game": [f"{salt}{i}" for i in range(n)]})

    eval_ds = datasets.Dataset.from_dict({"prompt": [prompt] * num_eval,
                                          "secret": [GUESS_LOW + i % (GUESS_HIGH - GUESS_LOW + 1)
                                                     for i in range(num_eval)],
                                          "game": [f"e{i}" for i in range(num_eval)]})

    def reference_completion(row: dict[str, Any]) -> list[dict]:
        secret = int(row["secret"])
        scan = fraction_hash(f"scan:{seed}:{row['game']}") < reference_scan_rate
        guesses = list(range(GUESS_LOW, secret + 1)) if scan else _bisection(secret, GUESS_LOW, GUESS_HIGH)
        out: list[dict] = []
        for g in guesses:
            call = {"type": "function", "function": {"name": "guess", "arguments": {"n": g}}}
            reply = "correct" if g == secret else ("higher" if g < secret else "lower")
            out += [{"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": "guess", "content": reply}]
        return out + [{"role": "assistant", "content": str(secret)}]

    return Task(
        name="guess",
        train_dataset=rows(num_train or 2000, "t"),
        eval_dataset=eval_ds,
        reward_funcs=[],
        reward_weights=None,
        extract_answer=lambda text: text.strip() or None,
        is_correct=_guess_is_correct,
        max_completion_length=320,
        reference_completion=reference_completion,
        description="guess a number in 1..7 with higher/lower feedback; reward: solved in few guesses",
        environment_factory=GuessTheNumber,
    )
