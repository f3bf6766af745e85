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
from grpokit.data.tool_tasks import GuessTheNumber, make_guess_task, make_multiply_task, multiply, multiply_reward

TASKS["multiply"] = make_multiply_task  # the tool tasks (their module builds on the tasks module)
TASKS["guess"] = make_guess_task

__all__ = [
    "TASKS",
    "Task",
    "arithmetic_format_reward",
    "arithmetic_reward",
    "check_countdown_equation",
    "countdown_format_reward",
    "countdown_reward",
    "encode_prompt",
    "get_task",
    "is_conversational",
    "load_dataset_spec",
    "GuessTheNumber",
    "make_guess_task",
    "make_multiply_task",
    "multiply",
    "multiply_reward",
    "render_prompt",
    "validate_prompts",
]
