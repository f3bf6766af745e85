"""grpokit.data: dataset formats, validation errors, built-in tasks and their rewards."""

import json
from pathlib import Path

import datasets
import pytest

from grpokit.data import (
    TASKS,
    arithmetic_format_reward,
    arithmetic_reward,
    check_countdown_equation,
    countdown_format_reward,
    countdown_reward,
    encode_prompt,
    get_task,
    is_conversational,
    load_dataset_spec,
    render_prompt,
    validate_prompts,
)
from grpokit.data.tasks import extract_countdown_answer, extract_integer_answer
from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer

ROWS = [{"prompt": "1+1=", "answer": 2}, {"prompt": "2+3=", "answer": 5}]
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "1+1="}], "answer": 2},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3="}], "answer": 5},
]


# ---------------------------------------------------------------------------- formats


def test_is_conversational_follows_trl():
    assert is_conversational({"prompt": [{"role": "user", "content": "hi"}]})
    assert not is_conversational({"prompt": "hi"})
    assert not is_conversational({"prompt": []})
    assert not is_conversational({"prompt": ["hi"]})
    assert is_conversational({"messages": [{"role": "user", "content": "hi"}]})
    assert not is_conversational({"answer": [{"role": "user", "content": "hi"}]})


def test_standard_prompt_is_used_as_is(tiny_tokenizer):
    assert render_prompt("12+7=", tiny_tokenizer) == "12+7="
    ds = datasets.Dataset.from_list(ROWS)
    ids = validate_prompts(ds, tiny_tokenizer, max_prompt_length=10)
    assert ids == [tiny_tokenizer("1+1=")["input_ids"], tiny_tokenizer("2+3=")["input_ids"]]
    assert tiny_tokenizer.decode(ids[1]) == "2+3="


def test_conversational_prompt_uses_chat_template_with_generation_prompt():
    tok = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    assert render_prompt(CHAT_ROWS[1]["prompt"], tok) == "<system>be brief\n<user>2+3=\n<assistant>"
    # a final assistant message is continued, not closed (TRL's rule)
    partial = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is"}]
    assert render_prompt(partial, tok).endswith("The answer is")
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    ids = validate_prompts(ds, tok, max_prompt_length=None)
    assert tok.decode(ids[0]) == "<user>1+1=\n<assistant>"
    assert encode_prompt(CHAT_ROWS[0]["prompt"], tok) == ids[0]


def test_render_prompt_rejects_other_types(tiny_tokenizer):
    with pytest.raises(TypeError, match="string or a list"):
        render_prompt(42, tiny_tokenizer)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_load(tmp_path: Path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ROWS))
    else:
        datasets.Dataset.from_list(ROWS).to_pandas().pipe(
            {".jsonl": lambda df: df.to_json(path, orient="records", lines=True),
             ".csv": lambda df: df.to_csv(path, index=False),
             ".parquet": lambda df: df.to_parquet(path)}[suffix]
        )
    ds = load_dataset_spec(str(path))
    assert ds.column_names == ["prompt", "answer"]
    assert ds["prompt"] == ["1+1=", "2+3="] and [int(a) for a in ds["answer"]] == [2, 5]
    assert len(load_dataset_spec(str(path), split="train[:1]")) == 1


def test_conversational_jsonl_round_trip(tmp_path: Path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    ds = load_dataset_spec(str(path))
    assert is_conversational(ds[0]) and ds[1]["prompt"][0]["role"] == "system"


def test_dataset_objects_and_saved_dirs(tmp_path: Path):
    ds = datasets.Dataset.from_list(ROWS)
    assert load_dataset_spec(ds) is ds
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    assert len(load_dataset_spec(dd, split="test")) == 1
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_dataset_spec(str(tmp_path / "saved"), split="test")) == 1
    # a directory of data files: split names come from the file names
    (tmp_path / "files").mkdir()
    ds.to_json(str(tmp_path / "files" / "train.jsonl"))
    ds.select([1]).to_json(str(tmp_path / "files" / "test.jsonl"))
    assert load_dataset_spec(str(tmp_path / "files"), split="test")["prompt"] == ["2+3="]
    with pytest.raises(ValueError, match="no split 'validation'"):  # the same path a hub name takes
        load_dataset_spec(str(tmp_path / "files"), split="validation")


