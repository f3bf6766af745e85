"""The group-reward contract: a function declared with `group_reward` is called once per prompt
with that prompt's G completions together (and `num_generations`), in this process, on the event
loop or in the worker pool; TRL-style functions run beside it unchanged."""

import asyncio

import pytest
import torch

from grpokit.rewards import RewardRunner, group_reward, load_reward_funcs, scores_groups
from tests.unit.pool_reward_funcs import group_rank

G = 4
PROMPTS = [p for p in ("p0", "p1", "p2") for _ in range(G)]
COMPLETIONS = ["aaa", "a", "aa", "aaaa",   "bb", "b", "bbbb", "bbb",   "c", "cc", "ccc", "cccc"]
RANKS = [2, 0, 1, 3,   1, 0, 3, 2,   0, 1, 2, 3]  # each completion's length rank within its prompt's group


def length(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def test_a_group_reward_sees_each_prompts_group_whole_beside_a_trl_function():
    calls = []

    @group_reward
    def ranked(prompts, completions, num_generations, answer, **kw):
        calls.append((list(prompts), list(completions), num_generations, list(answer)))
        return group_rank(prompts, completions, num_generations=num_generations)

    runner = RewardRunner([ranked, length], group_size=G)
    answers = [f"answer of {p}" for p in PROMPTS]
    out = runner(PROMPTS, COMPLETIONS, columns={"answer": answers})
    assert out.per_func[:, 0].tolist() == RANKS
    assert out.per_func[:, 1].tolist() == [float(len(c)) for c in COMPLETIONS]  # the TRL function: one call, all rows
    assert len(calls) == 3
    for k, (prompts, completions, n, answer) in enumerate(calls):
        assert prompts == [f"p{k}"] * G and completions == COMPLETIONS[k * G:(k + 1) * G] and n == G
        assert answer == [f"answer of p{k}"] * G  # the row's columns, repeated as TRL repeats them


def test_async_group_rewards_run_per_group_concurrently():
    @group_reward
    async def ranked(prompts, completions, num_generations, **kw):
        await asyncio.sleep(0.01)
        return group_rank(prompts, completions, num_generations=num_generations)

    out = RewardRunner([ranked], group_size=G)(PROMPTS, COMPLETIONS)
    assert out.per_func[:, 0].tolist() == RANKS


def test_in_the_worker_pool_a_group_never_splits_across_workers_or_chunks():
    # chunk_size=3 would cut groups of 4 for a TRL function; a group reward gets one group per task
    runner = RewardRunner([group_rank, length], group_size=G, num_workers=2, chunk_size=3)
    try:
        out = runner(PROMPTS, COMPLETIONS)
    finally:
        runner.close()
    assert out.per_func[:, 0].tolist() == RANKS and out.stats.get("rewards/errors", 0) == 0


def test_group_size_per_call_and_errors():
    runner = RewardRunner([group_rank])  # no default group size
    with pytest.raises(ValueError, match="need whole groups: 12 completions in groups of None"):
        runner(PROMPTS, COMPLETIONS)
    with pytest.raises(ValueError, match="groups of 5"):
        runner(PROMPTS, COMPLETIONS, group_size=5)
    # eval's greedy pass: one completion per prompt, groups of 1
    out = runner(PROMPTS[::G], COMPLETIONS[::G], group_size=1)
    assert out.per_func[:, 0].tolist() == [0.0, 0.0, 0.0]


def test_num_generations_reaches_a_plain_function_that_asks_for_it():
    seen = []

    def plain(prompts, completions, num_generations):
        seen.append(num_generations)
        return [0.0] * len(completions)

    RewardRunner([plain], group_size=G)(PROMPTS, COMPLETIONS)
    assert seen == [G]


def test_the_declaration_survives_the_registrys_renaming():
    funcs = load_reward_funcs([group_rank])
    assert scores_groups(funcs[0]) and not scores_groups(length)
    out = RewardRunner(funcs, group_size=G)(PROMPTS, COMPLETIONS)
    assert torch.equal(out.per_func[:, 0], torch.tensor(RANKS, dtype=torch.float32))
