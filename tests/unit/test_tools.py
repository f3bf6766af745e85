"""Tool calling between turns (grpokit.envs.TurnDriver, ToolRunner) and its faults, with the chat
tokenizer of the tool tasks (grpokit.models.new_chat_tokenizer): a tool that raises, hangs or does
not exist, a malformed call, a result that does not fit the budget, the iteration cap, async tools,
concurrency; and the checks made before step 1."""

import asyncio
import time

import pytest
import torch

from grpokit.envs import Conversation, MultiTurn, ToolRunner, TurnDriver, parse_turn, tool_suffix_ids
from grpokit.envs.environments import tool_table
from grpokit.models import new_chat_tokenizer

TOK = new_chat_tokenizer()


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


def explode(x: int) -> int:
    """Always fails.

    Args:
        x: Anything.
    """
    raise RuntimeError(f"cannot handle {x}")


def hang(x: int) -> int:
    """Never answers in time.

    Args:
        x: Anything.
    """
    time.sleep(3)
    return x


def slow(x: int) -> int:
    """Answers after 0.4 s.

    Args:
        x: Anything.
    """
    time.sleep(0.4)
    return x


async def amultiply(a: int, b: int) -> int:
    """Multiply two integers, asynchronously.

    Args:
        a: The first integer.
        b: The second integer.
    """
    await asyncio.sleep(0.01)
    return a * b


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def call(name, **args):
    import json

    return ids(f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call><|im_end|>')


def driver_for(tools, n=1, max_tokens=400, max_iterations=None, timeout=5.0):
    prompt = ids(TOK.apply_chat_template([{"role": "user", "content": "go"}], tools=tools, tokenize=False,
                                         add_generation_prompt=True))
    convs = [Conversation(prompt_ids=list(prompt), tools=tool_table(tools), tool_list=tools) for _ in range(n)]
    return TurnDriver(convs, TOK, ToolRunner(timeout=timeout), max_tokens=max_tokens, max_iterations=max_iterations,
                      eos_ids={TOK.eos_token_id})


def test_a_tool_result_comes_back_as_the_templates_tool_turn():
    d = driver_for([multiply])
    d.turn_ended(0, call("multiply", a=6, b=7), [0.0] * len(call("multiply", a=6, b=7)), "stop")
    going = d.continuations()
    assert TOK.decode(going[0]) == "\n<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n" \
                                   "<|im_start|>assistant\n"
    c = d.conv[0]
    assert c.messages[-1] == {"role": "tool", "name": "multiply", "content": "42"}
    assert [s.source for s in c.segments] == ["model", "external"] and (c.counts.turns, c.counts.tool_calls, c.counts.tool_failures) == (1, 1, 0)
    assert c.logps[-len(going[0]):] == [0.0] * len(going[0])


def screenshot() -> list:
    """Returns an image and a caption."""
    from PIL import Image

    return [{"type": "image", "image": Image.new("RGB", (8, 8))}, {"type": "text", "text": "a screenshot"}]


def test_a_text_models_tool_that_returns_an_image_is_refused_by_name():
    """A text-only model (no processor) cannot see an image a tool returns: rather than rendering a
    bare image placeholder, the conversation stops with an error naming the tool. (A
    vision-language model's tool images: tests/unit/test_vision.py, TRL's multimodal tool test.)"""
    d = driver_for([screenshot])
    d.turn_ended(0, call("screenshot"), [0.0] * len(call("screenshot")), "stop")
    with pytest.raises(ValueError, match="tool 'screenshot' returned an image"):
        d.continuations()


@pytest.mark.parametrize("tool, args, status", [(explode, {"x": 1}, "failed"), ("nope", {"x": 1}, "failed"),
                                                (multiply, {"a": 1, "c": 2}, "failed")])
def test_a_failing_call_gives_its_error_as_the_result_and_is_counted(tool, args, status):
    tools = [multiply] + ([tool] if callable(tool) else [])
    name = tool.__name__ if callable(tool) else tool
    d = driver_for(tools)
    d.turn_ended(0, call(name, **args), [0.0] * len(call(name, **args)), "stop")
    going = d.continuations()
    content = d.conv[0].messages[-1]["content"]
    assert 0 in going and content.startswith("{'error': ")  # the model sees the error (TRL's form) and goes on
    k = d.conv[0].counts
    assert (k.tool_calls, k.tool_failures, k.tool_timeouts) == (1, 1, 0)
    if name == "nope":
        assert "Tool nope not found" in content


def test_a_hanging_tool_times_out_and_is_counted():
    d = driver_for([hang], timeout=0.3)
    t0 = time.perf_counter()
    d.turn_ended(0, call("hang", x=1), [0.0] * len(call("hang", x=1)), "stop")
    going = d.continuations()
    assert time.perf_counter() - t0 < 2.0
    assert 0 in going and "timed out after 0.3 s" in d.conv[0].messages[-1]["content"]
    k = d.conv[0].counts
    assert (k.tool_calls, k.tool_failures, k.tool_timeouts) == (1, 1, 1)


def test_tools_of_different_samples_run_concurrently():
    d = driver_for([slow], n=6)
    t0 = time.perf_counter()
    for s in range(6):
        d.turn_ended(s, call("slow", x=s), [0.0] * len(call("slow", x=s)), "stop")
    going = d.continuations()
    assert len(going) == 6 and time.perf_counter() - t0 < 1.5  # 6 x 0.4 s sequentially would be 2.4 s


def test_async_tools():
    d = driver_for([amultiply], n=2)
    for s in range(2):
        d.turn_ended(s, call("amultiply", a=3, b=s + 1), [0.0] * len(call("amultiply", a=3, b=1)), "stop")
    d.continuations()
    assert [c.messages[-1]["content"] for c in d.conv] == ["3", "6"]


@pytest.mark.parametrize("text", ['<tool_call>\n{"arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>',
                                  '<tool_call>\n{"name": "multiply", "arguments": {a: 3}}\n</tool_call><|im_end|>'])
def test_a_malformed_call_is_counted_and_ends_the_conversation(text):
    d = driver_for([multiply])
    d.turn_ended(0, ids(text), [0.0] * len(ids(text)), "stop")
    assert d.continuations() == {}
    c = d.conv[0]
    assert c.counts.malformed_calls == 1 and c.counts.tool_calls == 0 and "tool_calls" not in c.messages[-1] and not c.truncated


def test_a_result_past_the_budget_ends_the_sample_truncated_without_the_result():
    turn = call("multiply", a=6, b=7)
    d = driver_for([multiply], max_tokens=len(turn) + 10)  # the result's ~30 tokens do not fit
    d.turn_ended(0, turn, [0.0] * len(turn), "stop")
    assert d.continuations() == {}
    c = d.conv[0]
    assert c.truncated and [m["role"] for m in c.messages] == ["assistant"] and len(c.ids) == len(turn)


def test_a_turn_cut_by_the_budget_is_truncated_and_ends():
    turn = call("multiply", a=6, b=7)[:-5]
    d = driver_for([multiply])
    d.turn_ended(0, turn, [0.0] * len(turn), "length")
    assert d.continuations() == {} and d.conv[0].truncated


def test_max_tool_calling_iterations():
    d = driver_for([multiply], max_iterations=1)
    turn = call("multiply", a=2, b=3)
    d.turn_ended(0, turn, [0.0] * len(turn), "stop")
    assert 0 in d.continuations()
    d.turn_ended(0, turn, [0.0] * len(turn), "stop")  # a second call: over the cap, the conversation ends
    assert d.continuations() == {} and d.conv[0].counts.tool_calls == 1 and "tool_calls" in d.conv[0].messages[-1]


def test_parse_and_suffix_on_qwen3s_template_that_is_not_prefix_preserving():
    """Qwen3's template drops the empty think block of an assistant turn once a tool message
    follows; the suffix is what follows that turn's EOS either way."""
    from tests.trl_compat.standins.tokenizer_families import TEMPLATES

    tok = new_chat_tokenizer()
    tok.chat_template = (TEMPLATES / "qwen3.jinja").read_text()
    suffix = tool_suffix_ids(tok, [{"role": "tool", "name": "f", "content": "12"}])
    assert tok.decode(suffix) == "\n<|im_start|>user\n<tool_response>\n12\n</tool_response><|im_end|>\n" \
                                 "<|im_start|>assistant\n"
    msg, bad = parse_turn(tok, call("f", x=1), [], None)
    assert not bad and msg["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}


def test_checks_before_step_1():
    with pytest.raises(ValueError, match="cannot be described to the model"):
        MultiTurn(tools=[lambda x: x], tokenizer=TOK)
    plain = new_chat_tokenizer()
    plain.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(ValueError, match="cannot render a tool-calling conversation"):
        MultiTurn(tools=[multiply], tokenizer=plain)
    unknown = new_chat_tokenizer()
    unknown.response_template = None
    unknown.chat_template = unknown.chat_template.replace("<tool_call>", "<call>")
    with pytest.raises(ValueError, match="response_template"):
        MultiTurn(tools=[multiply], tokenizer=unknown)

    class NoReset:
        def act(self, x: int) -> int:
            """Act.

            Args:
                x: A value.
            """
            return x

    with pytest.raises(ValueError, match="must define a callable `reset`"):
        MultiTurn(environment_factory=NoReset, tokenizer=TOK)


def test_environment_reset_text_joins_the_prompt_and_groups_may_differ():
    """An environment whose reset() gives each sample its own text: each sample gets its own prompt
    (no shared prefill) and its own tools bound to its own instance."""
    from grpokit.rollout import SamplingParams

    class Counter:
        made = 0

        def __init__(self):
            Counter.made += 1
            self.k = Counter.made
            self.total = 0

        def reset(self, **row):
            self.total = 0
            return f" (counter {self.k})"

        def add(self, x: int) -> int:
            """Add to the counter.

            Args:
                x: The amount.
            """
            self.total += x
            return self.total

    seen = []

    class Scripted:
        eos_ids = {TOK.eos_token_id}

        def generate(self, prompt_ids, n=1, params=None):
            from grpokit.rollout import Completion

            seen.append((len(prompt_ids), n))
            turn = call("add", x=5) if len(seen) == 1 else ids("done<|im_end|>")
            return [Completion(prompt_index=i, token_ids=turn, logprobs=[-0.5] * len(turn), finish_reason="stop")
                    for i in range(len(prompt_ids)) for _ in range(n)]

    mt = MultiTurn(environment_factory=Counter, tokenizer=TOK)
    traj, envs = mt.rollout(Scripted(), [{"prompt": [{"role": "user", "content": "count"}]}], 3,
                            SamplingParams(max_tokens=200, seed=0), max_tokens=200, eos_ids={TOK.eos_token_id},
                            encode=lambda p, kw: ids(TOK.apply_chat_template(p, tokenize=False,
                                                                            add_generation_prompt=True, **kw)))
    assert seen[0] == (3, 1)  # three different prompts: one each
    assert [p[-1]["content"] for p in traj.prompts] == [f"count (counter {e.k})" for e in envs]
    assert [e.total for e in envs] == [5, 5, 5] and len({id(e) for e in envs}) == 3
    assert traj.tool_stats["tool_calls"].tolist() == [1, 1, 1]
    assert [m["role"] for m in traj.completions[0]] == ["assistant", "tool", "assistant"]
    assert traj.completions[0][-1]["content"] == "done"
    assert traj.trained_mask(0).count(True) == len(call("add", x=5)) + len(ids("done<|im_end|>"))
    assert torch.equal(traj.truncated, torch.zeros(3, dtype=torch.bool))
