"""transformers' Trainer surface over the one loop: `trainer.state` (a `TrainerState`, with
`global_step` and `log_history`), `TrainerCallback`s with a `TrainerControl`, and `train()`
returning a `TrainOutput`, as TRL's trainers do. The loop and the algorithms announce the training
events (core.events); this turns each into its callback event, with transformers' arguments (model,
processing_class, optimizer, lr_scheduler, ...), and hands back what the callbacks asked through
the control: `should_log`, `should_evaluate`, `should_save` (done at that step),
`should_epoch_stop` (the next step starts a new epoch) and `should_training_stop`."""

from __future__ import annotations

import logging
from typing import Any

from grpokit.core.events import Requests


class TrainerSurface:
    """The `state`, the callbacks and their events for one trainer (GRPO, PPO or DPO)."""

    def __init__(self, parts, callbacks=None):
        from transformers import TrainerControl, TrainerState
        from transformers.trainer_callback import CallbackHandler

        self.parts = parts
        self.state = TrainerState()
        self.control = TrainerControl()
        quiet = logging.getLogger("transformers.trainer_callback")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "no DefaultFlowCallback": the loop decides when to log, eval, save
        try:
            self.handler = CallbackHandler([], parts.model, parts.tokenizer, parts.optimizer, parts.scheduler)
        finally:
            quiet.setLevel(level)
        for callback in callbacks or []:
            self.handler.add_callback(callback)
        self._pending: dict[str, list[float]] = {}  # the steps' metrics since the last logged entry
        parts.reward_context.trainer_state = self.state  # reward functions see it, as in TRL

    def add_callback(self, callback) -> None:
        self.handler.add_callback(callback)

    def _event(self, name: str, **kwargs: Any) -> None:
        self.control = getattr(self.handler, name)(self.parts.config, self.state, self.control, **kwargs)

    def _sync(self, state) -> None:
        self.state.global_step = state.global_step
        self.state.epoch = state.epoch + state.cursor / max(1, self.parts.num_train_rows)

    def init_end(self) -> None:
        """The end of the trainer's construction (transformers' on_init_end)."""
        self._event("on_init_end")

    # ---- the training events (core.events.Events) ----
    def train_begin(self, run, state) -> None:
        cfg = run.config
        self.state.max_steps = run.total_steps
        self.state.num_train_epochs = cfg.num_train_epochs
        self.state.logging_steps, self.state.save_steps = cfg.logging_steps, cfg.save_steps
        self.state.eval_steps = cfg.eval_steps or cfg.logging_steps
        self.state.train_batch_size = cfg.per_device_train_batch_size
        self.state.is_world_process_zero = self.state.is_local_process_zero = run.rank == 0
        self._sync(state)
        self._event("on_train_begin")

    def epoch_begin(self, run, state) -> None:
        self._sync(state)
        self._event("on_epoch_begin")

    def step_begin(self, run, state) -> None:
        self._sync(state)
        self._event("on_step_begin")  # the handler clears should_log / should_evaluate / should_save

    def substep_end(self) -> None:
        self._event("on_substep_end")

    def pre_optimizer_step(self) -> None:
        self._event("on_pre_optimizer_step")

    def optimizer_step(self) -> None:
        self._event("on_optimizer_step")

    def step_end(self, run, state, metrics: dict[str, float]) -> Requests:
        self._sync(state)
        self._event("on_step_end")
        for k, v in metrics.items():
            if not k.startswith("eval") and isinstance(v, (int, float)):
                self._pending.setdefault(k, []).append(float(v))
        c = self.control
        return Requests(log=bool(c.should_log), evaluate=bool(c.should_evaluate), save=bool(c.should_save))

    def logged(self, run, state, logs: dict[str, float]) -> None:
        logs = {k: v for k, v in logs.items() if not k.startswith("eval")}
        self.state.log_history.append({**logs, "step": state.global_step})
        self._pending = {}
        self._event("on_log", logs=logs)

    def evaluated(self, run, state, metrics: dict[str, float]) -> None:
        self.state.log_history.append({**metrics, "step": state.global_step})
        self._event("on_evaluate", metrics=dict(metrics))

    def saved(self, run, state) -> None:
        self._event("on_save")

    def after_step(self, run, state) -> Requests:
        return Requests(end_epoch=bool(self.control.should_epoch_stop), stop=bool(self.control.should_training_stop))

    def prediction_step(self) -> None:
        self._event("on_prediction_step")

    def epoch_end(self, run, state) -> None:
        self._sync(state)
        self._event("on_epoch_end")

    def train_end(self, run, state, final: dict[str, float]) -> None:
        self._sync(state)
        closing = {k: final[k] for k in ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                                         "train_loss") if k in final}
        # as TRL's log(): the closing entry carries the means of the steps since the last logged one
        since = {k: sum(v) / len(v) for k, v in self._pending.items()}
        self._pending = {}
        self.state.log_history.append({**since, **closing, "epoch": self.state.epoch, "step": state.global_step})
        self._event("on_train_end")

    def output(self, final: dict[str, float]):
        """`train()`'s return value: transformers' TrainOutput(global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        return TrainOutput(self.state.global_step, float(final.get("train_loss", final.get("loss", 0.0))), final)
