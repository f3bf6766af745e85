"""The listwise judge (`judge`): one request shows the group's candidates to a judge model, which
ranks them (or scores each); the group is shown in k orders and the ranks averaged.

Position bias: the shown orders come in reversed pairs (a random order, then the same order
backwards, then another random order and its reverse, ...). A judge that only prefers a position
gives each candidate ranks p and m + 1 - p over a pair, so every mean rank is (m + 1) / 2 and
every reward equal (tested). The agreement between the orders' rankings (mean Kendall tau) is
logged per step; below `min_agreement` the group gets None (advantage 0), counted.

Rewards: the mean rank r of each distinct candidate (1 best, m worst, ties sharing their mean)
becomes (m - r) / (m - 1), from 1 (best) to 0 (worst); identical completions are judged once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from grpokit.rewards.judges.base import GroupJudge, Judgement
from grpokit.rewards.judges.parse import RANKING_SCHEMA, SCORES_SCHEMA, parse_ranking, parse_scores
from grpokit.rewards.judges.ranking import mean_agreement, rank_rewards, ranks_from_order, ranks_from_scores

__all__ = ["JudgeReward"]


class JudgeReward(GroupJudge):
    """A listwise judge as a group reward. Options besides the shared ones (`GroupJudge`):

    permutations: shown orders per group (k; default 2: one order and its reverse).
    output: "ranking" (the judge lists the candidates' numbers best first) or "scores" (a score
        per candidate; ranked, ties sharing their rank).
    template: the user message, with {prompt}, {candidates} (numbered [1]..[n]), {n}, {criteria},
        {schema} (the JSON the answer must be); system: the system message ("" for none).
    """

    default_system = ("You are an impartial judge. You compare candidate responses to the same request and judge "
                      "them only on their quality, not on their order or length.")
    default_template = ("Request:\n{prompt}\n\n{candidates}\n\nRank all {n} candidates from best to worst for "
                        "{criteria}. Answer with JSON only: {schema}")
    placeholders = ("prompt", "candidates", "n", "criteria", "schema")

    def __init__(self, model: Any = None, permutations: int = 2, output: str = "ranking", **options):
        if output not in ("ranking", "scores"):
            raise ValueError(f"judge: output={output!r}; use 'ranking' or 'scores'")
        if permutations < 1:
            raise ValueError(f"judge: permutations must be >= 1, got {permutations}")
        super().__init__(model=model, **options)
        self.__name__ = "judge"
        self.permutations, self.output = int(permutations), output

    def orders(self, m: int, rng) -> list[list[int]]:
        """k shown orders (position -> candidate id): random orders, each followed by its reverse."""
        out: list[list[int]] = []
        while len(out) < self.permutations:
            order = list(range(m))
            rng.shuffle(order)
            out.append(order)
            if len(out) < self.permutations:
                out.append(order[::-1])
        return out

    async def judge(self, prompt: Any, texts: list[str]) -> Judgement:
        m = len(texts)
        if m == 1:
            return Judgement(rewards=[0.5], ranks=[1.0], status="identical")
        verdict = Judgement(rewards=None, ranks=None)
        orders = self.orders(m, self.rng_for(prompt, texts))
        schema = RANKING_SCHEMA if self.output == "ranking" else SCORES_SCHEMA
        parse = parse_ranking if self.output == "ranking" else parse_scores
        requests = [self.messages(prompt=self.prompt_text(prompt), n=m, schema=schema,
                                  candidates="\n\n".join(f"[{p + 1}]\n{texts[c]}" for p, c in enumerate(order)))
                    for order in orders]
        parsers: list[Callable[[str], Any]] = [functools.partial(parse, n=m, lenient=self.lenient)] * len(requests)
        answers, errors = await self.ask(requests, parsers, verdict)
        if any(a is None for a in answers):  # the shown orders balance each other: all are needed
            failed = sum(a is None for a in answers)
            verdict.status = "failed"
            verdict.reason = f"{failed} of {len(answers)} shown orders got no usable answer; last: " + \
                next(e for a, e in zip(answers, errors) if a is None)
            return verdict
        vectors = []
        for order, answer in zip(orders, answers):
            shown = ranks_from_order(answer, m) if self.output == "ranking" else ranks_from_scores(answer)
            ranks = [0.0] * m
            for position, cand in enumerate(order):
                ranks[cand] = shown[position]
            vectors.append(ranks)
        verdict.ranks = [sum(v[c] for v in vectors) / len(vectors) for c in range(m)]
        verdict.agreement = mean_agreement(vectors)
        if self.min_agreement is not None and len(vectors) > 1 and verdict.agreement < self.min_agreement:
            verdict.status = "low_agreement"
            verdict.reason = f"agreement {verdict.agreement:.2f} < min_agreement {self.min_agreement:g}"
            return verdict
        verdict.rewards = rank_rewards(verdict.ranks)
        return verdict
