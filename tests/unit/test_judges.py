"""Judges (rewards/judges): the ranking arithmetic worked by hand, the listwise and pairwise judges
with rule judges written here as Python functions (what a judge model answers is all a judge
sees), their faults, the cache and the reliability gate. The same judges against a real
OpenAI-compatible server: tests/integration/test_judge_server.py."""

import asyncio
import json
import math
import re
import time

import pytest

from grpokit.rewards import RewardRunner, load_reward_funcs
from grpokit.rewards.judges import FunctionBackend, JudgeFailed, JudgeReward, PairwiseJudgeReward
from grpokit.rewards.judges.parse import BadAnswer, parse_ranking, parse_scores, parse_winner
from grpokit.rewards.judges.ranking import (bradley_terry, kendall_tau, mean_agreement, order_consistency,
                                            play_tournament, rank_rewards, ranks_from_order, ranks_from_scores)


# ---------- rule judges: they read the request as a judge model would ----------
def shown_candidates(messages):
    """The candidates of a listwise request, in the order shown."""
    user = messages[-1]["content"]
    return [t.strip() for t in re.findall(r"\[\d+\]\n(.*?)(?=\n\n\[\d+\]\n|\n\nRank all)", user, flags=re.S)]


def shown_pair(messages):
    user = messages[-1]["content"]
    a = re.search(r"\[A\]\n(.*?)\n\n\[B\]", user, flags=re.S).group(1)
    b = re.search(r"\[B\]\n(.*?)\n\nWhich", user, flags=re.S).group(1)
    return a, b


def longest_first(messages):
    """A fair listwise judge: the longer the better (ties keep the shown order)."""
    cands = shown_candidates(messages)
    order = sorted(range(len(cands)), key=lambda i: -len(cands[i]))
    return json.dumps({"ranking": [i + 1 for i in order]})


def first_shown_best(messages):
    """A judge with nothing but position bias: the shown order is its ranking."""
    return json.dumps({"ranking": list(range(1, len(shown_candidates(messages)) + 1))})


def longer_wins(messages):
    a, b = shown_pair(messages)
    return json.dumps({"winner": "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"})


def judge(fn, **kw):
    return JudgeReward(backend=FunctionBackend(fn), **kw)


def call(reward, completions, prompt="Say something."):
    metrics = {}
    out = asyncio.run(reward([prompt] * len(completions), completions,
                             log_metric=lambda k, v: metrics.setdefault(k, []).append(v)))
    return out, {k: v[0] if len(v) == 1 else v for k, v in metrics.items()}


# ---------- ranking arithmetic ----------
def test_ranks_worked_by_hand():
    assert ranks_from_order([2, 0, 1], 3) == [2.0, 3.0, 1.0]
    assert ranks_from_scores([0.2, 0.9, 0.9, 0.1]) == [3.0, 1.5, 1.5, 4.0]  # ties share (1 + 2) / 2
    assert rank_rewards([1, 2.5, 2.5, 4]) == [1.0, 0.5, 0.5, 0.0]           # (4 - r) / 3
    assert rank_rewards([1.0]) == [0.5]
    with pytest.raises(ValueError, match="each of the 3 candidates once"):
        ranks_from_order([0, 0, 1], 3)


def test_kendall_tau_worked_by_hand():
    # [1,2,3] vs [1,3,2]: pairs (1,2) and (1,3) concordant, (2,3) discordant -> (2 - 1) / 3
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([2, 2], [2, 2]) == 1.0 and kendall_tau([1, 2], [1.5, 1.5]) == 0.0
    assert mean_agreement([[1, 2, 3], [1, 2, 3], [3, 2, 1]]) == pytest.approx((1 - 1 - 1) / 3)
    assert math.isnan(mean_agreement([[1, 2]]))


