"""Data: dataset loading (hub, JSON/JSONL/CSV/Parquet, in-memory), prompt formats, built-in tasks."""

from grpokit.data.loading import (
    encode_prompt,
    is_conversational,
    load_dataset_spec,
    render_prompt,
    validate_prompts,
)
from grpokit.data.tasks import (
    TASKS,
    Task,
    arithmetic_format_reward,
    arithmetic_reward,
    check_countdown_equation,
    countdown_format_reward,
    countdown_reward,
    get_task,
)
from grpokit.data.text_tasks import make_dialogue_task, make_shorten_task
from grpokit.data.tool_tasks import GuessTheNumber, make_guess_task, make_multiply_task, multiply, multiply_reward
from grpokit.data.vision_tasks import color_reward, make_colors_task

TASKS["multiply"] = make_multiply_task  # the tool tasks (their module builds on the tasks module)
TASKS["guess"] = make_guess_task
TASKS["colors"] = make_colors_task  # the vision task (images drawn by the program)
TASKS["shorten"] = make_shorten_task  # content generation for a model that can write (chrF, a word limit)
TASKS["dialogue"] = make_dialogue_task  # dialogue ranked by a judge (its model set in reward_kwargs)

__all__ = [
    "TASKS",
    "Task",
    "arithmetic_format_reward",
    "arithmetic_reward",
    "check_countdown_equation",
    "color_reward",
    "countdown_format_reward",
    "countdown_reward",
    "encode_prompt",
    "get_task",
    "is_conversational",
    "load_dataset_spec",
    "GuessTheNumber",
    "make_colors_task",
    "make_guess_task",
    "make_multiply_task",
    "multiply",
    "multiply_reward",
    "render_prompt",
    "validate_prompts",
]
