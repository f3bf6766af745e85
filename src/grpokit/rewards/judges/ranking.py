"""Pure ranking arithmetic for judges: ranks from orders and scores (ties share their mean rank),
agreement between rankings (Kendall's tau-b, scipy), Swiss and all-pairs tournaments over a group,
and a Bradley-Terry fit of their outcomes (choix). No model, no I/O.

Conventions: candidates are 0..m-1; a rank is 1 for the best, m for the worst; an *outcome*
s(a, b) in [0, 1] is how much a beat b when a was shown first (1 win, 0 loss, 0.5 tie, or a
probability from a preference model).
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

__all__ = ["ranks_from_order", "ranks_from_scores", "kendall_tau", "mean_agreement", "rank_rewards",
           "swiss_rounds", "Tournament", "run_tournament", "play_tournament", "order_consistency", "bradley_terry"]


def ranks_from_order(order: Sequence[int], m: int) -> list[float]:
    """Candidate ids best first (a permutation of 0..m-1) -> each candidate's rank (1 = best).
    [2, 0, 1] -> [2.0, 3.0, 1.0]."""
    if sorted(order) != list(range(m)):
        raise ValueError(f"a ranking must list each of the {m} candidates once, got {list(order)}")
    ranks = [0.0] * m
    for position, cand in enumerate(order):
        ranks[cand] = float(position + 1)
    return ranks


def ranks_from_scores(scores: Sequence[float]) -> list[float]:
    """Scores (higher is better) -> ranks, ties sharing their mean rank.
    [0.2, 0.9, 0.9, 0.1] -> [3.0, 1.5, 1.5, 4.0]."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0.0] * len(scores)
    k = 0
    while k < len(order):
        j = k
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[k]]:
            j += 1
        for t in range(k, j + 1):
            ranks[order[t]] = (k + j) / 2 + 1
        k = j + 1
    return ranks


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b between two rank vectors (ties allowed): 1 same order, -1 reversed. Two
    vectors that are both constant agree (1.0); one constant against one that is not: 0.0."""
    from scipy.stats import kendalltau

    const_a, const_b = len(set(a)) <= 1, len(set(b)) <= 1
    if const_a or const_b:
        return 1.0 if const_a and const_b else 0.0
    return float(kendalltau(list(a), list(b)).statistic)


def mean_agreement(rank_vectors: Sequence[Sequence[float]]) -> float:
    """Mean Kendall tau over every pair of rank vectors (the same candidates ranked several
    times, e.g. once per shown order); NaN with fewer than two."""
    pairs = [(i, j) for i in range(len(rank_vectors)) for j in range(i + 1, len(rank_vectors))]
    if not pairs:
        return float("nan")
    return sum(kendall_tau(rank_vectors[i], rank_vectors[j]) for i, j in pairs) / len(pairs)


def rank_rewards(mean_ranks: Sequence[float]) -> list[float]:
    """Mean ranks -> rewards in [0, 1]: (m - rank) / (m - 1), the best 1, the worst 0;
    one candidate alone gets 0.5. [1, 2.5, 2.5, 4] -> [1, 0.5, 0.5, 0]."""
    m = len(mean_ranks)
    if m == 1:
        return [0.5]
    return [(m - r) / (m - 1) for r in mean_ranks]


def swiss_rounds(m: int) -> int:
    """Rounds of a Swiss tournament over m candidates: ceil(log2 m) (1 for m = 2)."""
    return max(1, math.ceil(math.log2(m))) if m > 1 else 0


@dataclass
class Tournament:
    """The comparisons a tournament made: (a, b, s(a, b)) with a shown first, in call order."""

    outcomes: list[tuple[int, int, float]]
    rounds: int
    failed: int = 0                        # comparisons that gave no outcome

    @property
    def comparisons(self) -> int:
        return len(self.outcomes)

    def points(self, m: int) -> list[float]:
        """Each candidate's total score over the comparisons it was in (a tie is half a point)."""
        pts = [0.0] * m
        for a, b, s in self.outcomes:
            pts[a] += s
            pts[b] += 1.0 - s
        return pts


def _swiss_pairs(points: list[float], played: set[frozenset], rng: random.Random) -> list[tuple[int, int]]:
    """Pair candidates with equal or near scores that have not met yet (greedy from the top; the
    last unpaired one sits the round out). Ties in score are broken at random."""
    m = len(points)
    shuffled = list(range(m))
    rng.shuffle(shuffled)
    waiting = sorted(shuffled, key=lambda i: -points[i])
    pairs = []
    while len(waiting) > 1:
        a = waiting.pop(0)
        partner = next((b for b in waiting if frozenset((a, b)) not in played), None)
        if partner is None:
            continue  # a has met everyone left: it sits out
        waiting.remove(partner)
        pairs.append((a, partner))
    return pairs


