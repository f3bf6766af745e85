"""Scoring a step's trajectories: the reward functions get each sample's columns and what TRL
gives them besides the data (`trainer_state`, `log_metric(name, value)`, `log_extra(column,
values)`, the environments), and the trajectories come back with their rewards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpokit.data.prompts import PromptSet
from grpokit.trajectory import Rollout, Trajectories


class RewardContext:
    """What reward functions receive besides the data, as TRL gives it: `trainer_state` (the
    trainer's TrainerState, set by the trainer facade; None without one), `log_metric(name,
    value)` (a scalar, averaged over the step's calls, logged with the step) and
    `log_extra(column, values)` (a column of the completions table, one value per completion)."""

    def __init__(self):
        self.trainer_state = None
        self._metrics: dict[str, list[float]] = {}
        self._columns: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        self._metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values) -> None:
        self._columns.setdefault(str(column), []).extend(list(values))

    def extras(self) -> dict[str, Any]:
        return {"trainer_state": self.trainer_state, "log_metric": self.log_metric, "log_extra": self.log_extra}

    def take(self, n: int) -> tuple[dict[str, float], dict[str, list]]:
        """This step's logged metrics (means) and columns (padded with None to n values); cleared."""
        metrics = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        columns = {k: (v + [None] * n)[:n] for k, v in self._columns.items()}
        self._metrics, self._columns = {}, {}
        return metrics, columns


@dataclass
class Scorer:
    """Scores trajectories with the run's reward functions: each sample's row columns, the
    sampler's extra columns and environments, and TRL's extras (`context`) reach the functions;
    the step's logged metrics and columns ride with the result."""

    runner: Any                                   # grpokit.rewards.RewardRunner
    context: RewardContext = field(default_factory=RewardContext)

    def score(self, trajectories: Trajectories, prompts: PromptSet, group_size: int | None = None) -> Rollout:
        """The trajectories with their rewards (every function, the weighted total, statistics);
        `prompts`: the rows `trajectories.row_index` points into; `group_size`: samples per prompt
        (a group reward sees each prompt's together)."""
        cols = prompts.columns_of(trajectories.row_index)
        cols.update(trajectories.extra_columns or {})
        extras = self.context.extras()
        if trajectories.environments:
            extras["environments"] = trajectories.environments
        out = self.runner(trajectories.prompts, trajectories.completions,
                          completion_ids=trajectories.completion_ids, columns=cols, extras=extras,
                          group_size=group_size)
        metrics, columns = self.context.take(len(trajectories))
        return trajectories.scored(out.per_func, out.total, out.names, out.stats, metrics, columns)