def test_bradley_terry_against_hand_computed_values():
    # two candidates, 0 beats 1 twice and loses once: P = 2/3 = sigmoid(t0 - t1), so t0 - t1 = ln 2,
    # centred: +-ln(2)/2
    theta = bradley_terry(2, [(0, 1, 1.0), (1, 0, 0.0), (1, 0, 1.0)], alpha=0.0)
    assert theta == pytest.approx([math.log(2) / 2, -math.log(2) / 2], abs=1e-4)
    # a cycle (0>1, 1>2, 2>0): every strength equal
    assert bradley_terry(3, [(0, 1, 1.0), (1, 2, 1.0), (2, 0, 1.0)], alpha=0.0) == pytest.approx([0, 0, 0], abs=1e-6)
    # a tie counts a win each way: same fit as one win each
    assert bradley_terry(2, [(0, 1, 0.5)], alpha=0.0) == pytest.approx([0.0, 0.0], abs=1e-6)
    # the maximum-likelihood condition on 4 candidates: wins_i = sum_j n_ij sigmoid(t_i - t_j)
    games = [(0, 1, 1), (1, 0, 1), (0, 2, 1), (2, 0, 0), (1, 2, 1), (2, 3, 1), (3, 2, 1), (3, 1, 0), (0, 3, 1),
             (3, 0, 1)]
    theta = bradley_terry(4, games, alpha=0.0)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(4):
        wins = sum((s if a == i else 1 - s) for a, b, s in games if i in (a, b))
        expected = sum(sig(theta[i] - theta[b if a == i else a]) for a, b, _ in games if i in (a, b))
        assert wins == pytest.approx(expected, abs=1e-3)
    assert sum(theta) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("m,swiss,all_pairs", [(2, 2, 2), (4, 8, 12), (8, 24, 56), (16, 64, 240)])