async def run_tournament(m: int, compare: Callable[[list[tuple[int, int]]], Awaitable[list[float | None]]],
                         strategy: str = "swiss", rng: random.Random | None = None,
                         rounds: int | None = None) -> Tournament:
    """Compare m candidates; every pair that meets is shown in both orders, (a, b) and (b, a).

    compare(pairs) -> one outcome per ordered pair, None where the comparison failed (it is left
    out); awaited once per round, so a judge runs the round's requests together.
    strategy "swiss": ceil(log2 m) rounds of floor(m/2) pairings by current points, no pair
    twice: at most 2 * floor(m/2) * ceil(log2 m) comparisons (G=8: 24, G=16: 64).
    strategy "all_pairs": every pair once, m (m - 1) comparisons (G=8: 56, G=16: 240).
    """
    rng = rng or random.Random(0)
    if strategy not in ("swiss", "all_pairs"):
        raise ValueError(f"tournament strategy {strategy!r}: use swiss or all_pairs.")
    played: set[frozenset] = set()
    result = Tournament([], rounds=0)
    planned = 1 if strategy == "all_pairs" else swiss_rounds(m) if rounds is None else rounds
    for _ in range(planned):
        if strategy == "all_pairs":
            pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
        else:
            pairs = _swiss_pairs(result.points(m), played, rng)
        if not pairs:
            break
        ordered = [p for a, b in pairs for p in ((a, b), (b, a))]
        outcomes = await compare(ordered)
        for (a, b), s in zip(ordered, outcomes):
            if s is None:
                result.failed += 1
            else:
                result.outcomes.append((a, b, float(s)))
        played.update(frozenset(p) for p in pairs)
        result.rounds += 1
    return result


def play_tournament(m: int, compare: Callable[[list[tuple[int, int]]], Sequence[float | None]],
                    strategy: str = "swiss", rng: random.Random | None = None,
                    rounds: int | None = None) -> Tournament:
    """`run_tournament` with a synchronous `compare` (a preference model in this process), from
    synchronous code, with no event loop (nothing is awaited but `compare`'s plain results)."""
    async def acompare(pairs: list[tuple[int, int]]) -> list[float | None]:
        return list(compare(pairs))

    coroutine = run_tournament(m, acompare, strategy, rng, rounds)
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("play_tournament: the comparison function must not await anything")


def order_consistency(outcomes: Sequence[tuple[int, int, float]]) -> float:
    """Agreement of a pairwise judge with itself across the two orders of each pair, on the
    Kendall scale: 1 when s(a, b) = 1 - s(b, a) for every pair, -1 when the order alone decides
    (s(a, b) = s(b, a) = 1); NaN when no pair has both orders."""
    seen = {(a, b): s for a, b, s in outcomes}
    gaps = [abs(s - (1.0 - seen[(b, a)])) for (a, b), s in seen.items() if a < b and (b, a) in seen]
    return 1.0 - 2.0 * sum(gaps) / len(gaps) if gaps else float("nan")


def bradley_terry(m: int, outcomes: Sequence[tuple[int, int, float]], alpha: float = 0.1) -> list[float]:
    """Bradley-Terry strengths theta (mean 0; P(i beats j) = sigmoid(theta_i - theta_j)) fitted to
    the outcomes by choix's maximum likelihood with an L2 penalty `alpha` (which keeps an unbeaten
    candidate finite). An outcome above 0.5 is a win of its first candidate, below 0.5 a win of
    the second, 0.5 a tie (one win each way). Worked: m=2, 0 beats 1 twice and loses once,
    alpha=0 -> theta = +-ln(2)/2 = +-0.3466 (P = 2/3)."""
    from grpokit.tracking import import_optional

    choix = import_optional("choix", "Bradley-Terry fits need choix", "judges")
    data = []
    for a, b, s in outcomes:
        if s > 0.5:
            data.append((a, b))
        elif s < 0.5:
            data.append((b, a))
        else:
            data += [(a, b), (b, a)]
    if m < 2 or not data:
        return [0.0] * m
    theta = choix.opt_pairwise(m, data, alpha=alpha)
    return [float(t) for t in theta - theta.mean()]
