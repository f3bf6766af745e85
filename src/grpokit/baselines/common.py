"""What the PPO and DPO baselines share: a config that extends GRPOConfig with an algorithm's own
fields, the reference logprobs, and parameter counts.

Both trainers are built on `core.run.build_run` (the same model, tokenizer, prompts, rewards,
rollout engine, optimizer, tracker and evaluator as GRPO) and run in the one loop
(`core.loop.train_loop`), so the three algorithms write the same metric names to the same files
and `grpokit compare` can put them side by side. Only the step differs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from typing import Any, ClassVar

import torch

from grpokit.config import UNSUPPORTED_TRL_FIELDS, GRPOConfig, GRPOFields, with_changes
from grpokit.core.forward import completion_logprobs
from grpokit.core.run import RunParts

__all__ = ["AlgoConfig", "own_field", "parameter_counts", "reference_logprobs"]

_GRPO_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GRPOFields) if f.default is not dataclasses.MISSING}


GRPO_OBJECTIVE_ONLY = {name: "not used by {algo}." for name in (
    "use_bias_correction_kl", "off_policy_mask_threshold", "multi_objective_aggregation", "entropy_coef",
    "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
    "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg", "sapo_temperature_pos", "sapo_temperature_neg", "dynamic_sampling",
    "dynamic_sampling_max_rounds", "steps_per_generation")}
"""Knobs of GRPO's objective that no baseline reads (each baseline's _GRPO_ONLY adds its own)."""


class AlgoConfig(GRPOConfig):
    """GRPOConfig plus the fields of the dataclass `_OWN`. Fields in `_GRPO_ONLY` (name -> hint)
    belong to the GRPO objective: setting one to anything but its default is an error naming the
    algorithm's own knob, never silently ignored. `_DEFAULTS` changes GRPO defaults (e.g. PPO's
    k1 KL estimator)."""

    _OWN: ClassVar[type]  # the algorithm's dataclass of its own fields (each subclass sets it)
    _GRPO_ONLY: dict[str, str] = {}
    _DEFAULTS: dict[str, Any] = {}

    def __init__(self, **kwargs: Any):
        name = type(self).__name__
        own = {f.name: f for f in dataclasses.fields(self._OWN)}
        known = set(_GRPO_DEFAULTS) | {f.name for f in dataclasses.fields(GRPOFields)} | set(own)
        for key in kwargs:
            if key not in known and key not in UNSUPPORTED_TRL_FIELDS:
                close = difflib.get_close_matches(key, sorted(known), n=3)
                raise ValueError(f"{name}: unknown field {key!r}." + (f" Did you mean {', '.join(close)}?" if close else ""))
        for key, f in own.items():
            if key in kwargs:
                value = kwargs.pop(key)
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise TypeError(f"{name}: field {key!r} has no default")
            if isinstance(f.default, float) and isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{name}: {key}={value!r} is not a number.") from None
            setattr(self, key, value)
        for key, value in self._DEFAULTS.items():
            kwargs.setdefault(key, value)
        for key, hint in {**GRPO_OBJECTIVE_ONLY, **self._GRPO_ONLY}.items():
            if key in kwargs and kwargs[key] != _GRPO_DEFAULTS.get(key):
                hint = hint.format(algo=name[:-6])
                raise ValueError(f"{name}: {key}={kwargs[key]!r} is a GRPO setting that {name[:-6]} does not use; {hint}")
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        return {**super().to_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self._OWN)}}

    def replace(self, **changes: Any):
        return type(self)(**with_changes(self.to_dict(), changes))

    def check_single_process(self, world_size: int) -> None:
        if world_size > 1:
            raise ValueError(f"{type(self).__name__}: this trainer runs on one process for now (got {world_size} "
                             "ranks); run it without torchrun.")


def own_field(default: Any, help: str):
    return field(default=default, metadata={"help": help})


@torch.no_grad()
def reference_logprobs(run: RunParts, mb, *, temperature: float) -> torch.Tensor:
    """Per-token logprobs [B, C] of the completion tokens under the reference: the policy with its
    LoRA adapter off, else the frozen copy `run.ref_model` (one process: no wrapper needed)."""
    assert run.plan is not None  # build_run chose the forward plan
    if run.is_peft:
        from grpokit.models import reference_logits_context

        with reference_logits_context(run.model):
            return completion_logprobs(run.model, mb, temperature=temperature, **run.plan.forward_kwargs())[0]
    if run.ref_model is None:
        raise ValueError("no reference model: this run was built without one.")
    return completion_logprobs(run.ref_model, mb, temperature=temperature, **run.plan.forward_kwargs())[0]


def parameter_counts(run: RunParts, extra_modules=()) -> dict[str, int]:
    """Trainable policy parameters, extra trained parameters (value head) and frozen reference
    parameters held in memory (0 for LoRA, whose reference is the base with the adapter off)."""
    policy_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    extra = sum(p.numel() for m in extra_modules for p in m.parameters())
    reference = sum(p.numel() for p in run.ref_model.parameters()) if run.ref_model is not None else 0
    return {"params/policy_trainable": policy_trainable, "params/policy_total": sum(p.numel() for p in run.model.parameters()),
            "params/extra_trainable": extra, "params/reference": reference}
