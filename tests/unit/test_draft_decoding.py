"""Draft tokens in HFEngine's decode loop (grpokit.rollout.draft): a step feeds each row its last
token and guessed next tokens, keeps the guesses the sampler agrees with, and must give exactly the
samples of plain decoding (token t of sample s is drawn with uniforms[s, t] either way), whatever
the guesses: right, wrong, running into an end of turn or past the budget, with several turns and
waves. Plain decoding itself equals re-encoding (test_rollout_one_loop, test_multiturn_kv)."""

import pytest
import torch

from grpokit.rollout import HFEngine, SamplingParams
from grpokit.rollout.draft import NgramDrafter, accepted_drafts, draft_width
from tests.helpers import TURN_END as MT_END
from tests.helpers import TURN_PROMPTS as MT_PROMPTS
from tests.helpers import bench_models, make_bench_tiny_model, make_char_tokenizer, make_tiny_model
from tests.helpers import engine_turns as engine_run
from tests.helpers import reencoded_turns as reference

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 40, 77, 60, 3, 9, 31], [60, 61], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [70, 71, 72, 4]]
END = set(range(20, 30))


# ---------------------------------------------------------------------------- the pure parts

def test_accepted_drafts_worked_numbers():
    sampled = torch.tensor([[7, 8, 5, 1],    # drafts 7, 8, 9: 7 and 8 kept, the step yields 7, 8, 5
                            [7, 8, 9, 4],    # all three kept: yields 7, 8, 9 and the sampled 4
                            [3, 8, 9, 4],    # the first differs: none kept, yields 3
                            [7, 8, 9, 4]])   # only one draft (7): 1 kept although 8 matches the padding
    drafts = torch.tensor([[7, 8, 9], [7, 8, 9], [7, 8, 9], [7, 8, 0]])
    lengths = torch.tensor([3, 3, 3, 1])
    assert accepted_drafts(sampled, drafts, lengths).tolist() == [2, 3, 0, 1]
    assert accepted_drafts(sampled[:, :1], drafts[:, :0], torch.zeros(4, dtype=torch.long)).tolist() == [0] * 4


def test_draft_width_worked_numbers():
    three = torch.tensor([3, 3])
    # q = 0.8, cost 0.4: width 2 gains 0.8 - 0.4 = 0.4, width 3 1.44 - 0.8 = 0.64, width 4 1.952 - 1.2 = 0.752
    assert draft_width(three, torch.tensor([0.8, 0.8]), 0.4) == 4
    assert draft_width(three, torch.tensor([0.3, 0.3]), 0.4) == 1           # 0.3 - 0.4 < 0: no drafts
    # one row sure (q = 1), one hopeless (q = 0): per row 0.5 a column, against 0.4: the longest
    assert draft_width(three, torch.tensor([1.0, 0.0]), 0.4) == 4
    assert draft_width(three, torch.tensor([1.0, 0.0]), 0.6) == 1
    # a row without drafts gains nothing but shares the cost: 1 / 2 per column against 0.4
    assert draft_width(torch.tensor([2, 0]), torch.tensor([1.0, 1.0]), 0.4) == 3
    assert draft_width(torch.tensor([0, 0]), torch.tensor([1.0, 1.0]), 0.0) == 1


def test_ngram_drafter_own_context_then_pool():
    d = NgramDrafter(max_tokens=3, n_max=2)
    d.start([[1, 2, 3, 4, 1, 2], [9]])
    assert d.propose(0, 10) == [3, 4, 1]        # "1 2" occurred at 0: its continuation
    assert d.propose(0, 2) == [3, 4]            # never past the limit
    assert d.propose(0, 0) == []
    d.extend(0, [3, 9])                          # context ... 1 2 3 9: "3 9" is new, "9" too
    assert d.propose(0, 10) == []
    d.extend(0, [1, 2])                          # the most recent "1 2" is followed by 3 9
    assert d.propose(0, 10) == [3, 9, 1]
    assert d.propose(1, 5) == [1, 2]             # "9" in the wave's completions: row 0's ... 3 9 1 2
    d.extend(1, [5, 6, 7])
    d.finish()                                   # the pool: each row's completion (and the prompt's last token)
    d.start([[9, 5]])
    assert d.propose(0, 5) == [6, 7]             # from row 1 of the last wave
    d.start([[3, 9]])
    assert d.propose(0, 5) == [1, 2]             # row 0's completion (with its prompt's last token): 2 3 9 1 2


