"""The pairwise judge (`pairwise_judge`): a judge model compares two candidates at a time in a
tournament over the group, every pair in both orders, and a Bradley-Terry fit of the outcomes
(choix) gives each candidate's strength, its reward.

strategy "swiss" (default): ceil(log2 m) rounds pairing candidates with similar scores so far,
2 * floor(m/2) comparisons a round: O(G log G) (G=8: 24 requests, G=16: 64); "all_pairs":
m (m - 1) requests (G=8: 56, G=16: 240). A round's requests go out together.

Rewards: the Bradley-Terry strengths theta (mean 0 over the group; P(i beats j) =
sigmoid(theta_i - theta_j)), fitted with an L2 penalty `alpha` that keeps an unbeaten candidate
finite. Agreement: how far each pair's two orders agree (1: always, -1: the shown order alone
decided); below `min_agreement` the group gets None (advantage 0), counted.
"""

from __future__ import annotations

import functools
from typing import Any

from grpokit.rewards.judges.base import GroupJudge, Judgement
from grpokit.rewards.judges.parse import WINNER_SCHEMA, parse_winner
from grpokit.rewards.judges.ranking import bradley_terry, order_consistency, ranks_from_scores, run_tournament

__all__ = ["PairwiseJudgeReward"]


class PairwiseJudgeReward(GroupJudge):
    """A pairwise judge in a tournament, as a group reward. Options besides the shared ones
    (`GroupJudge`):

    strategy: "swiss" or "all_pairs"; rounds: Swiss rounds (default ceil(log2 G)).
    alpha: Bradley-Terry's L2 penalty.
    template: the user message, with {prompt}, {a}, {b}, {criteria}, {schema}.
    """

    default_system = ("You are an impartial judge. You compare two responses to the same request and judge them "
                      "only on their quality, not on their order or length.")
    default_template = ("Request:\n{prompt}\n\n[A]\n{a}\n\n[B]\n{b}\n\nWhich response is better for {criteria}? "
                        "Answer with JSON only: {schema}")
    placeholders = ("prompt", "a", "b", "criteria", "schema")

    def __init__(self, model: Any = None, strategy: str = "swiss", rounds: int | None = None, alpha: float = 0.1,
                 **options):
        if strategy not in ("swiss", "all_pairs"):
            raise ValueError(f"pairwise_judge: strategy={strategy!r}; use 'swiss' or 'all_pairs'")
        if alpha < 0:
            raise ValueError(f"pairwise_judge: alpha must be >= 0, got {alpha}")
        super().__init__(model=model, **options)
        self.__name__ = "pairwise_judge"
        self.strategy, self.rounds, self.alpha = strategy, rounds, float(alpha)

    async def judge(self, prompt: Any, texts: list[str]) -> Judgement:
        m = len(texts)
        if m == 1:
            return Judgement(rewards=[0.0], ranks=[1.0], status="identical")
        verdict = Judgement(rewards=None, ranks=None)
        prompt_text = self.prompt_text(prompt)
        parser = functools.partial(parse_winner, lenient=self.lenient)
        last_error: list[str] = []

        async def compare(pairs: list[tuple[int, int]]) -> list[float | None]:
            requests = [self.messages(prompt=prompt_text, a=texts[a], b=texts[b], schema=WINNER_SCHEMA)
                        for a, b in pairs]
            answers, errors = await self.ask(requests, [parser] * len(requests), verdict)
            last_error.extend(e for a, e in zip(answers, errors) if a is None)
            return answers

        played = await run_tournament(m, compare, self.strategy, self.rng_for(prompt, texts), self.rounds)
        if not played.outcomes:
            verdict.status = "failed"
            verdict.reason = f"no comparison of {played.failed} got a usable answer; last: " + \
                (last_error[-1] if last_error else "none made")
            return verdict
        theta = bradley_terry(m, played.outcomes, self.alpha)
        verdict.ranks = ranks_from_scores(theta)
        verdict.agreement = order_consistency(played.outcomes)
        if self.min_agreement is not None and verdict.agreement == verdict.agreement \
                and verdict.agreement < self.min_agreement:
            verdict.status = "low_agreement"
            verdict.reason = f"order consistency {verdict.agreement:.2f} < min_agreement {self.min_agreement:g}"
            return verdict
        verdict.rewards = theta
        return verdict
