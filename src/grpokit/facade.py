"""TRL's trainer surface over a run (the adapter at the edge; the core does not know it):
`RunFacade`, shared by GRPOTrainer, PPOTrainer and DPOTrainer (`model`, `processing_class`,
`state`, callbacks, `evaluate()`, `_logs`, TRL's sampling through a replaced `model.generate`),
and `TrainerSurface`, which turns the training events (core.events) into transformers'
`TrainerCallback` calls with a `TrainerControl`: every event with transformers' arguments (model,
processing_class, optimizer, lr_scheduler, ...), and what the callbacks ask through the control:
`should_log`, `should_evaluate`, `should_save` (done at that step), `should_epoch_stop` (the next
step starts a new epoch) and `should_training_stop`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from grpokit.core.events import Requests
from grpokit.core.forward import score_with_training_forward
from grpokit.core.run import RunParts
from grpokit.rollout import capabilities_of, make_engine
from grpokit.samplers import MultiTurnSampler, SingleTurnSampler
from grpokit.trajectory import Rollout


class RunFacade:
    """What the TRL-style trainer classes share over their `RunParts` (`self.parts`): the model,
    the processing class, and transformers' Trainer surface (`state`, callbacks, `evaluate()`)."""

    parts: RunParts
    surface: "TrainerSurface"

    def _init_surface(self, callbacks, eval_dataset) -> None:
        # how build_run samples; train() derives from it what it runs (see _start_training)
        self._as_built = (self.parts.sampler, self.parts.plan, self.parts.notes)
        self.surface = TrainerSurface(self.parts, callbacks)
        self.parts.scorer.context.trainer_state = self.surface.state  # reward functions see it, as in TRL
        self.eval_dataset = eval_dataset if eval_dataset is not None else self.parts.evaluation.eval_dataset
        self.surface.init_end()

    def _start_training(self) -> RunParts:
        """What TRL decides as train() starts: a model whose `generate` was replaced on the
        instance (a wrapper of yours, a test's mock) is sampled through it, as TRL always samples
        through `model.generate` (transformers' generate path), and the old policy's log-probs
        are then recomputed by the trainer (that generate's scores are not known to be the
        trainer's). Said in the summary."""
        run = self.parts
        sampler, plan, notes = self._as_built
        caps = capabilities_of(run.engine)  # an engine sampling the trainer's module itself, not through generate
        if (not caps.uses_model_generate and not caps.sampler_differs_from_trainer and _overrides_generate(run.model)
                and isinstance(sampler, (SingleTurnSampler, MultiTurnSampler))):  # rollout_func samples itself
            engine = make_engine("hf-generate", run.model, run.tokenizer,
                                 generation_kwargs=run.config.extra_generation_kwargs(),
                                 score_with_images=score_with_training_forward)
            sampler = dataclasses.replace(sampler, engine=engine)
            plan = dataclasses.replace(plan, old_logps="recomputed") if plan.old_logps == "sampler" else plan
            notes = notes + ("rollout: the model's own generate() was replaced: sampling through it (transformers' "
                             "generate path) instead of grpokit's engine.",)
        if sampler is not run.sampler or plan is not run.plan:
            self.parts = self.surface.parts = dataclasses.replace(run, sampler=sampler, plan=plan, notes=notes)
        return self.parts

    @property
    def state(self):
        """transformers' `TrainerState`: global_step, epoch, log_history, max_steps, ..."""
        return self.surface.state

    def add_callback(self, callback) -> None:
        self.surface.add_callback(callback)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy accuracy on the eval set now, or on `eval_dataset` (one set or a mapping of named
        sets), as transformers' `Trainer.evaluate`: metrics named `<metric_key_prefix>/...`
        (`eval_<name>/...` per named set), and for GRPO `eval_loss` (`eval_<name>_loss`), the
        objective on G fresh samples of each eval prompt; they also go to the logs and
        `state.log_history`."""
        evaluation = self.parts.evaluation
        evaluator = evaluation.evaluator if eval_dataset is None else evaluation.make_evaluator(eval_dataset)
        if evaluator is None:
            raise ValueError(f"{type(self).__name__}.evaluate(): there is no eval set; pass eval_dataset= (or "
                             "set dataset_test_split, or use a built-in task).")
        metrics = self.parts.log_eval(step=self.state.global_step, evaluator=evaluator,
                                      on_batch=self.surface.prediction_step)
        eval_loss = getattr(getattr(self, "algorithm", None), "eval_loss", None)
        if eval_loss is not None:  # transformers' eval_loss (eval_<name>_loss per named set): GRPO's loss there
            named = getattr(evaluator, "evaluators", None)
            for name, one in (named.items() if named else [(None, evaluator)]):
                metrics["eval_loss" if name is None else f"eval_{name}_loss"] = eval_loss(self.parts, one)
        if metric_key_prefix != "eval":
            metrics = {metric_key_prefix + k[len("eval"):] if k.startswith("eval") else k: v for k, v in metrics.items()}
        metrics = {k: v for k, v in metrics.items() if not ignore_keys or k.split("/")[-1] not in ignore_keys}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        return metrics

    @property
    def model(self):
        return self.parts.model

    @property
    def processing_class(self):
        return self.parts.processor if self.parts.processor is not None else self.parts.tokenizer

    @property
    def _logs(self) -> dict:
        """TRL's record of the latest step's samples on this rank: {"images", "prompt", "completion",
        "rewards" {function: values}, "advantages", "extra" (log_extra columns)}."""
        if self.surface.latest is None:
            return {"images": [], "prompt": [], "completion": [], "rewards": {}, "advantages": [], "extra": {}}
        return generation_logs(self.parts, *self.surface.latest)

    def _take_args(self, config_cls, args, kwargs: dict) -> None:
        """`self.args`: `args`, or `config_cls()` when None; an unknown keyword argument or a config
        of another class is an error naming it."""
        owner = type(self).__name__
        if kwargs:
            raise TypeError(f"{owner} got unsupported arguments: {', '.join(sorted(kwargs))}")
        self.args = args if args is not None else config_cls()
        if not isinstance(self.args, config_cls):
            got = type(self.args)
            raise TypeError(f"{owner} needs a grpokit.{config_cls.__name__}, got {got.__module__}.{got.__qualname__} "
                            f"(from grpokit import {config_cls.__name__}: TRL's field names).")


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
        self.latest: tuple | None = None  # the latest step's (rollout, per-sample columns), for trainer._logs

    def add_callback(self, callback) -> None:
        self.handler.add_callback(callback)

    def _event(self, name: str, **kwargs: Any) -> None:
        self.control = getattr(self.handler, name)(self.parts.config, self.state, self.control, **kwargs)

    def _sync(self, state) -> None:
        self.state.global_step = state.global_step
        self.state.epoch = state.epoch + state.cursor / max(1, len(self.parts.train))

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
        self.state.is_world_process_zero = self.state.is_local_process_zero = run.comm.rank == 0
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

    def step_end(self, run, state, metrics: dict[str, float], out) -> Requests:
        if out.rollout is not None:  # kept for trainer._logs, built only when read (generation_logs)
            self.latest = (out.rollout, out.per_sample)
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
        closing: dict[str, float] = {k: final[k] for k in ("train_runtime", "train_samples_per_second", "train_steps_per_second",
                                         "train_loss") if k in final}
        # as TRL's log(): the closing entry carries the means of the steps since the last logged one
        since = {k: sum(v) / len(v) for k, v in self._pending.items()}
        self._pending = {}
        entry: dict[str, float] = {**since, **closing, "epoch": self.state.epoch, "step": state.global_step}
        self.state.log_history.append(entry)
        self._event("on_train_end")

    def output(self, final: dict[str, float]):
        """`train()`'s return value: transformers' TrainOutput(global_step, training_loss, metrics)."""
        from transformers.trainer_utils import TrainOutput

        return TrainOutput(self.state.global_step, float(final.get("train_loss", final.get("loss", 0.0))), final)


def generation_logs(run: RunParts, rollout: Rollout, per_sample: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The latest step's samples on this rank, shaped as TRL's `trainer._logs`: "prompt",
    "completion" (as the rewards saw them), "rewards" {function: [N]}, "advantages", "extra"
    (the rewards' log_extra columns) and "images" (each completion's prompt images, when the step
    had images and log_multimodal is on)."""
    n = len(rollout.completions)
    images: list = []
    if run.config.log_multimodal and rollout.images is not None and any(v is not None for v in rollout.images):
        column = run.train.columns.get("images") or run.train.columns.get("image")
        if column is not None:
            images = [_as_list(column[r]) for r in rollout.row_index]
    advantages = per_sample.get("advantage")
    return {
        "images": images,
        "prompt": list(rollout.prompts),
        "completion": list(rollout.completions),
        "rewards": {name: rollout.rewards_per_func[:, j].tolist() for j, name in enumerate(rollout.reward_names)},
        "advantages": advantages.tolist() if advantages is not None else [0.0] * n,
        "extra": {name: list(col) for name, col in rollout.logged_columns.items()},
    }


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else ([] if value is None else [value])


def _overrides_generate(model) -> bool:
    """Whether `generate` is set on the model instance itself (or its PEFT base model's)."""
    models = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    return any("generate" in vars(m) for m in models)