def test_tournament_comparison_counts(m, swiss, all_pairs):
    seen = []

    def compare(pairs):
        seen.extend(pairs)
        return [1.0 if a < b else 0.0 for a, b in pairs]  # lower id is better

    played = play_tournament(m, compare, "swiss")
    assert played.comparisons == swiss == 2 * (m // 2) * math.ceil(math.log2(m))
    unordered = [frozenset(p) for p in seen]
    assert all(unordered.count(u) == 2 for u in unordered)      # each pair met once, in both orders
    assert {(a, b) for a, b in seen} == {(b, a) for a, b in seen}
    assert play_tournament(m, compare, "all_pairs").comparisons == all_pairs == m * (m - 1)
    theta = bradley_terry(m, played.outcomes)
    assert theta.index(max(theta)) == 0  # the Swiss winner is the best candidate


def test_order_consistency():
    assert order_consistency([(0, 1, 1.0), (1, 0, 0.0)]) == 1.0      # the same verdict both ways
    assert order_consistency([(0, 1, 1.0), (1, 0, 1.0)]) == -1.0     # whoever is shown first wins
    assert order_consistency([(0, 1, 0.5), (1, 0, 0.5)]) == 1.0
    assert math.isnan(order_consistency([(0, 1, 1.0)]))


def test_parsing_answers():
    assert parse_ranking('{"ranking": [2, 1, 3]}', 3) == [1, 0, 2]
    assert parse_ranking('```json\n{"ranking": [3, 1, 2]}\n```', 3) == [2, 0, 1]
    assert parse_ranking("Best is [2], then [1], then [3].", 3) == [1, 0, 2]   # lenient plain text
    with pytest.raises(BadAnswer, match="no JSON"):
        parse_ranking("[2] > [1] > [3]", 3, lenient=False)
    with pytest.raises(BadAnswer, match="each of the numbers 1..3 once"):
        parse_ranking('{"ranking": [1, 2]}', 3)                               # wrong size
    with pytest.raises(BadAnswer, match="schema"):
        parse_ranking('{"ranking": "first"}', 2)
    assert parse_scores('{"scores": [7, 3.5]}', 2) == [7.0, 3.5]
    with pytest.raises(BadAnswer, match="expected 3 finite scores"):
        parse_scores('{"scores": [1, 2]}', 3)
    assert [parse_winner(t) for t in ('{"winner": "A"}', '{"winner": "b"}', "tie", "B is better")] == [1, 0, .5, 0]
    with pytest.raises(BadAnswer):
        parse_winner("A or B, hard to say")


# ---------- the listwise judge ----------
def test_a_fair_judge_ranks_the_group():
    reward = judge(longest_first)
    comps = ["ok", "a longer answer here", "mid length", "the longest answer of them all"]
    out, m = call(reward, comps)
    assert out == [0.0, pytest.approx(2 / 3), pytest.approx(1 / 3), 1.0]   # (m - rank) / (m - 1), rank by length
    assert m["judge/agreement"] == 1.0 and m["judge/calls"] == 2 and m["judge/frac_failed"] == 0.0


def test_position_bias_cancels_over_reversed_orders():
    """A judge that always prefers the first shown candidate gives every candidate the same mean
    rank over an order and its reverse: equal rewards (advantage 0), and an agreement of -1."""
    comps = ["alpha", "beta", "gamma", "delta", "epsilon"]
    out, m = call(judge(first_shown_best, min_agreement=None), comps)
    assert out == [pytest.approx(0.5)] * 5 and m["judge/agreement"] == pytest.approx(-1.0)
    out, m = call(judge(first_shown_best, min_agreement=None, permutations=4), comps)  # two reversed pairs
    assert out == [pytest.approx(0.5)] * 5 and m["judge/agreement"] < 0
    out, m = call(judge(first_shown_best), comps)        # default min_agreement=0: the group is dropped
    assert out == [None] * 5 and m["judge/frac_low_agreement"] == 1.0
    # one shown order only: the bias is not controlled, and the ranking is whatever order was drawn
    out, _ = call(judge(first_shown_best, permutations=1), comps)
    assert sorted(out) == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_shown_orders_are_reproducible_and_differ_between_groups():
    seen = []

    def record(messages):
        seen.append(tuple(shown_candidates(messages)))
        return longest_first(messages)

    comps = [f"answer {'x' * i}" for i in range(6)]
    call(judge(record, seed=3, cache_size=0), comps)
    call(judge(record, seed=3, cache_size=0), comps)
    assert seen[0] == seen[2] and seen[1] == seen[3] and seen[1] == seen[0][::-1]
    call(judge(record, seed=4, cache_size=0), comps)
    assert seen[4] != seen[0]


def test_identical_completions_are_judged_once():
    requests = []

    def record(messages):
        requests.append(shown_candidates(messages))
        return longest_first(messages)

    out, _ = call(judge(record), ["same", "longer one", "same", "x"])
    assert all(len(r) == 3 for r in requests)                # three distinct candidates shown
    assert out[0] == out[2] == 0.5 and out[1] == 1.0 and out[3] == 0.0
    requests.clear()
    out, m = call(judge(record), ["same"] * 4)
    assert out == [0.5] * 4 and requests == [] and m["judge/frac_identical"] == 1.0


def test_scores_output_with_ties():
    def scorer(messages):
        return json.dumps({"scores": [min(len(c), 5) for c in shown_candidates(messages)]})

    out, _ = call(judge(scorer, output="scores"), ["abcdefgh", "abcdef", "ab"])
    assert out == [0.75, 0.75, 0.0]   # the two long ones share rank 1.5: (3 - 1.5) / 2


def test_malformed_answers_are_retried_then_counted():
    answers = iter(["I like the second one.", "{\"ranking\": [1]}"])   # unreadable, then the wrong size

    def flaky(messages):
        return next(answers, None) or longest_first(messages)

    out, m = call(judge(flaky, permutations=1, max_retries=2), ["a", "bbb"])
    assert out == [0.0, 1.0] and m["judge/retries"] == 2 and m["judge/calls"] == 3
    out, m = call(judge(lambda msgs: "no idea", max_retries=1), ["a", "bbb"])
    assert out == [None, None] and m["judge/frac_failed"] == 1.0 and m["judge/calls"] == 4


def test_failure_policy_raise_stops_with_the_reason():
    reward = judge(lambda msgs: "no idea", max_retries=0, on_failure="raise")
    with pytest.raises(JudgeFailed, match="could not be judged: 2 of 2 shown orders got no usable answer.*"
                                          "on_failure='skip'"):
        call(reward, ["a", "bbb"])


def test_a_server_that_is_down_or_slow_fails_within_the_deadline():
    def down(messages):
        raise ConnectionError("connection refused")

    out, m = call(judge(down, max_retries=3), ["a", "bbb"])
    assert out == [None, None] and m["judge/calls"] == 8 and m["judge/frac_failed"] == 1.0

    async def slow(messages):
        await asyncio.sleep(5)
        return longest_first(messages)

    t0 = time.perf_counter()
    out, m = call(judge(slow, deadline_s=0.3), ["a", "bbb"])
    assert out == [None, None] and time.perf_counter() - t0 < 2.0


def test_the_cache_answers_a_group_seen_before():
    calls = []

    def count(messages):
        calls.append(1)
        return longest_first(messages)

    reward = judge(count)
    first, _ = call(reward, ["a", "bbb", "cc"])
    again, m = call(reward, ["a", "bbb", "cc"])
    assert first == again and len(calls) == 2 and m["judge/cache_hits"] == 2 and m["judge/calls"] == 0


def test_templates_are_checked_and_used():
    with pytest.raises(ValueError, match="the template uses \\['answer'\\]"):
        judge(longest_first, template="{prompt} {answer}")
    seen = []
    reward = judge(lambda msgs: seen.append(msgs) or '{"ranking": [1, 2]}', permutations=1, system="",
                   template="Q: {prompt}\n{candidates}\nRank {n} by {criteria}. {schema}", criteria="politeness")
    call(reward, ["a", "b"], prompt=[{"role": "user", "content": "Hi there"}])
    (msgs,) = seen
    assert len(msgs) == 1 and msgs[0]["content"].startswith("Q: Hi there\n[") and "by politeness" in msgs[0]["content"]


def test_through_the_runner_groups_and_metrics():
    """By registry name, in the RewardRunner beside a TRL-style function: each group judged alone."""
    groups_seen = []

    def record(messages):
        groups_seen.append(sorted(shown_candidates(messages)))
        return longest_first(messages)

    funcs = load_reward_funcs(["judge", lambda completions, **kw: [1.0] * len(completions)],
                              reward_kwargs={"judge": {"backend": record}})
    runner = RewardRunner(funcs, group_size=3)
    comps = ["a", "bb", "ccc", "dddd", "e", "ff"]
    out = runner(["p1"] * 3 + ["p2"] * 3, comps)
    assert out.per_func[:, 0].tolist() == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]
    assert sorted(map(tuple, groups_seen)) == sorted([("a", "bb", "ccc")] * 2 + [("dddd", "e", "ff")] * 2)


