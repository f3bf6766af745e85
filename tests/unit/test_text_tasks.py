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
    chrf, _ = task.reward_funcs
    assert chrf([None], [core], reference=[core]) == [1.0]
    # 0 within the limit; 15 words for 10: -(15 - 10) / 10; capped at -1
    assert word_limit_reward(["a " * 10, "a " * 15, "a " * 40], max_words=[10] * 3) == [0.0, -0.5, -1.0]
    cols = {k: v for k, v in row.items() if k != "prompt"}
    assert task.is_correct(core, **cols)
    assert not task.is_correct(core + " And then many more words were added here.", **cols)  # over the limit
    assert not task.is_correct("Something else entirely.", **cols)                           # chrF too low
