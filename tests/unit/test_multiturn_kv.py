"""Multi-turn rollouts with KV reuse (HFEngine.generate_multiturn) against re-encoding.

The reference runs each conversation alone and re-encodes the whole sequence (prompt, every turn,
every tool result) for each token, with the same counter-based uniforms: token t of sample s's
completion uses uniforms[s, t]. The engine keeps each sample's KV cache across turns, parks
finished rows and prefills only the new tokens. Same tokens, same logprobs (greedy and sampled),
whatever the batch composition, waves or cache growth.
"""

import pytest
import torch

from grpokit.envs import run_turns
from grpokit.rollout import HFEngine, SamplingParams
from tests.helpers import (TURN_END, TURN_PROMPTS, TURN_VOCAB, ScriptedDriver, bench_models, engine_turns,
                           make_bench_tiny_model, reencoded_turns)

models = bench_models()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one torch thread

VOCAB, PROMPTS, END = TURN_VOCAB, TURN_PROMPTS, TURN_END  # the scripted conversations of tests/helpers.py
reference, engine_run = reencoded_turns, engine_turns


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer(VOCAB)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_reuse_equals_reencoding(arch, temperature, tok):
    model = make_bench_tiny_model(tok, arch, seed=3)
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=11)
    ref = reference(model, PROMPTS, 3, params, 40, turns=4)
    got, engine = engine_run(model, tok, PROMPTS, 3, params, 40, turns=4)
    assert sum(t > 1 for t in ref.n_turns) >= 3, "the scripted conversations should have several turns"
    assert got.model_tokens == ref.model_tokens
    assert got.ids == ref.ids
    for a, b in zip(got.logps, ref.logps):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)


def test_kv_reuse_with_waves_and_cache_growth(tok):
    """A small token budget splits the rollout into waves (a group over several); every wave
    grows its cache past the planned capacity (holes left by parked rows and padded results)."""
    model = make_bench_tiny_model(tok, "qwen2", seed=5)
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=2)
    ref = reference(model, PROMPTS, 4, params, 48, turns=6)
    got, engine = engine_run(model, tok, PROMPTS, 4, params, 48, turns=6, max_batch_tokens=150)
    assert engine.stats["waves"] >= 3
    assert got.model_tokens == ref.model_tokens
    for a, b in zip(got.logps, ref.logps):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)


def test_fallback_reencodes_with_the_same_protocol(tok):
    """An engine without generate_multiturn gets the whole conversation again each turn (n=1)."""
    model = make_bench_tiny_model(tok, "qwen2", seed=3)
    calls = []

    class Plain:
        def __init__(self):
            self.inner = HFEngine(model, tok)
            self.inner.eos_ids = set(END)

        def generate(self, prompt_ids, n=1, params=None):
            calls.append((len(prompt_ids), n))
            return self.inner.generate(prompt_ids, n=n, params=params)

    samples = [p for p in PROMPTS for _ in range(2)]
    driver = ScriptedDriver(len(samples), samples, 30, turns=3)
    run_turns(Plain(), PROMPTS, 2, SamplingParams(max_tokens=30, temperature=0.0, seed=0), driver)
    assert calls[0] == (3, 2) and all(n == 1 for _, n in calls[1:]) and len(calls) > 1
    assert all(len(ids) <= 30 for ids in driver.ids)
    kv, _ = engine_run(model, tok, PROMPTS, 2, SamplingParams(max_tokens=30, temperature=0.0, seed=0), 30, turns=3)
    assert kv.model_tokens == driver.model_tokens  # greedy: the same conversations either way


def test_waves_test_grows_the_cache(tok, monkeypatch):
    """The wave test above does exercise cache growth (guard against it silently not)."""
    from grpokit.rollout.kv import SlotCache

    grown = []
    original = SlotCache.ensure_capacity

    def spy(self, columns):
        if columns > self.mask.shape[-1]:
            grown.append(columns)
        return original(self, columns)

    monkeypatch.setattr(SlotCache, "ensure_capacity", spy)
    model = make_bench_tiny_model(tok, "qwen2", seed=5)
    engine_run(model, tok, PROMPTS, 4, SamplingParams(max_tokens=48, temperature=1.0, seed=2), 48, turns=6,
               max_batch_tokens=150)
    assert grown