def test_load_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_spec(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_dataset_spec("./no/such/dir")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['train'\]"):
        load_dataset_spec(dd, split="validation")
    dd.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match="no split 'test'"):
        load_dataset_spec(str(tmp_path / "saved"), split="test")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(ValueError, match="unknown file type"):
        load_dataset_spec(str(tmp_path / "data.txt"))


# ---------------------------------------------------------------------------- validation errors


def test_empty_dataset(tiny_tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": []})
    with pytest.raises(ValueError, match="empty"):
        validate_prompts(ds, tiny_tokenizer, max_prompt_length=8)


def test_missing_prompt_column_lists_columns(tiny_tokenizer):
    ds = datasets.Dataset.from_dict({"question": ["a"], "answer": [1]})
    with pytest.raises(ValueError, match=r"no 'prompt' column.*\['question', 'answer'\]"):
        validate_prompts(ds, tiny_tokenizer, max_prompt_length=8)


def test_missing_required_column(tiny_tokenizer):
    ds = datasets.Dataset.from_list(ROWS)
    with pytest.raises(ValueError, match=r"\['target'\]"):
        validate_prompts(ds, tiny_tokenizer, max_prompt_length=8, required_columns=("answer", "target"))


def test_conversational_without_chat_template(tiny_tokenizer):
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        validate_prompts(ds, tiny_tokenizer, max_prompt_length=None)
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(CHAT_ROWS[0]["prompt"], tiny_tokenizer)


def test_prompt_too_long_names_row_length_and_limit(tiny_tokenizer):
    ds = datasets.Dataset.from_dict({"prompt": ["1+1=", "12+34=", "123+456="]})
    with pytest.raises(ValueError, match=r"row 1 is 6 tokens long, over max_prompt_length=5"):
        validate_prompts(ds, tiny_tokenizer, max_prompt_length=5)
    assert len(validate_prompts(ds, tiny_tokenizer, max_prompt_length=None)) == 3  # None disables
    assert len(validate_prompts(ds, tiny_tokenizer, max_prompt_length=8)) == 3  # equal to the limit is fine


# ---------------------------------------------------------------------------- arithmetic


def test_arithmetic_reward_literal_cases():
    completions = ["85", " 85", "85 is the sum", "84", "-85", "eighty-five", "", "8.5", "85.5", "850"]
    assert arithmetic_reward(None, completions, answer=[85] * 10) == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert arithmetic_reward(None, ["-3"], answer=["-3"]) == [1.0]  # string answers and negatives
    # conversational completions: the assistant message's content is graded
    assert arithmetic_reward(None, [[{"role": "assistant", "content": "12"}]], answer=[12]) == [1.0]
    assert arithmetic_format_reward(None, ["85", " 85 ", "85 is it", "", "x"]) == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="'answer'"):
        arithmetic_reward(None, ["1"])


def test_arithmetic_task_splits_are_deterministic_and_disjoint():
    a = get_task("arithmetic", seed=0, num_train=500, num_eval=100)
    b = get_task("arithmetic", seed=0, num_train=500, num_eval=100)
    assert a.train_dataset["prompt"] == b.train_dataset["prompt"]
    assert a.eval_dataset["prompt"] == b.eval_dataset["prompt"]
    full = get_task("arithmetic", seed=0, num_eval=300)
    assert not set(full.train_dataset["prompt"]) & set(full.eval_dataset["prompt"])
    # eval membership does not depend on the sizes: a smaller eval split is a prefix of a larger one
    assert full.eval_dataset["prompt"][:100] == a.eval_dataset["prompt"]
    other = get_task("arithmetic", seed=1, num_train=500, num_eval=100)
    assert other.eval_dataset["prompt"] != a.eval_dataset["prompt"]
    for row in a.train_dataset.select(range(50)):
        x, op, y = _split_expr(row["prompt"].rstrip("="))
        assert row["answer"] == (x + y if op == "+" else x - y) and row["answer"] >= 0
    assert a.is_correct(str(a.eval_dataset[0]["answer"]), **a.eval_dataset[0])
    assert not a.is_correct("x", **a.eval_dataset[0])


