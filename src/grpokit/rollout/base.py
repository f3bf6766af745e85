"""The rollout seam: what an engine returns, the `Engine` protocol and the engine registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol, runtime_checkable

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


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, declared once by the engine; the rest of the code reads this record
    instead of testing class names, `hasattr` or signatures. The defaults are what an engine that
    declares nothing is taken to be (`capabilities_of`): a text-only `generate` whose samples come
    from a policy other than the trainer's forward."""

    images: bool = False
    """`generate` takes a vision-language model's images (`images=`, per prompt a
    grpokit.data.vision.VisionInputs or None, and `image_features=`). Read by the run's set-up
    (image datasets) and by `envs.run_turns` (images in tool results)."""
    kv_across_turns: bool = False
    """`generate_multiturn(prompt_ids, n, params, driver)`: each conversation keeps its KV cache
    across turns and only the new tokens are prefilled (text prompts). Read by `envs.run_turns`;
    other engines are given the whole conversation again at each turn."""
    exact_fp32_logprobs: bool = False
    """The log-probs it returns are the trainer's own softmax(logits / T) of the same `model`, in
    float32 or float64 and without active dropout (measured within ~1e-5 nats of the training
    forward), so they may stand in for the old policy's. Read by
    `core.forward.sampler_logps_are_old_logps`."""
    sampler_differs_from_trainer: bool = True
    """It samples from its own copy of the weights with its own kernels (vLLM): its log-probs are
    not the trainer's (the importance-sampling correction's case), and `update_weights` copies the
    trainer's weights over. Read by `core.forward.sampler_logps_are_old_logps` and by the run when a
    replaced `model.generate` could stand in for the engine (never for such an engine)."""
    keeps_state: bool = False
    """It keeps something from call to call that changes how it samples, not what (HFEngine's
    drafter remembers the last wave's completions): `state_dict()` returns it as plain lists and
    numbers, `load_state_dict()` restores it, and a checkpoint keeps it so that a resumed run
    decodes exactly as the straight one. Read by the run's pipeline (grpokit.pipeline)."""
    uses_model_generate: bool = False
    """It samples by calling the model's own `generate` (transformers'), so a replaced
    `model.generate` (a wrapper, a test's mock) is what samples. Read by the run: an engine that
    samples the trainer's module itself is swapped for the `hf-generate` engine when `generate` was
    replaced (as TRL, which always samples through it)."""


@runtime_checkable
class Engine(Protocol):
    """Samples n completions per prompt; output grouped by prompt (prompt 0's n first, ...).

    Every attribute and method the rest of grpokit uses on an engine; `generate`'s `images` and
    `image_features` only where `capabilities.images`, `generate_multiturn` (see `MultiTurnEngine`)
    only where `capabilities.kv_across_turns`."""

    capabilities: EngineCapabilities
    """What it can do (see EngineCapabilities)."""
    eos_ids: set[int]
    """Token ids that end a completion (a turn, in multi-turn rollouts)."""
    model: Any
    """The torch module it samples from, or None when it holds its own copy of the weights (vLLM)."""

    def generate(self, prompt_ids: list[list[int]], n: int = 1, params: SamplingParams | None = None,
                 images: list | None = None, image_features: Any = None) -> list[Completion]:
        """n completions per prompt. `images`: per prompt its VisionInputs or None;
        `image_features`: a grpokit.modeling.vision.ImageFeatures cache (an engine without
        `capabilities.images` refuses images)."""

    def update_weights(self, model) -> None:
        """Sample from `model`'s current weights from now on (a no-op when it is the engine's own module)."""


@runtime_checkable
class MultiTurnEngine(Engine, Protocol):
    """An engine with `capabilities.kv_across_turns`."""

    def generate_multiturn(self, prompt_ids: list[list[int]], n: int, params: SamplingParams | None,
                           driver: Any) -> None: ...


_UNDECLARED = EngineCapabilities()


def capabilities_of(engine) -> EngineCapabilities:
    """The engine's declared capabilities; an engine that declares none (one registered from
    outside, a test's stand-in with `generate` only) gets the defaults: a text-only `generate` of
    its own policy."""
    return getattr(engine, "capabilities", _UNDECLARED)


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
