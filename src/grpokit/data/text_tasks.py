"""Built-in text tasks for a model that can write (SmolLM2-135M-Instruct): content generation
rewarded by a metric, and dialogue rewarded by a judge.

`shorten`: the program writes a long sentence around a core ("Early this morning, Anna found the
old key in the garden, because it seemed like a good idea at the time.") and asks for it in at most
`max_words` words; the reward is chrF against the core ("Anna found the old key in the garden.",
`grpokit.rewards.similarity`) plus a word-limit penalty. Sentences, cores and splits are generated
(disjoint by a stable hash of the sentence), so nothing is downloaded.

`dialogue`: a user gives their name and asks for something small ("Hi, I'm Maria. Can you suggest
a name for my cat?"); the training reward is a judge (`reward_funcs: [judge]`, pointed at a model
in `reward_kwargs`, see docs/judges.md) ranking each group for `DIALOGUE_CRITERIA`; the held-out
grader checks two of those criteria by rule (the reply uses the user's name and stays within
`max_words` words), so it measures whether the judge taught what it was asked to, without the
judge.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from grpokit.data.tasks import Task, completion_text, in_eval_split

__all__ = ["make_shorten_task", "make_dialogue_task", "word_limit_reward", "DIALOGUE_CRITERIA"]

NAMES = ["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack"]
ACTS = [("found", "key"), ("painted", "fence"), ("fixed", "bike"), ("lost", "wallet"), ("sold", "car"),
        ("baked", "cake"), ("washed", "dog"), ("read", "letter"), ("opened", "box"), ("moved", "table")]
ADJECTIVES = ["old", "red", "small", "heavy", "broken", "new"]
PLACES = ["in the garden", "at the station", "near the river", "in the kitchen", "at school", "behind the house"]
TIMES = ["last Monday", "early this morning", "after lunch", "on a rainy evening", "just before dinner"]
FILLERS = ["while everyone else in the family was still fast asleep", "although nobody had asked for it at all",
           "because it seemed like a very good idea at the time", "and then went home feeling rather pleased",
           "without telling a single one of the neighbours about it"]
INSTRUCTION = ("Shorten this sentence to at most {n} words. Keep who did what and where. "
               "Reply with the short sentence only.\n\n{sentence}")


def word_limit_reward(completions, max_words, **kwargs) -> list[float]:
    """0 within `max_words` words, else -(extra words) / max_words, down to -1."""
    out = []
    for c, limit in zip(completions, max_words):
        words = len(completion_text(c).split())
        out.append(0.0 if words <= limit else -min(1.0, (words - limit) / limit))
    return out


def make_shorten_task(seed: int = 0, num_train: int = 2000, num_eval: int = 100, max_words: int = 10,
                      chat: bool = True) -> Task:
    """The `shorten` task; `chat`: prompts as one user message (for chat models), else plain text."""
    from datasets import Dataset

    from grpokit.tracking import import_optional

    sacrebleu = import_optional("sacrebleu", "the shorten task's chrF needs sacrebleu", "text")
    rows: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for name, (verb, noun), adj, place, when, filler in itertools.product(NAMES, ACTS, ADJECTIVES, PLACES, TIMES,
                                                                           FILLERS):
        core = f"{name} {verb} the {adj} {noun} {place}."
        sentence = f"{when[0].upper()}{when[1:]}, {name} {verb} the {adj} {noun} {place}, {filler}."
        text = INSTRUCTION.format(n=max_words, sentence=sentence)
        rows[in_eval_split(sentence)].append({"prompt": [{"role": "user", "content": text}] if chat else text,
                                              "reference": core, "max_words": max_words})
    rng = random.Random(seed)
    train, evals = rows[False], rows[True]
    rng.shuffle(train)
    evals = sorted(evals, key=lambda r: r["reference"] + str(r["prompt"]))
    random.Random(0).shuffle(evals)  # a fixed eval order: a smaller eval split is a prefix of a larger one
    def is_correct(completion, reference, max_words, **row) -> bool:
        text = completion_text(completion)
        return len(text.split()) <= max_words and sacrebleu.sentence_chrf(text, [reference]).score >= 60.0

    return Task(
        name="shorten",
        train_dataset=Dataset.from_list(train[:num_train]),
        eval_dataset=Dataset.from_list(evals[:num_eval]),
        reward_funcs=["chrf", word_limit_reward],  # the chrf reward reads the "reference" column
        reward_weights=[1.0, 0.5],
        extract_answer=lambda text: text.strip() or None,
        is_correct=is_correct,
        max_completion_length=48,
        reference_completion=lambda row: row["reference"],
        description=f"shorten a generated sentence to <= {max_words} words (chrF against its core + a word limit)",
    )


DIALOGUE_CRITERIA = "addressing the user by their name, answering their request, and being brief (two sentences at most)"
INTROS = ["Hi, I'm {name}.", "Hello! My name is {name}.", "{name} here.", "Hey, it's {name}.", "Good morning, I am {name}."]
REQUESTS = ["Can you suggest a name for my cat?", "What should I cook tonight?", "Can you recommend a book?",
            "How can I stay focused while studying?", "What is a fun thing to do on a rainy day?",
            "Can you give me a tip for sleeping better?", "What colour should I paint my room?",
            "How do I make my mornings less stressful?", "What is a good gift for a friend who likes tea?",
            "Can you suggest a short walk I could take after work?"]
USER_NAMES = ["Maria", "Tom", "Aisha", "Lukas", "Sofia", "Kenji", "Olivia", "Mateo", "Nina", "Omar", "Lena", "Ravi"]


def make_dialogue_task(seed: int = 0, num_train: int = 400, num_eval: int = 60, max_words: int = 30) -> Task:
    """The `dialogue` task (conversational prompts); its reward is the `judge` reward, which needs
    a judge model (reward_kwargs: {judge: {model: ..., base_url: ...}})."""
    from datasets import Dataset

    rows: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for name, intro, request in itertools.product(USER_NAMES, INTROS, REQUESTS):
        text = f"{intro.format(name=name)} {request}"
        rows[in_eval_split(text, eval_fraction=5)].append(
            {"prompt": [{"role": "user", "content": text}], "user_name": name, "max_words": max_words})
    train, evals = rows[False], rows[True]
    random.Random(seed).shuffle(train)
    random.Random(0).shuffle(evals)

    def is_correct(completion, user_name, max_words, **row) -> bool:
        text = completion_text(completion)
        return user_name.lower() in text.lower() and 0 < len(text.split()) <= max_words

    return Task(
        name="dialogue",
        train_dataset=Dataset.from_list(train[:num_train]),
        eval_dataset=Dataset.from_list(evals[:num_eval]),
        reward_funcs=["judge"],  # a registry name: its model comes from reward_kwargs
        reward_weights=None,
        extract_answer=lambda text: text.strip() or None,
        is_correct=is_correct,
        max_completion_length=64,
        description=f"dialogue: answer a named user briefly, ranked by a judge for {DIALOGUE_CRITERIA}",
    )
