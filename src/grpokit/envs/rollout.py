"""Multi-turn rollouts: the model writes a turn, its tool calls run, their results are appended,
the model goes on, until a turn has no tool call, `max_tool_calling_iterations` is reached or the
completion budget (`max_completion_length`, model and tool tokens together, as TRL) is spent.

The engine owns the tokens and the KV caches, this module the conversations: `TurnDriver` is
told when a sample's turn ends (`turn_ended`: parse it, start its tool calls at once) and is
asked, when every running sample has ended its turn, which samples go on and with which tokens
(`continuations`: the tool results and the next turn's header, as the chat template renders
them). An engine that declares `capabilities.kv_across_turns` (HFEngine) keeps each sample's KV
cache across turns and prefills only those tokens (`generate_multiturn`); any other engine gets the
whole conversation again each turn (`run_turns`' fallback, e.g. transformers' generate, or vLLM
with its prefix cache). A
vision-language model's conversations take the fallback too: a tool result may hold images, which
the processor expands into their tokens (`Conversation.images`), and each turn is given the
conversation's images so far; the trajectories carry them (`completion_images`) for training.

A sample's completion is every token after its prompt: model segments (trained) and external
ones (tool output: context only, out of the loss and of every normaliser).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, cast

import torch

from grpokit.trajectory import EXTERNAL, MODEL, Segment, ToolCounts, ToolStats, Trajectories
from grpokit.envs.chat import check_tool_template, parse_turn, tool_suffix_ids
from grpokit.envs.environments import Environments, tool_table
from grpokit.envs.tools import FAILED, OK, TIMEOUT, ToolRunner, tool_name
from grpokit.rollout.base import MultiTurnEngine, capabilities_of

@dataclass
class Conversation:
    """One sample's state across turns."""

    prompt_ids: list[int]
    tools: dict[str, Callable]
    tool_list: list
    ids: list[int] = field(default_factory=list)          # completion tokens so far (model and tool)
    logps: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    pending: list | None = None
    truncated: bool = False
    iterations: int = 0
    counts: ToolCounts = field(default_factory=ToolCounts)
    images: list = field(default_factory=list)   # (offset in ids, VisionInputs): images of tool results


