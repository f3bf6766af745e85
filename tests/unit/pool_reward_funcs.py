"""Reward functions for the process-pool tests of test_rewards_runner.py, in a module that imports
nothing heavy (no torch), so that a worker process unpickling them starts in milliseconds. Not a test
module (no `test_` prefix): test modules do not import one another."""

import os
import time


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def none_if_even(prompts, completions, **kw):
    return [None if len(c) % 2 == 0 else 1.0 for c in completions]


def slow_on_ccc(prompts, completions, **kw):
    if "ccc" in completions:
        time.sleep(60)
    return [0.5] * len(completions)


def die_on_ccc(prompts, completions, **kw):
    if "ccc" in completions:
        os._exit(3)
    return [1.0] * len(completions)


def pid_reward(prompts, completions, **kw):
    return [float(os.getpid())] * len(completions)


def busy_square(prompts, completions, **kw):
    """~20 ms of pure-Python work per completion."""
    out = []
    for c in completions:
        t0 = time.perf_counter()
        x = 0
        while time.perf_counter() - t0 < 0.02:
            x += 1
        out.append(float(len(c)) ** 2)
    return out


def group_rank(prompts, completions, num_generations=None, **kw):
    """A group reward for the pool: the rank of each completion's length within its group, and it
    refuses anything but one whole group."""
    if len(set(prompts)) != 1 or len(completions) != num_generations:
        raise ValueError(f"not one whole group: {len(completions)} completions of {len(set(prompts))} prompts")
    order = sorted(range(len(completions)), key=lambda i: len(completions[i]))
    ranks = [0.0] * len(completions)
    for r, i in enumerate(order):
        ranks[i] = float(r)
    return ranks


group_rank.scores_groups = True  # what grpokit.rewards.group_reward sets (no grpokit import in a worker)
