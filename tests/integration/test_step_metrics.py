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