class TurnDriver:
    """What happens between the turns of a batch of conversations (see the module docstring)."""

    def __init__(self, conversations: list[Conversation], tokenizer, runner: ToolRunner, *, max_tokens: int,
                 max_iterations: int | None, eos_ids: set[int], chat_template_kwargs: dict | None = None,
                 processor=None):
        self.conv = conversations
        self.tok = tokenizer
        self.processor = processor  # a vision-language model's: tool results may hold images
        self.runner = runner
        self.max_tokens = max_tokens
        self.max_iterations = max_iterations
        self.eos_ids = set(eos_ids)
        self.kwargs = dict(chat_template_kwargs or {})
        self.kwargs.pop("tools", None)
        self._suffix_cache: dict[tuple, list[int]] = {}

    def remaining(self, sample: int) -> int:
        return self.max_tokens - len(self.conv[sample].ids)

    def context_ids(self, sample: int) -> list[int]:
        c = self.conv[sample]
        return c.prompt_ids + c.ids

    def context_images(self, sample: int):
        """The images of a sample's conversation so far (VisionInputs over prompt + completion), or None."""
        from grpokit.data.vision import join_vision

        c = self.conv[sample]
        return join_vision(len(c.prompt_ids) + len(c.ids), [(len(c.prompt_ids) + o, v) for o, v in c.images])

    def completion_images(self, sample: int):
        """The images in a sample's completion (VisionInputs over its completion tokens), or None."""
        from grpokit.data.vision import join_vision

        c = self.conv[sample]
        return join_vision(len(c.ids), c.images)

    def turn_ended(self, sample: int, token_ids: list[int], logprobs: list[float], finish_reason: str) -> None:
        """Sample `sample` ended a turn with `token_ids`: record it, parse it, start its tool calls."""
        c = self.conv[sample]
        start = len(c.ids)
        c.ids += list(token_ids)
        c.logps += list(logprobs)
        c.segments.append(Segment(start, len(c.ids), MODEL))
        c.counts.turns += 1
        if not token_ids:
            c.truncated = finish_reason == "length"
            return
        message, malformed = parse_turn(self.tok, list(token_ids), c.prompt_ids + c.ids[:start], c.tool_list)
        c.messages.append(message)
        c.counts.malformed_calls += int(malformed)
        if finish_reason == "length":
            c.truncated = True
            return
        calls = message.get("tool_calls")
        if (not calls or malformed or token_ids[-1] not in self.eos_ids
                or (self.max_iterations is not None and c.iterations >= self.max_iterations)):
            return
        c.pending = [self.runner.submit(c.tools, call) for call in calls]
        c.counts.tool_calls += len(calls)

    def continuations(self) -> dict[int, list[int]]:
        """Samples that go on, each with the tokens to append before its next turn. Waits for the
        tool calls; a result that does not fit in the budget ends its sample (truncated)."""
        out: dict[int, list[int]] = {}
        for i, c in enumerate(self.conv):
            if c.pending is None:
                continue
            results = [self.runner.result(p) for p in c.pending]
            c.pending = None
            c.counts.tool_failures += sum(r.status in (FAILED, TIMEOUT) for r in results)
            c.counts.tool_timeouts += sum(r.status == TIMEOUT for r in results)
            messages = [{"role": "tool", "name": r.name,
                         "content": r.content if isinstance(r.content, list) else str(r.content)} for r in results]
            images = [part.get("image") for m in messages if isinstance(m["content"], list)
                      for part in m["content"] if isinstance(part, dict) and part.get("type") == "image"]
            vision = None
            if images:
                if self.processor is None:  # never rendered as a bare placeholder the model cannot see
                    name = next(m["name"] for m in messages if isinstance(m["content"], list))
                    raise ValueError(f"tool {name!r} returned an image, and the model is not a vision-language "
                                     "model (no processor to give it the image). Return text from the tool.")
                from grpokit.data.vision import encode_text_with_images

                suffix, vision = encode_text_with_images(
                    tool_suffix_ids(self.tok, messages, self.kwargs), images, self.processor,
                    where=f"the result of tool {messages[0]['name']!r}")
            else:
                suffix = self._suffix(messages)
            if len(c.ids) + len(suffix) >= self.max_tokens:  # no room for the results and a model token
                c.truncated = True
                continue
            c.messages += messages
            start = len(c.ids)
            if vision is not None:
                c.images.append((start, vision))
            c.ids += suffix
            c.logps += [0.0] * len(suffix)
            c.segments.append(Segment(start, len(c.ids), EXTERNAL))
            c.iterations += 1
            out[i] = suffix
        return out

    def _suffix(self, messages: list[dict]) -> list[int]:
        key = tuple((m["name"], str(m["content"])) for m in messages)
        if key not in self._suffix_cache:
            self._suffix_cache[key] = tool_suffix_ids(self.tok, messages, self.kwargs)
        return list(self._suffix_cache[key])