def test_ngram_drafter_checks_its_settings():
    with pytest.raises(ValueError, match="max_tokens"):
        NgramDrafter(max_tokens=0)
    with pytest.raises(ValueError, match="draft_tokens"):
        HFEngine(make_tiny_model(make_char_tokenizer(), seed=0), make_char_tokenizer(), draft_tokens=-1)


# ---------------------------------------------------------------------------- drafts change nothing

class OracleDrafter:
    """Guesses from known full sequences (prompt + completion): the first sequence that extends
    the row's context (so samples of one prompt get a sibling's tokens until they part), with the
    last guess altered at every third length of context: guesses right, wrong, and running over
    ends of turn and the budget."""

    def __init__(self, sequences, max_tokens=6, vocab=100):
        self.sequences, self.max_tokens, self.vocab = sequences, max_tokens, vocab
        self.proposed = 0

    def start(self, contexts):
        self.ctx = [list(c) for c in contexts]

    def extend(self, row, tokens):
        self.ctx[row].extend(tokens)

    def propose(self, row, limit):
        ctx = self.ctx[row]
        for seq in self.sequences:
            if len(seq) > len(ctx) and seq[:len(ctx)] == ctx:
                draft = list(seq[len(ctx):len(ctx) + min(limit, self.max_tokens) + 2])  # may run past the limit
                draft = draft[:max(0, min(limit, self.max_tokens))]
                if draft and len(ctx) % 3 == 0:
                    draft[-1] = (draft[-1] + 1) % self.vocab
                self.proposed += len(draft)
                return draft
        return []

    def finish(self):
        pass


def _single(engine, params, prompts=PROMPTS, n=3):
    out = engine.generate(prompts, n=n, params=params)
    return [c.token_ids for c in out], [c.logprobs for c in out], [c.finish_reason for c in out]


def assert_same_samples(got, want):
    """The same tokens and finish reasons; log-probs to float32 rounding (another summation order)."""
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=14, seed=3),
                                    SamplingParams(max_tokens=14, seed=4, temperature=0.8, top_p=0.9, top_k=20),
                                    SamplingParams(max_tokens=14, temperature=0.0)], ids=["sampled", "truncated", "greedy"])
