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
    "render_prompt",
    "validate_prompts",
]
