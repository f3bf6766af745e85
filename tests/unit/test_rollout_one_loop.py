"""HFEngine has one decode loop: single-turn sampling (`generate`) is multi-turn sampling
(`generate_multiturn`) whose driver never continues. Both give the same tokens and bit-identical
log-probs, and both equal a reference that samples each completion alone, re-encoding the whole
sequence for every token with the same counter-based uniforms (token t of sample s uses
uniforms[s, t]), so no row depends on the others in its batch, its wave or on when they finish."""

import pytest
import torch

from grpokit.envs import run_turns
from grpokit.rollout import HFEngine, SamplingParams
from grpokit.rollout.sampling import row_keys, row_uniforms, sample
from tests.helpers import make_char_tokenizer, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 40, 77, 60, 3, 9, 31], [60, 61], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [70, 71, 72, 4]]
END = set(range(20, 30))  # "end of turn" ids, about 10% of the vocabulary: completions end after a few tokens


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


def engine_for(tok, arch="qwen2", **kw):
    engine = HFEngine(make_tiny_model(tok, arch=arch, seed=3), tok, **kw)
    engine.eos_ids = set(END)
    return engine


class NeverContinues:
    """A multi-turn driver whose every conversation ends with its first turn."""

    def __init__(self, n_samples):
        self.turns = [None] * n_samples
        self.order = []

    def turn_ended(self, sample, token_ids, logprobs, finish_reason):
        self.turns[sample] = (list(token_ids), list(logprobs), finish_reason)
        self.order.append(sample)

    def continuations(self):
        return {}


PARAMS = {
    "sampled": SamplingParams(max_tokens=12, seed=3),
    "truncated": SamplingParams(max_tokens=12, seed=4, temperature=0.8, top_p=0.9, top_k=20),
    "repetition": SamplingParams(max_tokens=12, seed=5, repetition_penalty=1.3, min_p=0.05),
    "stop_strings": SamplingParams(max_tokens=16, seed=6, stop=["a", "th"]),
    "greedy": SamplingParams(max_tokens=12, temperature=0.0),
}


@pytest.mark.parametrize("waves", [None, 60], ids=["one_wave", "waves"])
@pytest.mark.parametrize("name", list(PARAMS))
def test_single_turn_is_multi_turn_whose_driver_never_continues(tok, name, waves):
    params = PARAMS[name]
    engine = engine_for(tok, max_batch_tokens=waves)
    state = set(vars(engine))
    single = engine.generate(PROMPTS, n=4, params=params)
    single_stats = dict(engine.stats)
    assert set(vars(engine)) == state, "a call leaves no per-call state on the engine"
    driver = NeverContinues(len(PROMPTS) * 4)
    engine.generate_multiturn(PROMPTS, 4, params, driver)
    assert [c.token_ids for c in single] == [t[0] for t in driver.turns]
    assert [c.logprobs for c in single] == [t[1] for t in driver.turns]  # bit-identical
    assert [c.finish_reason for c in single] == [t[2] for t in driver.turns]
    assert {k: v for k, v in single_stats.items() if not k.endswith("_s")} == \
        {k: v for k, v in engine.stats.items() if not k.endswith("_s")}
    assert len({len(c.token_ids) for c in single}) > 2, "rows should finish at different steps"
    if waves:
        assert engine.stats["waves"] >= 4


def reference(model, prompts, n, params, eos):
    """Each sample alone, the whole sequence re-encoded for every token, with its own uniforms."""
    samples = [p for p in prompts for _ in range(n)]
    uniforms = row_uniforms(row_keys(params.seed, torch.arange(len(samples))), params.max_tokens)
    out = []
    with torch.no_grad():
        for s, prompt in enumerate(samples):
            ids, logprobs = [], []
            while len(ids) < params.max_tokens:
                seq = prompt + ids
                logits = model(input_ids=torch.tensor([seq])).logits[:, -1, :].float()
                seen = torch.zeros_like(logits, dtype=torch.bool)
                seen[0, torch.tensor(seq)] = True
                token, lp = sample(logits, params, uniforms[s:s + 1, len(ids)], seen=seen)
                ids.append(int(token[0]))
                logprobs.append(float(lp[0]))
                if ids[-1] in eos:
                    break
            out.append((ids, logprobs))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("name", ["sampled", "truncated", "repetition"])
def test_sampled_completions_equal_sampling_each_alone(tok, arch, name):
    params = PARAMS[name]
    engine = engine_for(tok, arch=arch, max_batch_tokens=80)
    got = engine.generate(PROMPTS, n=3, params=params)
    want = reference(engine.model, PROMPTS, 3, params, END)
    assert [c.token_ids for c in got] == [ids for ids, _ in want]
    for c, (_, logprobs) in zip(got, want):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(logprobs), atol=2e-5, rtol=1e-4)


def test_a_stop_string_completed_by_the_last_token_of_the_budget_is_a_stop(tok):
    """The turn ends on its stop string, whichever path samples it: single-turn, multi-turn with
    KV kept across turns, or the whole conversation re-encoded (an engine without that capability)."""
    engine = engine_for(tok)
    engine.eos_ids = set()
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    text = engine.generate([PROMPTS[0]], n=1, params=greedy)[0].text
    stop = next(text[-k:] for k in range(1, len(text) + 1) if text.find(text[-k:]) == len(text) - k)
    params = SamplingParams(max_tokens=10, temperature=0.0, stop=[stop])
    single = engine.generate([PROMPTS[0]], n=1, params=params)[0]
    assert single.finish_reason == "stop" and len(single.token_ids) == 10 and single.text == text
    kv = NeverContinues(1)
    run_turns(engine, [PROMPTS[0]], 1, params, kv)

    class ReEncoding:  # declares no capabilities: run_turns gives it the whole conversation
        def generate(self, prompt_ids, n=1, params=None):
            return engine.generate(prompt_ids, n=n, params=params)

    again = NeverContinues(1)
    run_turns(ReEncoding(), [PROMPTS[0]], 1, params, again)
    assert kv.turns == again.turns == [(single.token_ids, single.logprobs, "stop")]