def _split_expr(text):
    for op in "+-":
        if op in text:
            x, y = text.split(op)
            return int(x), op, int(y)
    raise AssertionError(text)


def test_arithmetic_task_options():
    task = get_task("arithmetic", seed=0, num_eval=5, num_train=20, ops="*", max_operand=9, chat=True)
    row = task.train_dataset[0]
    assert row["prompt"][0]["role"] == "user" and "*" in row["prompt"][0]["content"]
    with pytest.raises(ValueError, match="num_eval"):
        get_task("arithmetic", num_eval=100, max_operand=9)
    with pytest.raises(ValueError, match="ops"):
        get_task("arithmetic", ops="^")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")
    assert set(TASKS) >= {"arithmetic", "countdown"}


# ---------------------------------------------------------------------------- countdown


def test_countdown_checker_literal_cases():
    nums, target = [3, 5, 2], 16
    assert check_countdown_equation("(3 + 5) * 2", nums, target)
    assert check_countdown_equation("2*(5+3)", nums, target)
    assert check_countdown_equation("(3 + 5) * 2 = 16", nums, target)
    assert not check_countdown_equation("(3 + 5) * 2 = 17", nums, target)
    assert not check_countdown_equation("3 + 5 + 2", nums, target)  # wrong value
    assert not check_countdown_equation("(5 + 3) * 2 * 1", nums, target)  # 1 is not a given number
    assert not check_countdown_equation("(3 + 3) * 2", nums, target)  # 3 reused, 5 unused
    assert not check_countdown_equation("8 * 2", nums, target)  # numbers not used
    assert not check_countdown_equation("2 ** 4", [2, 4], target)  # power is not allowed
    assert not check_countdown_equation("-3 + 19", [3, 19], target)  # unary minus is not allowed
    assert not check_countdown_equation("16.0", [16], target)  # floats are not given numbers
    assert not check_countdown_equation("5 / (3 - 3)", [5, 3, 3], 1)  # division by zero
    assert not check_countdown_equation("(3 + 5", nums, target)  # syntax error
    assert not check_countdown_equation(None, nums, target)
    assert check_countdown_equation("6 / 4 * 2", [6, 4, 2], 3)  # exact fractions
    assert check_countdown_equation("1 / 3 * 3", [1, 3, 3], 1)  # 1/3*3 is exactly 1


def test_countdown_never_executes_text(tmp_path: Path):
    marker = tmp_path / "pwned"
    attacks = [
        f"__import__('os').system('touch {marker}')",
        f"open('{marker}', 'w').write('x')",
        "(lambda: 16)()",
        "[3, 5, 2][0] * 16",
        "().__class__.__bases__[0]",
        "3 if 5 else 2",
    ]
    for attack in attacks:
        assert not check_countdown_equation(attack, [3, 5, 2], 16)
    completions = [f"<answer>{a}</answer>" for a in attacks]
    assert countdown_reward(None, completions, numbers=[[3, 5, 2]] * 6, target=[16] * 6) == [0.0] * 6
    assert not marker.exists()


