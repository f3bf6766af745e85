"""Shared by the two-rank worker (run under torchrun) and the one-process references in
test_distributed.py: the tiny model (tests.helpers.make_tiny_llama), prompts, reward and the
configurations compared. The processes it is imported in have the repository root on their path
(test_distributed.py's launcher sets PYTHONPATH)."""

from __future__ import annotations

import os
import time

import torch
from datasets import Dataset

from grpokit import GRPOConfig
from grpokit.rewards import group_reward
from grpokit.trajectory import Trajectories
from tests.helpers import make_tiny_llama, instrument

WORLD = 2          # ranks of the distributed runs
MAX_STEPS = 3
SAVE_STEPS = 2     # checkpoint-2 is resumed

# model overrides and config overrides of each scenario
SCENARIOS = {
    # full fine-tune, token-level dapo (global normaliser), KL to a frozen reference copy, tied
    # embedding/lm_head (as small Qwen models), gradient clipping active (max_grad_norm=0.5; the norms are ~0.6)
    "full": ({"tie_word_embeddings": True}, dict(loss_type="dapo", beta=0.04, max_grad_norm=0.5)),
    # LoRA, per-sequence grpo loss (local means), reference = adapter off, old logprobs (mu=2),
    # activation checkpointing
    "lora": ({}, dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, loss_type="grpo", beta=0.04,
                      num_iterations=2, gradient_checkpointing=True)),
    # TRL's defaults (beta=0, dapo), prompts in order: rank 1's groups all have equal rewards
    # (reward `second_half_constant`), so it has nothing to train while rank 0 has; completions
    # with advantage 0 are left out of the forward and micro-batches are merged, so the ranks'
    # forwards differ unless every rank is made to take part in the same collectives
    "zeroadv": ({}, dict(loss_type="dapo", beta=0.0, shuffle_dataset=False)),
    # a group reward (grpokit.rewards.group_reward): each rank scores only whole groups, and the
    # two-rank run equals one process
    "group": ({}, dict(loss_type="dapo", beta=0.0)),
    # a generation worker per rank sampling one step ahead (grpokit.pipeline): the two-rank run
    # equals one process whose worker samples what the two ranks' workers sample, and resumes exactly
    "async": ({}, dict(loss_type="dapo", beta=0.0, max_staleness=1)),
}


def prompts_ds(n=40):
    return Dataset.from_dict({"prompt": [f"q{i}:" for i in range(n)]})


def letters(prompts, completions, **kw):
    """Fraction of letters: a continuous reward, so (nearly) every group has a non-zero advantage."""
    return [sum(ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]


def second_half_constant(prompts, completions, **kw):
    """`letters` for the first 4 prompts of each 8 (rank 0's half of a step when the dataset is
    taken in order), 0.5 for the last 4 (rank 1's half): every group of rank 1 has equal rewards."""
    out = []
    for p, c in zip(prompts, completions):
        i = int(p[1:-1])  # "q12:" -> 12
        out.append(0.5 if (i // 4) % 2 else letters([p], [c])[0])
    return out


@group_reward
def letters_ranked(prompts, completions, num_generations, **kw):
    """Each completion's rank of `letters` within its group (ties share their mean rank); refuses
    anything but one whole group."""
    if len(completions) != num_generations or len(set(prompts)) != 1:
        raise ValueError(f"a group reward got {len(completions)} completions of {len(set(prompts))} prompts")
    scores = letters(prompts, completions)
    return [sum(t < s for t in scores) + (sum(t == s for t in scores) - 1) / 2 for s in scores]


def reward_for(scenario):
    return {"zeroadv": second_half_constant, "group": letters_ranked}.get(scenario, letters)


def config(output_dir, scenario, *, world, strategy="ddp", **over):
    """`world` ranks of 8 completions x `2 * WORLD / world` micro-batches: the same global batch
    (8 prompts x G=4) whatever the number of ranks."""
    base = dict(output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=8,
                gradient_accumulation_steps=2 * WORLD // world, num_generations=4, max_completion_length=4,
                learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=100, save_strategy="steps",
                save_steps=SAVE_STEPS, use_cpu=True, disable_tqdm=True, plot=False, seed=1,
                distributed_strategy=strategy, log_completions=False)
    return GRPOConfig(**{**base, **SCENARIOS[scenario][1], **over})


def model_for(scenario):
    return make_tiny_llama(**SCENARIOS[scenario][0])


def as_if_ranks(run, world: int) -> None:
    """Make a one-process run sample exactly what `world` ranks sample: rank r draws its slice
    of the step's prompts with seed + r (the trainer's per-rank sampling seed). Where the
    sampling happens (here or in a generation worker) it calls `sample_here`, replaced here."""
    sample = run.sample_here

    def sample_like_ranks(rows, seed):
        k = len(rows) // world
        parts = [sample(rows[r * k:(r + 1) * k], seed + r) for r in range(world)]
        return Trajectories(
            row_index=sum((p.row_index for p in parts), []), prompts=sum((p.prompts for p in parts), []),
            completions=sum((p.completions for p in parts), []), prompt_ids=sum((p.prompt_ids for p in parts), []),
            completion_ids=sum((p.completion_ids for p in parts), []),
            sampling_logps=sum((p.sampling_logps for p in parts), []),
            truncated=torch.cat([p.truncated for p in parts]))

    instrument(run, sample_here=sample_like_ranks)


# ---- reward functions for the fault tests (loaded by name: "dist_common:...", PYTHONPATH=tests/distributed).
# Rank 1 fails at its second call (step 2), after writing the time to $GRPOKIT_FAULT_STAMP.
_calls = {"n": 0}


def _fails_now() -> bool:
    _calls["n"] += 1
    if os.environ.get("RANK") != "1" or _calls["n"] != 2:
        return False
    with open(os.environ["GRPOKIT_FAULT_STAMP"], "w") as f:
        f.write(repr(time.time()))
    return True


def raise_on_rank_1_at_step_2(prompts, completions, **kw):
    if _fails_now():
        raise ValueError("boom: the reward server is down")
    return letters(prompts, completions)


def hang_on_rank_1_at_step_2(prompts, completions, **kw):
    if _fails_now():
        time.sleep(3600)  # a reward server that never answers
    return letters(prompts, completions)


def die_on_rank_1_at_step_2(prompts, completions, **kw):
    if _fails_now():
        os._exit(17)  # as a segfault or the OOM killer would: no exception, no clean-up
    return letters(prompts, completions)
