"""The `shorten` task: generated, disjoint splits; chrF against the core; the word limit; the grader."""

from grpokit.data import get_task
from grpokit.data.text_tasks import word_limit_reward


def test_shorten_task_splits_rewards_and_grader():
    task = get_task("shorten", seed=1, num_train=300, num_eval=40)
    train = {r["prompt"][0]["content"] for r in task.train_dataset}
    evals = list(task.eval_dataset)
    assert len(train) == 300 and len(evals) == 40 and not train & {r["prompt"][0]["content"] for r in evals}
    assert [r["reference"] for r in get_task("shorten", seed=7, num_eval=10).eval_dataset] == \
        [r["reference"] for r in evals[:10]]                     # the eval split does not depend on the seed
    row = evals[0]
    core, limit = row["reference"], row["max_words"]
    assert core.split()[0] in row["prompt"][0]["content"] and len(core.split()) <= limit
    from grpokit.rewards import load_reward_funcs

    chrf, _ = load_reward_funcs(task.reward_funcs)  # "chrf" by name, reading the reference column
    assert chrf([None], [core], reference=[core]) == [1.0]
    # 0 within the limit; 15 words for 10: -(15 - 10) / 10; capped at -1
    assert word_limit_reward(["a " * 10, "a " * 15, "a " * 40], max_words=[10] * 3) == [0.0, -0.5, -1.0]
    cols = {k: v for k, v in row.items() if k != "prompt"}
    assert task.is_correct(core, **cols)
    assert not task.is_correct(core + " And then many more words were added here.", **cols)  # over the limit
    assert not task.is_correct("Something else entirely.", **cols)                           # chrF too low


def test_dialogue_task_rows_grader_and_its_judge():
    from grpokit.rewards import load_reward_funcs

    task = get_task("dialogue", num_train=100, num_eval=20)
    row = task.eval_dataset[0]
    assert row["user_name"] in row["prompt"][0]["content"] and row["prompt"][0]["role"] == "user"
    assert not {r["prompt"][0]["content"] for r in task.train_dataset} & \
        {r["prompt"][0]["content"] for r in task.eval_dataset}
    cols = {k: v for k, v in row.items() if k != "prompt"}
    assert task.is_correct(f"Sure, {row['user_name']}! Try this.", **cols)
    assert not task.is_correct("Sure! Try this.", **cols)                                   # no name
    assert not task.is_correct(f"{row['user_name']}, " + "word " * 40, **cols)               # too long
    assert task.reward_funcs == ["judge"]
    import pytest

    with pytest.raises(ValueError, match="judge: give model="):
        load_reward_funcs(task.reward_funcs)


def test_the_example_configs_name_real_fields():
    from pathlib import Path

    from grpokit.config import GRPOConfig
    from grpokit.config_file import load_config_dict

    root = Path(__file__).resolve().parents[2]
    for name in ("shorten_smollm2.yaml", "dialogue_judge.yaml"):
        fields = load_config_dict([str(root / "examples" / name)])
        GRPOConfig(**fields)  # every key a real field with a valid value
