"""Rollout engines: G sampled completions per prompt, with the logprobs of what was sampled.

    from grpokit.rollout import HFEngine, SamplingParams
    engine = HFEngine(model, tokenizer)
    out = engine.generate(prompt_ids, n=8, params=SamplingParams(max_tokens=256, stop=["</answer>"]))

`make_engine("hf" | "hf-generate" | "vllm", model, tokenizer, **kw)` picks an engine by name from
the registry (`register_engine`); the vLLM library is imported only when its engine is built.
`hf-generate` is transformers' own `generate`, for models and settings HFEngine does not cover.
Each engine declares what it can do in `engine.capabilities` (an `EngineCapabilities`).
"""

from grpokit.rollout.base import (ENGINES, Completion, Engine, EngineCapabilities, MultiTurnEngine, capabilities_of,
                                  make_engine, register_engine)
from grpokit.rollout.generate import GenerateEngine, needs_generate
from grpokit.rollout.hf import HFEngine
from grpokit.rollout.vllm import VLLMEngine
from grpokit.rollout.sampling import SamplingParams

__all__ = ["ENGINES", "Completion", "Engine", "EngineCapabilities", "GenerateEngine", "HFEngine", "MultiTurnEngine",
           "needs_generate", "SamplingParams", "VLLMEngine", "capabilities_of", "make_engine", "register_engine"]