def test_countdown_rewards_and_extraction():
    right = "let me think <answer>(3 + 5) * 2</answer>"
    wrong = "<answer>3 + 5 + 2</answer>"
    none = "(3 + 5) * 2"
    two = "<answer>1</answer><answer>(3 + 5) * 2</answer>"
    completions = [right, wrong, none, two]
    kwargs = {"numbers": [[3, 5, 2]] * 4, "target": [16] * 4}
    assert countdown_reward(None, completions, **kwargs) == [1.0, 0.0, 0.0, 1.0]  # the last answer counts
    assert countdown_format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0]
    assert extract_countdown_answer(right) == "(3 + 5) * 2"
    assert extract_countdown_answer("<answer> 2*8") == "2*8"  # unclosed at the end (stop string removed)
    assert extract_countdown_answer(none) is None
    with pytest.raises(ValueError, match="'target'"):
        countdown_reward(None, [right], numbers=[[3, 5, 2]])


def test_countdown_task_is_solvable_deterministic_and_disjoint():
    a = get_task("countdown", seed=0, num_train=200, num_eval=50)
    b = get_task("countdown", seed=0, num_train=200, num_eval=50)
    assert a.train_dataset.to_list() == b.train_dataset.to_list()
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in a.train_dataset} & {key(r) for r in a.eval_dataset}
    assert len({key(r) for r in a.train_dataset}) == 200
    for row in a.eval_dataset:
        assert a.is_correct(a.reference_completion(row), **row)
        assert str(row["target"]) in row["prompt"] and str(row["numbers"]) in row["prompt"]
        assert 1 <= row["target"] <= 100
    assert a.stop == ["</answer>"]


def test_extract_integer_answer():
    assert extract_integer_answer(" 42<eos>") == "42"
    assert extract_integer_answer("-7 apples") == "-7"
    assert extract_integer_answer("apples 7") is None


def test_no_seed_trains_on_another_seeds_eval_problems():
    seed0 = get_task("arithmetic", seed=0, num_eval=200)
    seed42 = get_task("arithmetic", seed=42, num_eval=200)
    assert not set(seed0.train_dataset["prompt"]) & set(seed42.eval_dataset["prompt"])
    c0 = get_task("countdown", seed=0, num_train=300, num_eval=30)
    c1 = get_task("countdown", seed=1, num_train=300, num_eval=30)
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in c0.train_dataset} & {key(r) for r in c1.eval_dataset}


def test_arithmetic_sloppy_reference_completions():
    from grpokit.data.tasks import _carry_slip_answer

    # the units carry/borrow got wrong, so off by ten: forgotten (57+68 -> 115, 52-38 -> 24) or
    # added where there is none (12+34 -> 56, 58-23 -> 25); never a negative answer, "*" untouched
    assert [_carry_slip_answer(57, "+", 68), _carry_slip_answer(12, "+", 34), _carry_slip_answer(3, "+", 4)] == [
        115, 56, 17]
    assert [_carry_slip_answer(52, "-", 38), _carry_slip_answer(58, "-", 23), _carry_slip_answer(47, "-", 42)] == [
        24, 25, 5]
    assert _carry_slip_answer(7, "*", 8) == 56
    clean = get_task("arithmetic", seed=0, num_train=2000, num_eval=10)
    sloppy = get_task("arithmetic", seed=0, num_train=2000, num_eval=10, reference_slip_rate=0.6)
    assert clean.train_dataset.to_list() == sloppy.train_dataset.to_list()  # answers and rewards untouched
    rows = sloppy.train_dataset.to_list()
    assert all(clean.reference_completion(r) == str(r["answer"]) for r in rows)
    slipped = [r for r in rows if sloppy.reference_completion(r) != str(r["answer"])]
    assert 0.5 < len(slipped) / len(rows) < 0.65  # 60% chosen, a few of them ("-" going negative) stay right
    for r in slipped:
        assert abs(int(sloppy.reference_completion(r)) - r["answer"]) == 10
    with pytest.raises(ValueError, match="reference_slip_rate"):
        get_task("arithmetic", reference_slip_rate=1.5)
