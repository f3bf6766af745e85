"""Built-in rule rewards with literal inputs: accuracy (math-verify), formats, regex, length shaping."""

import logging
import math
import threading

import pytest

from grpokit.rewards import AccuracyReward, CosineLengthReward, RegexReward, SoftOverlongPunishment, \
    SoftThinkAnswerFormat, ThinkAnswerFormat, extract_answer
from grpokit.rewards.math import extract_gold, last_boxed

acc = AccuracyReward()


@pytest.mark.parametrize("completion, gold, expected", [
    # LaTeX / numeric equivalence through math-verify
    ("The answer is \\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{\\dfrac{3}{4}}.", "0.75", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{10\\%}", "0.1", 1.0),
    # sets and intervals: order inside a set does not matter, bracket type does
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}", 0.0),
    ("\\boxed{[1,2)}", "[1,2)", 1.0),
    ("\\boxed{[1,2]}", "[1,2)", 0.0),
    # extraction: last boxed wins, nested braces, answer tags, last number, none
    ("first \\boxed{1} then \\boxed{\\frac{2}{3}}", "\\frac{2}{3}", 1.0),
    ("\\boxed{\\sqrt{\\frac{1}{4}}}", "1/2", 1.0),
    ("<think>maybe 3</think><answer>42</answer>", "42", 1.0),
    ("I think it is 41, no wait, 42", "42", 1.0),
    ("no number at all", "42", 0.0),
    ("", "42", 0.0),
    # malformed completions are wrong, not errors
    ("\\boxed{\\frac{1}{", "1/2", 0.0),
    ("\\boxed{}", "0", 0.0),
    # words compare as normalised strings (math-verify would read 'Pairs' == 'Paris' as a*i*p*r*s)
    ("\\boxed{Paris}", "Paris", 1.0),
    ("\\boxed{Pairs}", "Paris", 0.0),
    ("<answer>(B)</answer>", "B", 1.0),
    ("\\boxed{\\text{(B)}}", "B", 1.0),
    ("\\boxed{C}", "B", 0.0),
    # a worked solution as gold (open-r1 'solution' style, GSM8K '####')
    ("\\boxed{72}", "Natalia sold 48/2 = 24 clips in May.\n#### 72", 1.0),
    ("\\boxed{5}", "Since 2+3=5, we get $\\boxed{5}$.", 1.0),
])
def test_accuracy(completion, gold, expected):
    assert acc(["q"], [completion], answer=[gold]) == [expected]


@pytest.mark.parametrize("gold", ["", "   ", "\\frac{1}{", None])
def test_unparseable_gold_is_none_with_a_warning(gold, caplog):
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards"):
        assert AccuracyReward()(["q"], ["\\boxed{1}"], answer=[gold]) == [None]
    assert "cannot parse the gold answer" in caplog.text


def test_accuracy_conversational_gold_column_modes_and_values():
    completions = [[{"role": "assistant", "content": "It is \\boxed{4}."}]]
    assert acc([[{"role": "user", "content": "2+2?"}]], completions, solution=["4"]) == [1.0]
    assert AccuracyReward(gold_column="target")(None, ["\\boxed{4}"], target=[4]) == [1.0]  # int gold
    assert AccuracyReward(mode="string")(None, ["\\boxed{0.5}"], answer=["1/2"]) == [0.0]
    assert AccuracyReward(last_number=False)(None, ["it is 42"], answer=["42"]) == [0.0]
    assert AccuracyReward(correct=2.0, incorrect=-1.0)(None, ["\\boxed{1}", "\\boxed{2}"], answer=["1", "1"]) \
        == [2.0, -1.0]
    with pytest.raises(ValueError, match="gold_column 'target' is not a dataset column"):
        AccuracyReward(gold_column="target").check_columns({"answer"})


def test_accuracy_runs_off_the_main_thread():
    # math-verify's default signal.alarm timeouts raise off the main thread; ours are switched off
    out = {}
    t = threading.Thread(target=lambda: out.update(r=acc(None, ["\\boxed{\\frac{1}{2}}"], answer=["0.5"])))
    t.start()
    t.join(30)
    assert out["r"] == [1.0]


