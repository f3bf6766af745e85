"""Metrics the loop logs, checked on a run."""

import json

import pytest
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from tests.helpers import make_char_tokenizer, make_tiny_model

# every test here trains
pytestmark = pytest.mark.train


def test_the_step_logs_frac_reward_zero_std_with_none_rewards(tmp_path):
    """The metric the loop logs, on a run whose rewards are [1, None, ...]: every group is dead."""
    def sparse(prompts, completions, **kw):  # one reward per group of 4, the others None
        return [1.0 if i % 4 == 0 else None for i in range(len(completions))]

    tok = make_char_tokenizer()
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, num_generations=4, max_completion_length=2, use_cpu=True,
                     disable_tqdm=True, plot=False, save_strategy="no", logging_steps=1)
    GRPOTrainer(model=make_tiny_model(tok), reward_funcs=sparse, args=cfg, processing_class=tok,
                train_dataset=Dataset.from_dict({"prompt": ["a", "b"]})).train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["frac_reward_zero_std"] for r in rows if "frac_reward_zero_std" in r] == [1.0]


def test_rank_advantages_reach_the_update(tmp_path):
    """scale_rewards="rank" through the trainer: each group's advantages are its rewards' centred
    ranks, spanning [-1, 1] (trainer._logs holds the step's rewards and advantages)."""
    import torch

    from grpokit.algos import group_advantages

    def length(completions, **kw):
        return [float(len(c)) for c in completions]

    tok = make_char_tokenizer()
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, num_generations=4, max_completion_length=6, use_cpu=True,
                     disable_tqdm=True, plot=False, save_strategy="no", scale_rewards="rank")
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=length, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}))
    trainer.train()
    logs = trainer._logs
    rewards = torch.tensor(logs["rewards"]["length"])
    advantages = torch.tensor(logs["advantages"])
    torch.testing.assert_close(advantages, group_advantages(rewards, 4, "rank"))
    assert advantages.abs().max() <= 1.0 + 1e-6