def run_turns(engine, prompt_ids: list[list[int]], n: int, params, driver: TurnDriver) -> None:
    """Every conversation to its end. Samples are numbered as the engine's output (prompt 0's n
    samples first). An engine that keeps KV across turns (`capabilities.kv_across_turns`: HFEngine)
    reuses each sample's KV cache; other engines, and a vision-language model's conversations
    (their tool results may hold images), are given the whole conversation again at each turn, with
    its images and the turn's remaining budget."""
    caps = capabilities_of(engine)
    # a vision-language model's conversations are re-encoded each turn, with the images of their tool
    # results (the KV-reuse path prefills text only)
    vlm = getattr(driver, "processor", None) is not None
    if caps.kv_across_turns and not vlm:
        cast(MultiTurnEngine, engine).generate_multiturn(prompt_ids, n, params, driver)
        return
    for s, out in enumerate(engine.generate(prompt_ids, n=n, params=params)):
        driver.turn_ended(s, list(out.token_ids), list(out.logprobs), out.finish_reason)
    turn = 0
    while True:
        going = driver.continuations()
        if not going:
            return
        turn += 1
        order = sorted(going)
        budget = max(driver.remaining(s) for s in order)
        seed = None if params.seed is None else params.seed + 7919 * turn
        images = [driver.context_images(s) for s in order] if vlm else []
        if any(v is not None for v in images) and not caps.images:
            raise ValueError(f"a tool returned an image, which {type(engine).__name__} cannot give the model; sample "
                             "with grpokit's engine (rollout_engine='hf') to train on images in tool results.")
        outs = engine.generate([driver.context_ids(s) for s in order], n=1,
                               params=dataclasses.replace(params, max_tokens=budget, seed=seed),
                               **({"images": images} if any(v is not None for v in images) else {}))
        for s, out in zip(order, outs):
            room = driver.remaining(s)
            cut = len(out.token_ids) > room
            driver.turn_ended(s, list(out.token_ids[:room]), list(out.logprobs[:room]),
                              "length" if cut else out.finish_reason)


