"""Reward functions for GRPO: a registry, a runner (timeouts, error policy, process pool, async)
and built-ins (math accuracy, formats, length shaping, reward models, code in a sandbox).

A reward function is a plain callable with TRL's signature::

    fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]

Names are imported lazily so that `import grpokit.rewards.math` in a worker process does not
import torch. See docs/rewards.md.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "REWARD_REGISTRY": "registry", "register_reward": "registry", "reward_factory": "registry",
    "group_reward": "registry", "scores_groups": "registry",
    "resolve_reward": "registry", "load_reward_funcs": "registry", "reward_name": "registry",
    "RewardRunner": "runner", "RewardOutput": "runner", "RewardError": "runner", "RewardTimeout": "runner",
    "describe_rewards": "describe",
    "AccuracyReward": "math", "accuracy_reward": "math", "extract_answer": "math", "is_equivalent": "math",
    "ThinkAnswerFormat": "format", "SoftThinkAnswerFormat": "format", "RegexReward": "format",
    "think_answer_format": "format", "soft_think_answer_format": "format",
    "SoftOverlongPunishment": "length", "CosineLengthReward": "length",
    "RewardModelReward": "model", "PreferenceReward": "model",
    "JudgeReward": "judges", "PairwiseJudgeReward": "judges",
    "CodeReward": "code", "extract_code": "code",
    "ChrfReward": "similarity", "BleuReward": "similarity", "RougeReward": "similarity",
    "ConsensusReward": "similarity",
    "LocalSandbox": "sandbox", "CommandSandbox": "sandbox", "SandboxBackend": "sandbox",
    "SandboxLimits": "sandbox", "SandboxUnavailable": "sandbox",
    "completion_text": "text",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grpokit.rewards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"grpokit.rewards.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
