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
from grpokit.data.tool_tasks import make_multiply_task, multiply, multiply_reward

TASKS["multiply"] = make_multiply_task  # the tool tasks (their module builds on the tasks module)

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
    "make_multiply_task",
    "multiply",
    "multiply_reward",
    "render_prompt",
    "validate_prompts",
]