def test_extraction_helpers():
    assert last_boxed("a \\boxed{\\{1, \\{2\\}\\}} b") == "\\{1, \\{2\\}\\}"
    assert last_boxed("\\boxed{unclosed") is None
    assert last_boxed("\\boxed 7 apples") == "7"
    assert extract_answer("costs 1,234.5 dollars") == "1234.5"
    assert extract_answer("the pair is 3, 4") == "4"
    assert extract_answer("<answer> x = 3 </answer> then 9") == "x = 3"
    assert extract_gold("#### 18") == "18" and extract_gold(0.5) == "0.5"


def test_think_answer_format_strict_and_soft():
    strict, soft = ThinkAnswerFormat(), SoftThinkAnswerFormat()
    good = "<think>\nreason\n</think>\n<answer>\n42\n</answer>"
    cases = {
        good: (1.0, 1.0),
        "  <think>r</think><answer>4</answer>\n": (1.0, 1.0),
        "Sure! " + good: (0.0, 1.0),                                 # text before
        good + " trailing": (0.0, 1.0),                              # text after
        "<answer>4</answer><think>r</think>": (0.0, 0.0),            # wrong order
        "<think></think><answer>4</answer>": (0.0, 1.0),             # empty reasoning
        "<think>a<think>b</think><answer>4</answer>": (0.0, 1.0),    # nested tag
        "<think>r</think><answer>4</answer><answer>5</answer>": (0.0, 1.0),
        "<think>r</think>": (0.0, 0.0),
        "": (0.0, 0.0),
    }
    texts = list(cases)
    assert strict(None, texts) == [v[0] for v in cases.values()]
    assert soft(None, texts) == [v[1] for v in cases.values()]
    conv = [[{"role": "assistant", "content": good}]]
    assert strict(None, conv) == [1.0]
    assert ThinkAnswerFormat(think_prefilled=True)(None, ["r</think><answer>4</answer>"]) == [1.0]


def test_regex_reward():
    r = RegexReward(r"^Answer: \d+$", flags="m", match_reward=2.0, miss_reward=-1.0)
    assert r(None, ["blah\nAnswer: 12\n", "Answer: twelve"]) == [2.0, -1.0]
    assert RegexReward("abc", how="fullmatch")(None, ["abc", "abcd"]) == [1.0, 0.0]
    assert RegexReward("ABC", flags="i")(None, ["xabcx"]) == [1.0]
    with pytest.raises(ValueError, match="unknown flag 'q'"):
        RegexReward("a", flags="q")


def test_soft_overlong_punishment_matches_dapo():
    # max 100, cache 20: <=80 -> 0; 90 -> (80-90)/20 = -0.5; 100 -> -1; 101 -> -1
    f = SoftOverlongPunishment(max_completion_len=100, soft_punish_cache=20)
    ids = [[0] * n for n in (0, 80, 81, 90, 100, 101)]
    assert f(None, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="needs completion_ids"):
        f(None, ["x"], completion_ids=None)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(10, 20)


def test_cosine_length_reward():
    # defaults: correct 1.0 at L=0 -> 0.5 at max_len; wrong -1.0 at L=0 -> -0.5 at max_len
    f = CosineLengthReward(max_len=100)
    comps = ["\\boxed{4}", "\\boxed{4}", "\\boxed{5}", "\\boxed{5}", "\\boxed{4}", "\\boxed{4}"]
    ids = [[0] * n for n in (0, 50, 0, 50, 100, 150)]
    out = f(None, comps, completion_ids=ids, answer=["4"] * 6)
    # L=50: cos(pi/2)=0 -> midpoints 0.75 and -0.75; L=150 is clipped to L=100
    assert [round(v, 6) for v in out] == [1.0, 0.75, -1.0, -0.75, 0.5, 0.5]
    assert CosineLengthReward(max_len=100, exceed_length=-2.0)(None, ["\\boxed{4}"], completion_ids=[[0] * 101],
                                                               answer=["4"]) == [-2.0]
    by_chars = CosineLengthReward(max_len=18, unit="chars")(None, ["\\boxed{4}"], answer=["4"])  # 9 chars
    assert math.isclose(by_chars[0], 0.75)
    assert CosineLengthReward()(None, ["\\boxed{4}"], answer=[""]) == [None]  # gold unusable -> None