class MultiTurn:
    """A run's tools and environments (TRL's `tools=` and `environment_factory=`), checked once;
    `rollout` samples one step's conversations."""

    def __init__(self, *, tools=None, environment_factory=None, tokenizer, max_iterations: int | None = None,
                 tool_timeout: float | None = 60.0, chat_template_kwargs: dict | None = None, processor=None):
        self.standalone = list(tools or [])
        for i, fn in enumerate(self.standalone):
            check_tool(fn, f"tools[{i}]")
        self.environments = Environments(environment_factory, self.standalone) if environment_factory else None
        self.tools = self.environments.all_tools() if self.environments else list(self.standalone)
        for fn in self.tools[len(self.standalone):]:
            check_tool(fn, f"environment method {tool_name(fn)}")
        self.parser = check_tool_template(tokenizer) if self.tools else None
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's: images in tool results reach the model
        self.max_iterations = max_iterations
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.runner = ToolRunner(tool_timeout)
        self.last_environments: list | None = None

    def describe(self) -> str:
        names = ", ".join(tool_name(t) for t in self.tools) or "none"
        envs = ""
        if self.environments is not None:
            kinds = sorted({type(p[0]).__name__ for p in self.environments.pool.values()})
            envs = f"; environments: {', '.join(kinds)}"
        cap = "until a turn has no tool call" if self.max_iterations is None else \
            f"at most {self.max_iterations} tool rounds"
        return f"multi-turn: tools {names}{envs}; {cap}; tool calls parsed with {self.parser or 'none'}"

    def reward_funcs(self) -> list[Callable]:
        return self.environments.reward_funcs() if self.environments else []

    def render_kwargs(self, tools: list) -> dict:
        return {**self.chat_template_kwargs, "tools": tools or None}

    def row_tools(self, row: dict) -> list:
        """The tools rendered in a row's prompt before any environment is reset."""
        if self.environments is None:
            return self.tools
        return self.environments.tools.get(self.environments.name_of(row), self.standalone)

    def rollout(self, engine, rows: list[dict], n: int, params, *, max_tokens: int, encode: Callable,
                eos_ids: set[int] | None = None) -> tuple[Trajectories, list]:
        """n conversations for each of `rows` (dicts with 'prompt' and the other columns);
        `encode(prompt, chat_template_kwargs)` tokenizes a prompt. Returns the trajectories (without
        row_index: the caller's) and the environments (one per sample, or []). A turn ends on one of
        `eos_ids` (default: the engine's, else the tokenizer's EOS)."""
        eos_ids = eos_ids or getattr(engine, "eos_ids", None) or {self.tokenizer.eos_token_id}
        prompts, tool_lists, envs = [], [], []
        if self.environments is not None:
            names = [self.environments.name_of(r) for r in rows for _ in range(n)]
            envs = self.environments.take(names)
        for i, row in enumerate(rows):
            for k in range(n):
                prompt = row["prompt"]
                tools = self.tools
                if envs and self.environments is not None:  # envs come from self.environments
                    env = envs[i * n + k]
                    reset_kwargs = {c: v for c, v in row.items() if c != "environment" or not self.environments.multi}
                    obs = env.reset(**reset_kwargs)
                    prompt = _with_observation(prompt, obs)
                    tools = self.environments.tools_of(env)
                prompts.append(prompt)
                tool_lists.append(tools)
        cache: dict[tuple, list[int]] = {}
        prompt_ids = []
        for prompt, tools in zip(prompts, tool_lists):
            key = (repr(prompt), tuple(tool_name(t) for t in tools))
            if key not in cache:
                cache[key] = encode(prompt, self.render_kwargs(tools))
            prompt_ids.append(cache[key])
        conversations = [Conversation(prompt_ids=p, tools=tool_table(t), tool_list=t)
                         for p, t in zip(prompt_ids, tool_lists)]
        driver = TurnDriver(conversations, self.tokenizer, self.runner, max_tokens=max_tokens,
                            max_iterations=self.max_iterations, eos_ids=eos_ids,
                            chat_template_kwargs=self.chat_template_kwargs, processor=self.processor)
        uniform = all(prompt_ids[i * n + k] == prompt_ids[i * n] for i in range(len(rows)) for k in range(n))
        if uniform:  # the G samples of a prompt share its prefill
            run_turns(engine, [prompt_ids[i * n] for i in range(len(rows))], n, params, driver)
        else:  # an environment gave the samples of a group different prompts: one each
            run_turns(engine, prompt_ids, 1, params, driver)
        self.last_environments = envs
        traj = Trajectories(
            row_index=[i for i in range(len(rows)) for _ in range(n)], prompts=prompts,
            completions=[c.messages for c in conversations], prompt_ids=prompt_ids,
            completion_ids=[c.ids for c in conversations], sampling_logps=[c.logps for c in conversations],
            truncated=torch.tensor([c.truncated for c in conversations], dtype=torch.bool),
            segments=[c.segments for c in conversations],
            tool_stats=ToolStats.of([c.counts for c in conversations]),
            completion_images=([driver.completion_images(i) for i in range(len(conversations))]
                               if any(c.images for c in conversations) else None))
        return traj, envs

    def close(self) -> None:
        self.runner.close()


def _with_observation(prompt, obs):
    """TRL's reset(): a returned string is appended to the last user message (a new list; the
    row is left as it was)."""
    if obs is None:
        return prompt
    if isinstance(prompt, str):
        return prompt + str(obs)
    last = prompt[-1]
    content = last["content"]
    if isinstance(obs, list) and isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if isinstance(obs, str) and isinstance(content, list):
        obs = [{"type": "text", "text": obs}]
    return list(prompt[:-1]) + [{**last, "content": content + obs}]


def check_tool(fn, where: str) -> None:
    """A tool must be callable and describable (transformers' get_json_schema: type hints and a
    Google-style docstring with every argument); the error names it and says what is missing."""
    if not callable(fn):
        raise TypeError(f"{where} is not callable ({type(fn).__name__}).")
    from transformers.utils import get_json_schema

    try:
        get_json_schema(fn)
    except Exception as e:  # noqa: BLE001 - DocstringParsingException, TypeHintParsingException, ...
        raise ValueError(f"{where} ({tool_name(fn)}) cannot be described to the model: {e} Give it type hints and a "
                         "Google-style docstring with an 'Args:' entry per argument.") from None


__all__ = ["Conversation", "MultiTurn", "TurnDriver", "run_turns", "OK"]
