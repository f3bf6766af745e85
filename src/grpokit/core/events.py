"""The training events the loop and the algorithms announce, at the points where transformers'
`Trainer` fires its `TrainerCallback` events, and what a listener may ask for in return.

A step of the loop (one generated batch) reads, with its events:

    epoch_begin                      (the first step, and the first step after an epoch ended)
    step_begin
      sample, score, advantages
      per optimizer step: backward of each micro-batch -> substep_end (all but the last one)
                          clip -> pre_optimizer_step -> optimizer.step -> optimizer_step
    step_end -> Requests             (a listener may ask to log, evaluate or save now)
      when due or asked: log -> logged; evaluate -> evaluated; save a checkpoint -> saved
    after_step -> Requests           (a listener may end the epoch or stop training)
    epoch_end                        (when the step used the last rows of an epoch, and at the end)
    ...
    evaluation: prediction_step after each batch of eval prompts

`NoEvents` is the silent listener; the TRL-style trainers' `TrainerSurface` (grpokit.facade)
turns each event into its `TrainerCallback` call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Requests:
    """What listeners asked for at the end of a step (transformers' TrainerControl flags): at
    step_end to log, evaluate or save now; at after_step to end the epoch or stop training."""

    log: bool = False
    evaluate: bool = False
    save: bool = False
    end_epoch: bool = False
    stop: bool = False


class Events(Protocol):
    """A listener of the training events (see the module's docstring for their order)."""

    def train_begin(self, run: Any, state: Any) -> None: ...

    def epoch_begin(self, run: Any, state: Any) -> None: ...

    def step_begin(self, run: Any, state: Any) -> None: ...

    def substep_end(self) -> None: ...

    def pre_optimizer_step(self) -> None: ...

    def optimizer_step(self) -> None: ...

    def step_end(self, run: Any, state: Any, metrics: dict[str, float], out: Any) -> Requests:
        """`out`: the step's StepOutput (what was sampled and scored)."""
        ...

    def logged(self, run: Any, state: Any, logs: dict[str, float]) -> None: ...

    def evaluated(self, run: Any, state: Any, metrics: dict[str, float]) -> None: ...

    def saved(self, run: Any, state: Any) -> None: ...

    def after_step(self, run: Any, state: Any) -> Requests:
        """Whether to end the epoch or stop (asked at any event of the step)."""
        ...

    def prediction_step(self) -> None: ...

    def epoch_end(self, run: Any, state: Any) -> None: ...

    def train_end(self, run: Any, state: Any, final: dict[str, float]) -> None: ...


class NoEvents:
    """Nobody listens: every event does nothing and nothing is asked."""

    def train_begin(self, run: Any, state: Any) -> None:
        pass

    def epoch_begin(self, run: Any, state: Any) -> None:
        pass

    def step_begin(self, run: Any, state: Any) -> None:
        pass

    def substep_end(self) -> None:
        pass

    def pre_optimizer_step(self) -> None:
        pass

    def optimizer_step(self) -> None:
        pass

    def step_end(self, run: Any, state: Any, metrics: dict[str, float], out: Any) -> Requests:
        return Requests()

    def logged(self, run: Any, state: Any, logs: dict[str, float]) -> None:
        pass

    def evaluated(self, run: Any, state: Any, metrics: dict[str, float]) -> None:
        pass

    def saved(self, run: Any, state: Any) -> None:
        pass

    def after_step(self, run: Any, state: Any) -> Requests:
        return Requests()

    def prediction_step(self) -> None:
        pass

    def epoch_end(self, run: Any, state: Any) -> None:
        pass

    def train_end(self, run: Any, state: Any, final: dict[str, float]) -> None:
        pass


NO_EVENTS = NoEvents()
NOTHING_ASKED = Requests()
