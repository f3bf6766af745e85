"""Built-in verifiable tasks that need no download: `arithmetic` and `countdown`.

A task bundles a train and a held-out eval split, TRL-signature reward functions
(`fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]`) and a grader
(`is_correct`) for greedy-accuracy / pass@k evaluation. Splits are deterministic in `seed` and
disjoint: whether a problem can be an eval or a train problem depends only on the problem (a stable
hash), never on the seed or on `num_train` / `num_eval`; the seed only picks and orders them. So a
model warm-started on one seed's train split is never evaluated on its own training problems,
whatever seed or sizes a later run uses (and a smaller eval split is a prefix of a larger one).

Completions may be strings (standard format) or message lists (conversational format, as TRL
passes them); the text graded is the last message's content.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

__all__ = [
    "TASKS",
    "Task",
    "arithmetic_format_reward",
    "arithmetic_reward",
    "check_countdown_equation",
    "countdown_format_reward",
    "countdown_reward",
    "extract_countdown_answer",
    "extract_integer_answer",
    "get_task",
    "make_arithmetic_task",
    "make_countdown_task",
]

RewardFunc = Callable[..., Sequence[float | None]]


@dataclass
class Task:
    """A verifiable task: data, rewards and a grader.

    name: registry name ("arithmetic", "countdown").
    train_dataset / eval_dataset: `datasets.Dataset` with a "prompt" column plus the answer columns
        the rewards read (disjoint, deterministic in the seed).
    reward_funcs: TRL-signature callables `fn(prompts, completions, completion_ids=None, **columns)`, or
        reward registry names (resolved with the run's reward_kwargs).
    reward_weights: one weight per reward function (None: all 1.0), as TRL's `reward_weights`.
    extract_answer: completion text -> the answer string it gives, or None when it gives none.
    is_correct: `is_correct(completion, **row) -> bool`, the grader for greedy accuracy and pass@k.
    stop: stop strings for generation; a completion may end right after one (the string is kept in
        the text, as HF `generate(stop_strings=...)` does). EOS always stops.
    max_completion_length: a suggested generation budget, in tokens.
    reference_completion: `fn(row) -> str` (or a message list for a conversation with tools), a
        reference completion (without EOS) for SFT warm-starts.
    description: one line for logs and `--help`.
    tools / environment_factory: what the model may call (TRL's `tools=` / `environment_factory=`),
        for the tool tasks (grpokit.data.tool_tasks).
    """

    name: str
    train_dataset: Any
    eval_dataset: Any
    reward_funcs: list[RewardFunc | str]
    reward_weights: list[float] | None
    extract_answer: Callable[[str], str | None]
    is_correct: Callable[..., bool]
    stop: list[str] = field(default_factory=list)
    max_completion_length: int = 64
    reference_completion: Callable[[dict[str, Any]], Any] | None = None
    description: str = ""
    tools: list[Callable] | None = None
    environment_factory: Any = None


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of the last message of a message list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        return content if isinstance(content, str) else str(content)
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return ""


def in_eval_split(key: str, eval_fraction: int = 10) -> bool:
    """Whether a problem may ever be an eval problem: a stable hash of the problem alone.

    It depends on neither the seed nor the split sizes, so no seed's train split ever holds another
    seed's eval problem (a model warm-started with seed 0 stays unseen on seed 42's eval split).
    """
    digest = hashlib.sha256(f"grpokit-eval:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % eval_fraction == 0


def _column(columns: dict[str, Any], name: str, n: int, fn_name: str) -> list[Any]:
    value = columns.get(name)
    if value is None:
        raise ValueError(f"{fn_name} needs the dataset column {name!r} (got columns {sorted(columns)})")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{fn_name}: column {name!r} has {len(value)} values for {n} completions")
    return value


def _as_prompt(text: str, chat: bool) -> Any:
    return [{"role": "user", "content": text}] if chat else text


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

_LEADING_INT = re.compile(r"\s*(-?\d+)(?!\d|\.\d)")
_ONLY_INT = re.compile(r"\s*-?\d+\s*")


def extract_integer_answer(completion: Any) -> str | None:
    """The integer the completion starts with ("85" from " 85<eos>" or "85 is it"), else None."""
    match = _LEADING_INT.match(completion_text(completion))
    return match.group(1) if match else None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def arithmetic_reward(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion starts with the right integer (column "answer"), else 0.0."""
    answers = _column({"answer": answer, **kwargs}, "answer", len(completions), "arithmetic_reward")
    rewards = []
    for completion, expected in zip(completions, answers, strict=True):
        given = extract_integer_answer(completion)
        rewards.append(1.0 if given is not None and int(given) == _int_or_none(expected) else 0.0)
    return rewards


def arithmetic_format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 when the completion is just an integer (surrounding whitespace allowed), else 0.0."""
    return [1.0 if _ONLY_INT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def _arithmetic_is_correct(completion: Any, answer: Any = None, **row) -> bool:
    given = extract_integer_answer(completion)
    return given is not None and int(given) == _int_or_none(answer)


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _carry_slip_answer(a: int, op: str, b: int) -> int:
    """The answer with the carry (or borrow) out of the units column got wrong: a real one
    forgotten, or one added where there is none, so the answer is off by ten.

    57+68 -> 115 (carry forgotten), 12+34 -> 56 (phantom carry), 52-38 -> 24 (borrow forgotten),
    58-23 -> 25 (phantom borrow). Where the slip would make a "-" answer negative, and for "*",
    the answer stays right.
    """
    if op == "+":
        return a + b - 10 if a % 10 + b % 10 >= 10 else a + b + 10
    if op == "-":
        slipped = a - b + 10 if a % 10 < b % 10 else a - b - 10
        return slipped if slipped >= 0 else a - b
    return _OPS[op](a, b)


def fraction_hash(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") / 2**64


def make_arithmetic_task(
    seed: int = 0,
    num_train: int | None = None,
    num_eval: int = 200,
    *,
    max_operand: int = 99,
    ops: str = "+-",
    allow_negative: bool = False,
    template: str = "{a}{op}{b}=",
    chat: bool = False,
    reference_slip_rate: float = 0.0,
):
    """Integer arithmetic: prompt "37+48=", completion "85".

    Every (a, op, b) with 0 <= a, b <= max_operand and op in `ops` is a problem ("-" keeps a >= b
    unless allow_negative). About a tenth of them (chosen by a hash of the problem alone, see
    in_eval_split) form the eval pool; `num_eval` are taken from it and `num_train` (None: all)
    from the rest, each in a seeded random order. `chat=True` makes conversational prompts (one
    user message) for chat models. Rewards: exact integer at the start of the completion
    (weight 1.0) and "only an integer" (weight 0.1).

    reference_slip_rate: the fraction of `reference_completion`s (the SFT warm-start targets; never
    the "answer" column or the rewards) written with a carry slip (see _carry_slip_answer), chosen
    by a hash of problem and seed. A model fine-tuned on such a sloppy teacher can still sample the
    right answer but often prefers the slip: a preference GRPO corrects quickly, since it sharpens
    what the model can already sample. The starter model is made this way (configs/starter_sft.yaml).
    """
    import datasets

    if not 0.0 <= reference_slip_rate <= 1.0:
        raise ValueError(f"reference_slip_rate must be in [0, 1], got {reference_slip_rate}")

    unknown = set(ops) - set(_OPS)
    if unknown or not ops:
        raise ValueError(f"ops must be made of {sorted(_OPS)}, got {ops!r}")
    problems = []
    for op in ops:
        for a in range(max_operand + 1):
            for b in range(max_operand + 1):
                if op == "-" and a < b and not allow_negative:
                    continue
                problems.append((a, op, b))
    random.Random(seed).shuffle(problems)
    eval_pool: list[tuple[int, str, int]] = []
    train_pool: list[tuple[int, str, int]] = []
    for a, op, b in problems:
        (eval_pool if in_eval_split(f"{a}{op}{b}") else train_pool).append((a, op, b))
    if num_eval > len(eval_pool):
        raise ValueError(f"num_eval={num_eval} but this arithmetic space has only {len(eval_pool)} eval problems")
    if num_train is not None and num_train > len(train_pool):
        raise ValueError(f"num_train={num_train} but this arithmetic space has only {len(train_pool)} train problems")

    def to_dataset(rows):
        return datasets.Dataset.from_dict(
            {
                "prompt": [_as_prompt(template.format(a=a, op=op, b=b), chat) for a, op, b in rows],
                "answer": [_OPS[op](a, b) for a, op, b in rows],
            }
        )

    train_rows = train_pool if num_train is None else train_pool[:num_train]
    slips = {
        template.format(a=a, op=op, b=b): _carry_slip_answer(a, op, b)
        for a, op, b in train_rows + eval_pool[:num_eval]
        if reference_slip_rate > 0 and fraction_hash(f"slip:{seed}:{a}{op}{b}") < reference_slip_rate
    }

    def reference_completion(row: dict[str, Any]) -> str:
        key = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        return str(slips.get(key, row["answer"]))

    return Task(
        name="arithmetic",
        train_dataset=to_dataset(train_rows),
        eval_dataset=to_dataset(eval_pool[:num_eval]),
        reward_funcs=[arithmetic_reward, arithmetic_format_reward],
        reward_weights=[1.0, 0.1],
        extract_answer=extract_integer_answer,
        is_correct=_arithmetic_is_correct,
        stop=["\n"],
        max_completion_length=64 if chat else 8,
        reference_completion=reference_completion,
        description=f"integer arithmetic ({ops}) on 0..{max_operand}; reward: exact answer",
    )


# --------------------------------------------------------------------------------------------
# countdown
# --------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_OPEN_ANSWER_AT_END = re.compile(r"<answer>((?:(?!<answer>).)*)\Z", re.DOTALL)
_MAX_EQUATION_CHARS = 200
_MAX_AST_NODES = 64

_COUNTDOWN_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use +, -, *, / and "
    "parentheses, and must use each number exactly once. Give the equation in <answer> </answer> tags, "
    "for example <answer>(1 + 2) * 3</answer>."
)


def extract_countdown_answer(completion: Any) -> str | None:
    """The content of the last <answer>...</answer> block (or of a final unclosed <answer>), stripped."""
    text = completion_text(completion)
    matches = _ANSWER_TAG.findall(text)
    if matches:
        return matches[-1].strip()
    tail = _OPEN_ANSWER_AT_END.search(text)
    return tail.group(1).strip() if tail else None


class _Rejected(Exception):
    pass


def _evaluate(node: ast.AST, used: list[int]) -> Fraction:
    """Exact value of an expression made only of integer literals, + - * / and parentheses."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div):
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise _Rejected("division by zero")
        return left / right
    raise _Rejected(f"disallowed syntax: {type(node).__name__}")


def check_countdown_equation(equation: str | None, numbers: Sequence[int], target: int | float) -> bool:
    """True when `equation` uses each of `numbers` exactly once, only + - * / and parentheses, and
    equals `target` within 1e-6. "lhs = rhs" is accepted when rhs is the target.

    The text is parsed with `ast` and walked by hand: nothing is ever executed, so names, calls,
    attributes, powers, unary minus and floats are all rejected.
    """
    if equation is None or len(equation) > _MAX_EQUATION_CHARS:
        return False
    parts = equation.split("=")
    if len(parts) > 2:
        return False
    if len(parts) == 2:
        rhs = parts[1].strip()
        if _int_or_none(rhs) is None or abs(int(rhs) - float(target)) > 1e-6:
            return False
    try:
        tree = ast.parse(parts[0].strip(), mode="eval")
    except (SyntaxError, ValueError):
        return False
    if sum(1 for _ in ast.walk(tree)) > _MAX_AST_NODES:
        return False
    used: list[int] = []
    try:
        value = _evaluate(tree, used)
    except _Rejected:
        return False
    if Counter(used) != Counter(int(n) for n in numbers):
        return False
    return abs(float(value) - float(target)) <= 1e-6


def countdown_reward(prompts, completions, completion_ids=None, numbers=None, target=None, **kwargs) -> list[float]:
    """1.0 when the <answer> equation is valid (see check_countdown_equation), else 0.0."""
    n = len(completions)
    numbers = _column({"numbers": numbers, **kwargs}, "numbers", n, "countdown_reward")
    targets = _column({"target": target, **kwargs}, "target", n, "countdown_reward")
    return [
        1.0 if check_countdown_equation(extract_countdown_answer(c), nums, t) else 0.0
        for c, nums, t in zip(completions, numbers, targets, strict=True)
    ]


def countdown_format_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]:
    """1.0 when the completion holds exactly one <answer>...</answer> block, else 0.0."""
    return [1.0 if len(_ANSWER_TAG.findall(completion_text(c))) == 1 else 0.0 for c in completions]


