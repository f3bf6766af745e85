"""A group reward through the trainer: training scores each prompt's G completions together,
evaluation each prompt's own (one greedy completion: a group of 1), beside a TRL-style function."""

import pytest
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.rewards import group_reward
from tests.helpers import make_char_tokenizer, make_tiny_model, tiny_grpo_trainer

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


def test_a_judge_through_the_trainer_logs_its_figures(tmp_path):
    """The listwise judge as a reward: each group judged in two shown orders, its figures logged
    with the step; a judge that cannot answer leaves its groups at None (advantage 0), counted."""
    import json

    from grpokit.rewards.judges import FunctionBackend, JudgeReward

    requests = []

    def longest_first(messages):
        user = messages[-1]["content"]
        n = int(user.split("Rank all ")[1].split()[0])
        cands = [user.split(f"[{i}]\n")[1].split("\n\n[")[0].split("\n\nRank all")[0] for i in range(1, n + 1)]
        requests.append(n)
        # longest first, ties by the text itself: the verdict does not depend on the shown order
        return json.dumps({"ranking": sorted(range(1, n + 1), key=lambda i: (-len(cands[i - 1]), cands[i - 1]))})

    trainer = tiny_grpo_trainer(tmp_path, [JudgeReward(backend=FunctionBackend(longest_first))])
    trainer.train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "judge/calls" in r]
    assert len(steps) == 2 and all(r["judge/agreement"] == 1.0 and r["judge/frac_failed"] == 0.0 for r in steps)
    assert len(requests) == sum(2 for _ in range(2 * 2))  # 2 steps x 2 prompts x 2 shown orders (no cache hit)
    assert all(2 <= n <= 4 for n in requests)  # distinct completions only

    broken = tiny_grpo_trainer(tmp_path / "b", [JudgeReward(backend=FunctionBackend(lambda m: "?"), max_retries=0)])
    broken.train()
    rows = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "judge/frac_failed" in r][-1]
    assert last["judge/frac_failed"] == 1.0 and last["rewards/judge/frac_none"] == 1.0


def test_the_judge_gate_refuses_before_step_one(tmp_path):
    from grpokit.rewards.judges import FunctionBackend, JudgeReward

    calibration = [{"prompt": "q", "candidates": ["a", "abc", "ab"], "ranking": [1, 2, 0]}]
    def shortest_first(messages):  # the known order is longest first: Kendall tau -1
        user = messages[-1]["content"]
        cands = [user.split(f"[{i}]\n")[1].split("\n\n")[0] for i in (1, 2, 3)]
        return '{"ranking": %s}' % sorted((1, 2, 3), key=lambda i: len(cands[i - 1]))

    reward = JudgeReward(backend=FunctionBackend(shortest_first), calibration=calibration)
    with pytest.raises(ValueError, match="judge calibration: 1 groups.*below min_calibration_tau"):
        tiny_grpo_trainer(tmp_path, [reward]).train()
