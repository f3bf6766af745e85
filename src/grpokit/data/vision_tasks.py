"""Built-in multimodal tasks: images the program draws, so nothing is downloaded.

`colors`: "What colour is the shape?" over a 56-pixel picture of one filled shape (circle, square or
triangle; random size and place) in one of four colours (red, green, blue, yellow) on a grey
background of random shade. The answer is the colour's name; the reward is 1.0 for exactly it
(case and a final full stop aside). Text alone cannot solve it: every prompt has the same words, so
a model that does not look at the image is right one time in four.

Its starter model (src/grpokit/assets/starter-colors, scripts/make_vision_starter.py) is a tiny
Qwen2-VL-shaped model fine-tuned on a colour-blind teacher, who tells warm colours from cool ones but
says the partner colour (red <-> yellow, blue <-> green) in half of its answers: the student answers
in the right form, one colour word of the right pair, and is right about half the time. GRPO then
teaches it to tell the pair apart, from the image.
"""

from __future__ import annotations

import random
import re
from typing import Any

from grpokit.data.tasks import Task, completion_text

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40)}
PARTNER = {"red": "yellow", "yellow": "red", "green": "blue", "blue": "green"}
"""The colour-blind teacher's mix-ups (scripts/make_vision_starter.py)."""
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 56
QUESTION = "What colour is the shape?"


def draw_shape(color: str, shape: str, rng: random.Random, size: int = IMAGE_SIZE):
    """A size x size RGB picture: one filled `shape` in `color` (a COLORS name), random extent
    (a third to two thirds of the side) and place, on a grey background of random shade."""
    from PIL import Image, ImageDraw

    shade = rng.randint(90, 170)
    image = Image.new("RGB", (size, size), (shade, shade, shade))
    extent = rng.randint(size // 3, 2 * size // 3)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    draw = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent - 1), (x0 + extent - 1, y0 + extent - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; use one of {SHAPES}")
    return image


_WORD = re.compile(r"\s*([A-Za-z]+)\s*\.?\s*")


def answered_color(completion: Any) -> str | None:
    """The colour a completion names: its whole text is one word (a final full stop allowed),
    lower-cased; None otherwise."""
    m = _WORD.fullmatch(completion_text(completion) or "")
    return m.group(1).lower() if m else None


def color_reward(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion is the shape's colour (column "answer"), else 0.0."""
    if answer is None:
        raise ValueError("color_reward needs the dataset column 'answer'")
    return [1.0 if answered_color(c) == a else 0.0 for c, a in zip(completions, answer, strict=True)]


def _color_is_correct(completion: Any, answer: Any = None, **row) -> bool:
    return answer is not None and answered_color(completion) == answer


def make_colors_task(seed: int = 0, num_train: int | None = 2000, num_eval: int = 200, *,
                     reference_swap_rate: float = 0.0) -> Task:
    """`num_train` / `num_eval` pictures (an `image` column; a colour, shape, size and place each),
    the train and eval pictures drawn from different random streams of the seed. Rows: the
    conversational prompt, the `image`, the `answer` colour, the `shape` and a `picture` id.
    reference_swap_rate: the fraction of SFT reference answers that name the right colour's PARTNER
    instead (a colour-blind teacher; chosen per row from the seed)."""
    import datasets

    if not 0.0 <= reference_swap_rate <= 1.0:
        raise ValueError(f"reference_swap_rate must be in [0, 1], got {reference_swap_rate}")
    names = list(COLORS)

    def rows(n: int, stream: str):
        rng = random.Random(f"colors:{seed}:{stream}")
        colors = [rng.choice(names) for _ in range(n)]
        shapes = [rng.choice(SHAPES) for _ in range(n)]
        images = [draw_shape(c, s, rng) for c, s in zip(colors, shapes)]
        return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": QUESTION}]] * n,
                                           "image": images, "answer": colors, "shape": shapes,
                                           "picture": [f"{stream}{i}" for i in range(n)]})

    def reference_completion(row: dict[str, Any]) -> str:
        swap = random.Random(f"colors-ref:{seed}:{row['picture']}").random() < reference_swap_rate
        return PARTNER[row["answer"]] if swap else row["answer"]

    return Task(
        name="colors",
        train_dataset=rows(2000 if num_train is None else num_train, "train"),
        eval_dataset=rows(num_eval, "eval"),
        reward_funcs=[color_reward],
        reward_weights=None,
        extract_answer=lambda text: answered_color(text),
        is_correct=_color_is_correct,
        max_completion_length=8,
        reference_completion=reference_completion,
        description="name the colour of the shape in a drawn 56-px picture (vision-language); reward: exact colour",
    )

