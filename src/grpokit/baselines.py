"""What the PPO and DPO baselines share: a config that extends GRPOConfig with an algorithm's own
fields, and the step driver around an algorithm's update.

Both trainers are built on `run.build_run` (the same model, tokenizer, prompts, rewards, rollout
engine, optimizer, tracker and evaluator as GRPO) and log through `trainer._step_metrics`, so the
three algorithms write the same metric names to the same files and `grpokit compare` can put them
side by side. Only the update differs: `step_fn(rows, step, phase) -> StepOutput`.
"""

from __future__ import annotations

import dataclasses
import difflib
import resource
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from grpokit.batch import Rollout
from grpokit.config import UNSUPPORTED_TRL_FIELDS, GRPOConfig, _GRPOFields
from grpokit.run import RunParts
from grpokit.trainer import _step_metrics, _timed, end_of_step

__all__ = ["ALGOS", "AlgoConfig", "StepOutput", "algo_classes", "reference_logprobs", "run_steps", "timed"]

timed = _timed
_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(_GRPOFields) if f.default is not dataclasses.MISSING}


class AlgoConfig(GRPOConfig):
    """GRPOConfig plus the fields of the dataclass `_OWN`. Fields in `_GRPO_ONLY` (name -> hint)
    belong to the GRPO objective: setting one to anything but its default is an error naming the
    algorithm's own knob, never silently ignored. `_DEFAULTS` changes GRPO defaults (e.g. PPO's
    k1 KL estimator)."""

    _OWN: type = None
    _GRPO_ONLY: dict[str, str] = {}
    _DEFAULTS: dict[str, Any] = {}

    def __init__(self, **kwargs: Any):
        name = type(self).__name__
        own = {f.name: f for f in dataclasses.fields(self._OWN)}
        known = set(_GRPO_DEFAULTS) | {f.name for f in dataclasses.fields(_GRPOFields)} | set(own)
        for key in kwargs:
            if key not in known and key not in UNSUPPORTED_TRL_FIELDS:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                raise ValueError(f"{name}: unknown field {key!r}." + (f" Did you mean {', '.join(close)}?" if close else ""))
        for key, f in own.items():
            value = kwargs.pop(key) if key in kwargs else (
                f.default if f.default is not dataclasses.MISSING else f.default_factory())
            if isinstance(f.default, float) and isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name}: {key}={value!r} is not a number.") from None
            setattr(self, key, value)
        for key, value in self._DEFAULTS.items():
            kwargs.setdefault(key, value)
        for key, hint in self._GRPO_ONLY.items():
            if key in kwargs and kwargs[key] != _GRPO_DEFAULTS.get(key):
                raise ValueError(f"{name}: {key}={kwargs[key]!r} is a GRPO setting that {name[:-6]} does not use; {hint}")
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self._OWN)}}

    def replace(self, **changes: Any):
        return type(self)(**{**self.to_dict(), **changes})

    def check_single_process(self, world_size: int) -> None:
        if world_size > 1:
            raise ValueError(f"{type(self).__name__}: this trainer runs on one process for now (got {world_size} "
                             "ranks); run it without torchrun.")