# ---------- the pairwise judge ----------
def test_pairwise_swiss_ranks_by_bradley_terry():
    requests = []

    def record(messages):
        requests.append(1)
        return longer_wins(messages)

    comps = ["x" * n for n in (3, 7, 1, 5, 2, 8, 4, 6)]
    out, m = call(PairwiseJudgeReward(backend=FunctionBackend(record)), comps)
    assert len(requests) == 24 == m["pairwise_judge/calls"]       # 3 rounds x 4 pairs x 2 orders
    assert out.index(max(out)) == 5 and out.index(min(out)) == 2   # the longest on top, the shortest last
    assert sum(out) == pytest.approx(0.0, abs=1e-9) and m["pairwise_judge/agreement"] == 1.0
    requests.clear()
    out_all, _ = call(PairwiseJudgeReward(backend=FunctionBackend(record), strategy="all_pairs"), comps)
    assert len(requests) == 56
    assert sorted(range(8), key=out_all.__getitem__) == sorted(range(8), key=lambda i: len(comps[i]))


def test_pairwise_position_bias_gives_equal_rewards_or_is_dropped():
    always_a = FunctionBackend(lambda msgs: '{"winner": "A"}')
    out, m = call(PairwiseJudgeReward(backend=always_a, min_agreement=None), ["a", "bb", "ccc", "dddd"])
    assert out == [pytest.approx(0.0, abs=1e-6)] * 4 and m["pairwise_judge/agreement"] == -1.0
    out, m = call(PairwiseJudgeReward(backend=always_a), ["a", "bb", "ccc", "dddd"])
    assert out == [None] * 4 and m["pairwise_judge/frac_low_agreement"] == 1.0


