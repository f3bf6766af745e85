"""Tools and environments: TRL's `tools=`, `environment_factory=` and multi-turn rollouts.

`MultiTurn` holds a run's tools and environments (checked once, before step 1) and samples a
step's conversations (`MultiTurn.rollout`); `TurnDriver` is what the engine talks to between
turns; `chat` is the tokenizer side (rendering tools, parsing tool calls with transformers'
`parse_response`, the tokens of tool results); `tools` runs the calls concurrently with deadlines.
"""

from grpokit.envs.chat import check_tool_template, parse_turn, supports_tool_calling, tool_suffix_ids
from grpokit.envs.environments import Environments, env_reward_func, environment_tools
from grpokit.envs.rollout import Conversation, MultiTurn, TurnDriver, check_tool, run_turns
from grpokit.envs.tools import ToolResult, ToolRunner

__all__ = ["Conversation", "Environments", "MultiTurn", "ToolResult", "ToolRunner", "TurnDriver",
           "check_tool", "check_tool_template", "env_reward_func", "environment_tools", "parse_turn", "run_turns",
           "supports_tool_calling", "tool_suffix_ids"]