@pytest.mark.parametrize("waves", [None, 60], ids=["one_wave", "waves"])
def test_single_turn_with_drafts_equals_plain_decoding(tok, params, waves):
    model = make_tiny_model(tok, arch="qwen2", seed=3)
    plain = HFEngine(model, tok, max_batch_tokens=waves)
    plain.eos_ids = set(END)
    ids, logps, reasons = _single(plain, params)
    assert any(r == "stop" for r in reasons) and any(r == "length" for r in reasons)
    sequences = [PROMPTS[j // 3] + t for j, t in enumerate(ids)]
    oracle = OracleDrafter(sequences)
    for drafter in (oracle, NgramDrafter(4, n_max=2)):
        engine = HFEngine(model, tok, max_batch_tokens=waves, drafter=drafter, draft_column_cost=0.0)
        engine.eos_ids = set(END)
        got_ids, got_logps, got_reasons = _single(engine, params)
        assert got_ids == ids and got_reasons == reasons
        for a, b in zip(got_logps, logps):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)
    # the oracle's guesses were mostly taken: far fewer decode forwards than tokens
    engine = HFEngine(model, tok, max_batch_tokens=waves, drafter=OracleDrafter(sequences), draft_column_cost=0.0)
    engine.eos_ids = set(END)
    _single(engine, params)
    assert engine.stats["draft_accepted"] > 0.5 * engine.stats["draft_tokens"] > 0
    assert engine.stats["steps"] < plain.stats["steps"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_multi_turn_with_drafts_equals_reencoding(temperature):
    """The tool results prefilled between turns are the drafter's context too; parked rows, their
    masked columns and the cache growth by draft columns keep every conversation exact."""
    tok = bench_models().build_tokenizer(256)
    model = make_bench_tiny_model(tok, "qwen2", seed=3)
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=11)
    ref = reference(model, MT_PROMPTS, 3, params, 40, turns=4)
    sequences = [MT_PROMPTS[s // 3] + ids for s, ids in enumerate(ref.ids)]
    for drafter in (OracleDrafter(sequences, vocab=256), NgramDrafter(5)):
        got, engine = engine_run(model, tok, MT_PROMPTS, 3, params, 40, turns=4, drafter=drafter,
                                 draft_column_cost=0.0)
        assert got.model_tokens == ref.model_tokens and got.ids == ref.ids
        for a, b in zip(got.logps, ref.logps):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)
    got, engine = engine_run(model, tok, MT_PROMPTS, 3, params, 40, turns=4, max_batch_tokens=150,
                             drafter=OracleDrafter(sequences, vocab=256), draft_column_cost=0.0)
    assert engine.stats["waves"] >= 2 and engine.stats["draft_accepted"] > 0
    assert got.model_tokens == ref.model_tokens
    assert set(MT_END) & {t for turn in got.model_tokens for tokens in turn for t in tokens}


def test_no_drafts_with_stop_strings_or_repetition_penalty(tok):
    """Both are decided token by token on the row so far: those calls decode one token per step."""
    model = make_tiny_model(tok, arch="qwen2", seed=3)
    for params in (SamplingParams(max_tokens=16, seed=6, stop=["a", "th"]),
                   SamplingParams(max_tokens=12, seed=5, repetition_penalty=1.3)):
        plain = HFEngine(model, tok)
        plain.eos_ids = set(END)
        drafter = OracleDrafter([])
        engine = HFEngine(model, tok, drafter=drafter)
        engine.eos_ids = set(END)
        assert_same_samples(_single(engine, params), _single(plain, params))
        assert engine.stats["draft_tokens"] == 0 and engine.stats["steps"] == plain.stats["steps"]


class WrongDrafter(OracleDrafter):
    """Always guesses a token no row samples."""

    def propose(self, row, limit):
        return [99] * max(0, min(limit, self.max_tokens))


def test_drafts_that_fail_stop_being_tried(tok):
    """Each row starts at even odds that a draft token is kept; a miss lowers them and a step drafts
    only where the expected gain beats a column's cost (`draft_width`): a drafter that is always
    wrong costs one draft token per row, and no extra step."""
    model = make_tiny_model(tok, arch="qwen2", seed=3)
    params = SamplingParams(max_tokens=14, seed=3)
    plain = HFEngine(model, tok)
    plain.eos_ids = set(END)
    want = _single(plain, params)
    engine = HFEngine(model, tok, drafter=WrongDrafter([]))
    engine.eos_ids = set(END)
    for _ in range(2):
        assert_same_samples(_single(engine, params), want)
        assert engine.stats["draft_accepted"] == 0 and 0 < engine.stats["draft_tokens"] <= len(PROMPTS) * 3
        assert engine.stats["steps"] == plain.stats["steps"]


def test_ngram_drafter_state_round_trip():
    """Its memory of the last wave (the pool) is plain lists: saved and loaded, it drafts the same."""
    d = NgramDrafter(max_tokens=3, n_max=2)
    d.start([[1, 2], [9]])
    d.extend(0, [3, 4, 5])
    d.extend(1, [5, 6, 7])
    d.finish()
    state = d.state_dict()
    assert state == {"pool": [[2, 3, 4, 5], [9, 5, 6, 7]]}
    e = NgramDrafter(max_tokens=3, n_max=2)
    e.load_state_dict(state)
    for drafter in (d, e):
        drafter.start([[8, 5]])
        assert drafter.propose(0, 5) == [6, 7]       # row 1's "5 6 7" (row 0's 5 ends its sequence: nothing follows)
    engine = HFEngine(make_tiny_model(make_char_tokenizer(), seed=0), make_char_tokenizer(), draft_tokens=2)
    assert engine.capabilities.keeps_state and engine.state_dict() == {"drafter": {"pool": []}}
    assert not HFEngine(engine.model, engine.tokenizer).capabilities.keeps_state


def test_ngram_drafter_pool_is_bounded(monkeypatch):
    import grpokit.rollout.draft as draft

    monkeypatch.setattr(draft, "POOL_TOKENS", 5)
    d = NgramDrafter(max_tokens=3, n_max=2)
    d.start([[1], [2], [3]])
    for row in range(3):
        d.extend(row, [10 + row, 20 + row, 30 + row])
    d.finish()  # rows in order until 5 tokens: the first two rows' 4 tokens each
    assert d.state_dict() == {"pool": [[1, 10, 20, 30], [2, 11, 21, 31]]}
