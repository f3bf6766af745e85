"""The rollout seam: what an engine returns, the `Engine` protocol and the engine registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol, runtime_checkable

from grpokit.rollout.sampling import SamplingParams


@dataclass
class Completion:
    """One sampled completion of one prompt."""

    prompt_index: int
    """Index of its prompt in the `prompt_ids` passed to `generate`."""
    token_ids: list[int]
    """Generated ids: include the EOS id when it ended on EOS, and the id that completed a stop string."""
    logprobs: list[float] = field(default_factory=list)
    """One per token id: its log-probability under the distribution actually sampled."""
    finish_reason: Literal["stop", "length"] = "length"
    """"stop" for EOS or a stop string, "length" when max_tokens was reached."""
    text: str = ""
    """Decoded completion (special tokens skipped), cut right after a stop string (included)."""


@runtime_checkable
class Engine(Protocol):
    """Samples n completions per prompt; output grouped by prompt (prompt 0's n first, ...)."""

    def generate(
        self, prompt_ids: list[list[int]], n: int = 1, params: SamplingParams | None = None
    ) -> list[Completion]: ...

    def update_weights(self, model) -> None: ...


ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str):
    """Decorator registering an engine factory `(model, tokenizer, **kw) -> Engine` under `name`."""

    def deco(factory):
        ENGINES[name] = factory
        return factory

    return deco


def make_engine(name: str, model, tokenizer, **kwargs) -> Engine:
    """Build the engine registered as `name` ("hf", "vllm", or one added with `register_engine`).
    The registry is filled by importing the engine modules (grpokit.rollout does); the vLLM
    library itself is imported only when its engine is built."""
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](model, tokenizer, **kwargs)


def finish_text(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` right after the stop string that ends first; returns (text, whether cut)."""
    best = -1
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best < 0 or i + len(s) < best):
            best = i + len(s)
    return (text[:best], True) if best >= 0 else (text, False)


def eos_ids(model, tokenizer) -> set[int]:
    """EOS ids from the generation config, the model config and the tokenizer (all of them)."""
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is not None:
            ids.update([src] if isinstance(src, int) else [int(i) for i in src])
    return ids