def own_field(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class StepOutput:
    """What one step of an algorithm produced, for the shared logging."""

    rollout: Rollout | None              # what was sampled and scored (None: offline data)
    reward_stats: dict[str, float]       # the reward runner's stats ({} offline)
    step_stats: list[dict[str, torch.Tensor]]  # one dict per optimizer step (averaged in the log)
    samples: int                         # completions consumed by this step (this rank)
    extra: dict[str, float] = field(default_factory=dict)  # once-per-step metrics
    skipped: int = 0                     # optimizer steps skipped (non-finite gradient)


def run_steps(run: RunParts, step_fn: Callable[[list[int], int, dict], StepOutput], *,
              resume_from_checkpoint: str | bool | None = None) -> dict[str, float]:
    """The loop around an algorithm's update: rows -> step_fn -> metrics, samples, eval, checkpoint.

    A step is one batch of prompts (one generated batch, or one batch of preference pairs);
    `max_steps` counts these steps, whatever number of optimizer steps each makes."""
    state, final = run.begin(resume_from_checkpoint)
    while state["global_step"] < run.total_steps:
        phase: dict[str, float] = {}
        rows, state["epoch"], state["cursor"] = run.next_prompt_rows(state["epoch"], state["cursor"])
        out = step_fn(rows, state["global_step"], phase)
        state["global_step"] += 1
        state["samples_seen"] += run.world_size * out.samples
        state["skipped_steps"] += out.skipped
        if out.rollout is not None:
            metrics = _step_metrics(run, out.rollout, out.reward_stats, out.step_stats, phase, state)
        else:
            metrics = _offline_metrics(run, out.step_stats, phase, state)
        metrics.update(out.extra)
        end_of_step(run, state, metrics, out.rollout)
        final = metrics
    return final


def _offline_metrics(run: RunParts, step_stats, phase, state) -> dict[str, float]:
    """The metrics of a step without sampling (preference pairs from a dataset)."""
    local = {k: torch.stack([torch.as_tensor(s[k], dtype=torch.float32).cpu() for s in step_stats]).mean()
             for k in (step_stats[-1] if step_stats else [])}
    metrics = run.reduce_metrics(local) if local else {}
    metrics.update(phase)
    metrics["time/step"] = sum(v for k, v in phase.items() if k.startswith("time/"))
    metrics["memory/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available() and run.device.type == "cuda":
        metrics["memory/peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["learning_rate"] = run.scheduler.get_last_lr()[0]
    metrics["skipped_steps"] = float(state["skipped_steps"])
    metrics["samples"] = float(state["samples_seen"])
    metrics["epoch"] = state["epoch"] + state["cursor"] / max(1, run.num_train_rows)
    return metrics


@torch.no_grad()
def reference_logprobs(run: RunParts, mb, *, temperature: float) -> torch.Tensor:
    """Per-token logprobs [B, C] of the completion tokens under the reference: the policy with its
    LoRA adapter off, else the frozen copy `run.ref_model` (one process: no wrapper needed)."""
    from grpokit.batch import completion_logprobs

    if run.is_peft:
        from grpokit.models import reference_logits_context

        with reference_logits_context(run.model):
            return completion_logprobs(run.model, mb, temperature=temperature)[0]
    if run.ref_model is None:
        raise ValueError("no reference model: this run was built without one.")
    return completion_logprobs(run.ref_model, mb, temperature=temperature)[0]


def rebuild_scheduler(run: RunParts, optimizer_steps_per_step: int) -> None:
    """A fresh LR schedule over `run.total_steps * optimizer_steps_per_step` optimizer steps (warm-up
    scaled alike), for trainers that make several optimizer steps per step or add parameter groups."""
    from transformers import get_scheduler
    import math

    cfg = run.config
    total = run.total_steps * optimizer_steps_per_step
    warmup = (cfg.warmup_steps * optimizer_steps_per_step) if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * total)
    run.scheduler = get_scheduler(cfg.lr_scheduler_type, run.optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total)


def set_rows_per_step(run: RunParts, rows_per_step: int) -> None:
    """Change how many dataset rows one step takes (per rank), and the step count that follows
    from num_train_epochs when max_steps is not set."""
    import math

    run.prompts_per_step = rows_per_step
    if run.config.max_steps <= 0:
        run.total_steps = max(1, math.ceil(run.config.num_train_epochs * run.num_train_rows /
                                           (rows_per_step * run.world_size)))
    run.tracker.total_steps = run.total_steps


def parameter_counts(run: RunParts, extra_modules=()) -> dict[str, int]:
    """Trainable policy parameters, extra trained parameters (value head) and frozen reference
    parameters held in memory (0 for LoRA, whose reference is the base with the adapter off)."""
    policy_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    extra = sum(p.numel() for m in extra_modules for p in m.parameters())
    reference = sum(p.numel() for p in run.ref_model.parameters()) if run.ref_model is not None else 0
    return {"params/policy_trainable": policy_trainable, "params/policy_total": sum(p.numel() for p in run.model.parameters()),
            "params/extra_trainable": extra, "params/reference": reference}


ALGOS = ("grpo", "ppo", "dpo")


def algo_classes(algo: str) -> tuple[type, type]:
    """`grpokit train --algo grpo|ppo|dpo` -> (config class, trainer class)."""
    if algo == "grpo":
        from grpokit.config import GRPOConfig
        from grpokit.trainer import GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if algo == "ppo":
        from grpokit.ppo import PPOConfig, PPOTrainer

        return PPOConfig, PPOTrainer
    if algo == "dpo":
        from grpokit.dpo import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    raise ValueError(f"algo={algo!r}: use one of {', '.join(ALGOS)}.")