# ---------- the reliability gate ----------
CALIBRATION = [{"prompt": "q1", "candidates": ["a", "abc", "ab"], "ranking": [1, 2, 0]},
               {"prompt": "q2", "candidates": ["longest one", "short", "mid size"], "ranking": [0, 2, 1]}]


def test_the_gate_passes_a_reliable_judge_and_prints_figures(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in CALIBRATION))
    (line,) = judge(longest_first, calibration=str(path)).preflight()
    assert "2 groups, Kendall tau with the known orders: mean 1.00" in line
    funcs = load_reward_funcs(["judge"], reward_kwargs={"judge": {"backend": longest_first,
                                                                  "calibration": CALIBRATION}})
    assert RewardRunner(funcs, group_size=2).preflight() == [line.replace(str(path), "")]


def test_the_gate_refuses_an_unreliable_judge():
    def backwards(messages):
        return json.dumps({"ranking": json.loads(longest_first(messages))["ranking"][::-1]})

    with pytest.raises(ValueError, match="mean -1.00.*below min_calibration_tau=0.3"):
        judge(backwards, calibration=CALIBRATION).preflight()
    # no known orders: the judge against itself; position bias alone is caught
    unlabelled = [{k: v for k, v in x.items() if k != "ranking"} for x in CALIBRATION]
    with pytest.raises(ValueError, match="its own other shown orders: mean -1.00"):
        judge(first_shown_best, calibration=unlabelled).preflight()
    with pytest.raises(ValueError, match="is not a file"):
        judge(longest_first, calibration="missing.jsonl").preflight()


# ---------- backends and packages ----------
def test_a_local_model_judges_in_this_process(tmp_path):
    """LocalBackend: a causal LM with a chat template, greedy, batched; by path (JudgeReward(model=...))
    or loaded. Its answers equal generate's one request at a time (left padding changes nothing)."""
    import torch

    from grpokit.models import save_model
    from grpokit.rewards.judges import LocalBackend
    from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

    tok = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    model = make_tiny_model(tok, arch="llama", num_kv_heads=4, max_positions=1024)
    save_model(model, tok, tmp_path / "judge")
    backend = LocalBackend(str(tmp_path / "judge"), device="cpu", max_new_tokens=6, batch_size=2)
    requests = [[{"role": "user", "content": "rank: a b"}], [{"role": "user", "content": "which is better, x or yy?"}],
                [{"role": "user", "content": "hi"}]]
    batched = asyncio.run(backend.complete_many(requests))
    alone = [backend.generate([r])[0] for r in requests]
    assert batched == alone and all(isinstance(a, str) for a in batched)
    reward = JudgeReward(model=str(tmp_path / "judge"), device="cpu", max_new_tokens=6, max_retries=0)
    assert reward.backend.name.startswith("local:") and isinstance(reward.backend, LocalBackend)
    out, m = call(reward, ["a", "bb"])  # a random model's answers: unreadable, counted
    assert out == [None, None] and m["judge/frac_failed"] == 1.0 and m["judge/calls"] == 2
    tok.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        LocalBackend(model, tokenizer=tok)
    assert torch.is_grad_enabled()


def test_a_missing_package_is_one_line_naming_the_extra(monkeypatch):
    import sys

    from grpokit.tracking import MissingPackageError

    for name in ("choix", "openai"):  # None in sys.modules: any import of it raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingPackageError, match=r"^Bradley-Terry fits need choix: pip install 'grpokit\[judges\]'$"):
        bradley_terry(2, [(0, 1, 1.0)])
    with pytest.raises(MissingPackageError, match=r"needs openai: pip install 'grpokit\[judges\]'"):
        JudgeReward(base_url="http://127.0.0.1:1/v1", model="m")
