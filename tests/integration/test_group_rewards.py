"""A group reward through the trainer: training scores each prompt's G completions together,
evaluation each prompt's own (one greedy completion: a group of 1), beside a TRL-style function."""

import pytest
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.rewards import group_reward
from tests.helpers import make_char_tokenizer, make_tiny_model

pytestmark = pytest.mark.train


def test_the_trainer_gives_a_group_reward_whole_groups(tmp_path):
    seen = []

    @group_reward
    def longest_wins(prompts, completions, num_generations, row, **kw):
        seen.append((len(completions), num_generations, len(set(prompts)), len(set(row))))
        best = max(len(c) for c in completions)
        return [1.0 if len(c) == best else 0.0 for c in completions]

    def short(completions, **kw):  # TRL's signature, beside it
        return [-len(c) / 10 for c in completions]

    tok = make_char_tokenizer()
    data = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)], "row": list(range(8))})
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=16,
                     gradient_accumulation_steps=1, num_generations=4, max_completion_length=5, use_cpu=True,
                     disable_tqdm=True, plot=False, save_strategy="no", eval_strategy="steps", eval_steps=2)
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=[longest_wins, short], args=cfg,
                          processing_class=tok, train_dataset=data, eval_dataset=data.select(range(3)))
    trainer.train()
    training = [s for s in seen if s[0] == 4]
    assert len(training) == 8  # 2 steps x 4 prompts, one call each
    assert all(s == (4, 4, 1, 1) for s in training)  # one prompt, one row, G completions, num_generations=G
    assert [s for s in seen if s[0] != 4] == [(1, 1, 1, 1)] * 3  # eval: each prompt's greedy completion
    assert trainer._logs["rewards"]["longest_wins"] and trainer._logs["rewards"]["short"]
