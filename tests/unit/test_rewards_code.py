"""The `code` reward on honest inputs: extraction, test formats, partial credit, stdin/stdout,
HumanEval-style checks, None rows, and through the RewardRunner. Attacks are in tests/security/test_code_sandbox.py."""

import json
import sys

import pytest

from grpokit.rewards import RewardRunner, load_reward_funcs
from grpokit.rewards.code import CodeReward, extract_code, parse_tests
from grpokit.rewards.sandbox import CommandSandbox, SandboxUnavailable

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the local sandbox needs Linux")


def fenced(src: str, tag: str = "python") -> str:
    return f"Here you go:\n```{tag}\n{src}\n```\nDone."


@pytest.fixture(scope="module")
def code():
    try:
        return CodeReward(timeout=2.0, max_concurrency=4)
    except SandboxUnavailable as e:  # e.g. a container without namespaces: the attack suite says so too
        pytest.skip(str(e))


def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```py\nb = 2\n```") == "b = 2\n"
    assert extract_code("```\nplain = 1\n```") == "plain = 1\n"
    assert extract_code("```python\nx = 1\n```\n```\ny = 2\n```") == "x = 1\n"  # tagged wins
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("def f(): pass") is None


def test_parse_tests_formats():
    asserts = ["assert f(1) == 2"]
    assert parse_tests(asserts) == ("assert", asserts)
    assert parse_tests(json.dumps(asserts)) == ("assert", asserts)
    assert parse_tests("def check(c):\n    assert c(1) == 2\ncheck(f)") == \
        ("assert", ["def check(c):\n    assert c(1) == 2\ncheck(f)"])
    assert parse_tests([{"input": "1\n", "output": "2\n"}]) == ("io", [("1\n", "2\n")])
    assert parse_tests({"inputs": ["1", "2"], "outputs": ["2", "4"]}) == ("io", [("1", "2"), ("2", "4")])
    assert parse_tests(json.dumps({"inputs": ["1"], "outputs": ["2"]})) == ("io", [("1", "2")])
    assert parse_tests(None) is None and parse_tests([]) is None and parse_tests("") is None
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_tests({"inputs": ["1", "2"], "outputs": ["2"]})
    with pytest.raises(ValueError, match="expected a list of assert strings"):
        parse_tests([1, 2])


def test_assert_tests_partial_credit_and_all_or_nothing(code):
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 0) == -1"]
    good = fenced("def add(a, b):\n    return a + b")
    off_by_one_for_negatives = fenced("def add(a, b):\n    return abs(a) + b")
    out = code(None, [good, off_by_one_for_negatives, "no code here"], tests=[tests] * 3)
    assert out[0] == 1.0 and out[1] == pytest.approx(2 / 3) and out[2] == 0.0
    strict = CodeReward(timeout=2.0, all_or_nothing=True, sandbox=code.sandbox)
    assert strict(None, [off_by_one_for_negatives], tests=[tests]) == [0.0]


def test_plain_data_round_trips_and_stdlib_in_tests(code):
    src = fenced("import math\n"
                 "LIMIT = 10\n"
                 "class Counter:\n"
                 "    def __init__(self): self.n = 0\n"
                 "    def bump(self, k=1):\n"
                 "        self.n += k\n"
                 "        return self.n\n"
                 "def stats(xs):\n"
                 "    return {'sum': sum(xs), 'set': set(xs), 'pair': (min(xs), max(xs)), 'mean': sum(xs) / len(xs),\n"
                 "            'bytes': bytes(xs), 'nan': float('nan'), 'c': complex(1, 2)}\n"
                 "def gen(n):\n"
                 "    return (i * i for i in range(n))")
    tests = ["s = stats([1, 2, 2])\nassert s['sum'] == 5 and s['set'] == {1, 2} and s['pair'] == (1, 2)",
             "assert math.isclose(stats([1, 2])['mean'], 1.5)",
             "assert stats([3])['bytes'] == b'\\x03' and stats([3])['c'] == 1 + 2j",
             "import math\nassert math.isnan(stats([1])['nan'])",
             "assert LIMIT == 10",
             "c = Counter()\nc.bump()\nassert c.bump(2) == 3 and c.n == 3",
             "assert list(gen(4)) == [0, 1, 4, 9]",
             "def check(candidate):\n    assert candidate([4, 4])['sum'] == 8\ncheck(stats)",
             "try:\n    stats([])\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError('no error')",
             "assert math.floor(stats([1, 2])['mean']) == 1"]
    assert code(None, [src], tests=[tests]) == [1.0]


def test_stdin_stdout_tests(code):
    tests = [{"input": "3\n", "output": "6\n"}, {"input": "10", "output": "20"}, {"input": "0\n", "output": "0"}]
    good = fenced("n = int(input())\nprint(n * 2)")
    wrong_on_zero = fenced("n = int(input())\nprint(n * 2 if n else 1)")
    crashes = fenced("n = int(input())\nprint(n * 2)\nraise SystemExit(3)")  # right output, exit status 3
    assert code(None, [good, wrong_on_zero, crashes], tests=[tests] * 3) == [1.0, pytest.approx(2 / 3), 0.0]


def test_rows_without_tests_are_none_and_broken_tests_warn(code, caplog):
    good = fenced("def f():\n    return 1")
    out = code(None, [good, good, good], tests=[None, [], ["assert f( == 1"]])
    assert out == [None, None, None]
    assert "does not compile" in caplog.text


def test_through_the_runner_with_the_registry_name(code):
    (fn,) = load_reward_funcs(["code"], reward_kwargs={"code": {"timeout": 2.0, "max_concurrency": 2}})
    runner = RewardRunner([fn])
    with pytest.raises(ValueError, match="'code': needs the test cases in a column named 'tests'"):
        runner.check_signature({"prompt", "answer"})
    runner.check_signature({"prompt", "tests"})
    comps = [fenced("def sq(x):\n    return x * x"), fenced("def sq(x):\n    return x + x")]
    out = runner(["p", "p"], comps, columns={"tests": [["assert sq(3) == 9"]] * 2})
    assert out.per_func[:, 0].tolist() == [1.0, 0.0]


def test_command_sandbox_hook_runs_the_same_protocol():
    # CommandSandbox([]) runs the server as a plain local process: no isolation (the command's job),
    # but the grading is the trainer's, so exit codes and prints still cannot fake a pass
    plain = CodeReward(timeout=2.0, sandbox=CommandSandbox([], python=sys.executable))
    fake = fenced("print('PASSED')\nimport os\nos._exit(0)")
    good = fenced("def add(a, b):\n    return a + b")
    assert plain(None, [good, fake], tests=[["assert add(1, 2) == 3"]] * 2) == [1.0, 0.0]