def _countdown_is_correct(completion: Any, numbers: Sequence[int] = (), target: Any = None, **row) -> bool:
    return target is not None and check_countdown_equation(extract_countdown_answer(completion), numbers, target)


def _random_equation(rng: random.Random, numbers: list[int]) -> tuple[str, Fraction] | None:
    """Combine `numbers` with random ops into one expression; None on division by zero."""
    items: list[tuple[str, Fraction, bool]] = [(str(n), Fraction(n), True) for n in numbers]  # (text, value, atom)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (ta, va, atom_a), (tb, vb, atom_b) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "/" and vb == 0:
            return None
        value = va + vb if op == "+" else va - vb if op == "-" else va * vb if op == "*" else va / vb
        text = f"{ta if atom_a else '(' + ta + ')'} {op} {tb if atom_b else '(' + tb + ')'}"
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(text, value, False)]
    return items[0][0], items[0][1]


def make_countdown_task(
    seed: int = 0,
    num_train: int | None = 2000,
    num_eval: int = 200,
    *,
    num_numbers: int = 3,
    max_number: int = 50,
    max_target: int = 100,
    chat: bool = False,
):
    """Countdown: combine the given numbers with + - * / into an equation that equals the target.

    Each puzzle is made from a random equation over `num_numbers` numbers in 1..max_number whose value
    is an integer in 1..max_target, so every puzzle has a solution (its `reference_completion`).
    Columns: "prompt", "numbers", "target". Rewards: valid equation (weight 1.0) and one <answer> block
    (weight 0.1). Verification parses with `ast` and never executes text.
    """
    import datasets

    if num_train is None:
        raise ValueError("countdown puzzles are generated: give num_train explicitly")
    rng = random.Random(seed)
    train: list[tuple[list[int], int, str]] = []
    evals: list[tuple[list[int], int, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(train) < num_train or len(evals) < num_eval:
        attempts += 1
        if attempts > 200 * (num_train + num_eval) + 10_000:
            raise ValueError("could not generate enough distinct countdown puzzles; raise max_number or max_target")
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        made = _random_equation(rng, numbers)
        if made is None:
            continue
        solution, value = made
        if value.denominator != 1 or not 1 <= value <= max_target:
            continue
        key = f"{sorted(numbers)}->{int(value)}"
        if key in seen:
            continue
        seen.add(key)
        bucket, limit = (evals, num_eval) if in_eval_split(key) else (train, num_train)
        if len(bucket) < limit:
            bucket.append((numbers, int(value), solution))

    def to_dataset(rows):
        return datasets.Dataset.from_dict(
            {
                "prompt": [_as_prompt(_COUNTDOWN_TEMPLATE.format(numbers=n, target=t), chat) for n, t, _ in rows],
                "numbers": [n for n, _, _ in rows],
                "target": [t for _, t, _ in rows],
                "solution": [s for _, _, s in rows],
            }
        )

    return Task(
        name="countdown",
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(evals),
        reward_funcs=[countdown_reward, countdown_format_reward],
        reward_weights=[1.0, 0.1],
        extract_answer=extract_countdown_answer,
        is_correct=_countdown_is_correct,
        stop=["</answer>"],
        max_completion_length=256,
        reference_completion=lambda row: f"<answer>{row['solution']}</answer>",
        description=f"countdown with {num_numbers} numbers in 1..{max_number}, targets 1..{max_target}",
    )


TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": make_arithmetic_task,
    "countdown": make_countdown_task,
}


def get_task(name: str, seed: int = 0, num_train: int | None = None, num_eval: int | None = None, **kwargs) -> Task:
    """A built-in task by name, e.g. get_task("arithmetic", seed=0, num_eval=200).

    num_train / num_eval default to the task's own defaults when None; other keyword arguments go to
    the task's builder (see make_arithmetic_task / make_countdown_task).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    if num_train is not None:
        kwargs["num_train"] = num_train
    if num_eval is not None:
        kwargs["num_eval"] = num_eval
    return TASKS[name](seed=seed, **kwargs)
