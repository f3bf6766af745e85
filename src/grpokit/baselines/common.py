"""What the PPO and DPO baselines share: a config on the fields every algorithm uses that refuses
GRPO's, the reference logprobs, and parameter counts.

Both trainers are built on `core.run.build_run` (the same model, tokenizer, prompts, rewards,
rollout engine, optimizer, tracker and evaluator as GRPO) and run in the one loop
(`core.loop.train_loop`), so the three algorithms write the same metric names to the same files
and `grpokit compare` can put them side by side. Only the step differs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from grpokit.config import GRPOConfig, TrainingConfig, config_field, grpo_only_fields
from grpokit.core.forward import completion_logprobs
from grpokit.core.run import RunParts

__all__ = ["AlgoConfig", "config_field", "grpo_defaults", "parameter_counts", "reference_logprobs"]


def grpo_defaults() -> dict[str, Any]:
    """GRPO's fields that other algorithms do not have (`grpo_only_fields`: the registered loss
    types' knobs and GRPO's step fields), at GRPOConfig's defaults."""
    fields = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    return {name: fields[name].default for name in grpo_only_fields()}


class AlgoConfig(TrainingConfig):
    """A baseline's config: the fields every algorithm uses (TrainingConfig) plus the algorithm's
    own, declared by a dataclass subclass (`@dataclass(init=False)`), checked in its `validate`.

    GRPO's fields the algorithm does not declare itself (`refused_grpo_fields`) are accepted only
    at GRPO's defaults, so a TRL or GRPO config moves over; any other value is an error naming the
    field and, where the algorithm has one, its own equivalent (`EQUIVALENTS`, name -> hint).

    The shared core asks the config what it needs to know of the algorithm (TrainingConfig's
    `update_passes`, `reuses_generation`, `penalises_reference`, ...), never GRPO's fields."""

    EQUIVALENTS: ClassVar[dict[str, str]] = {}

    def __init__(self, **kwargs: Any):
        name, algo = type(self).__name__, type(self).__name__.removesuffix("Config")
        defaults = grpo_defaults()
        for key in self.refused_grpo_fields():
            if key not in kwargs:
                continue
            value = kwargs.pop(key)
            if value != defaults[key]:
                hint = self.EQUIVALENTS.get(key, f"not used by {algo}.")
                raise ValueError(f"{name}: {key}={value!r} is a GRPO setting that {algo} does not use; {hint}")
        super().__init__(**kwargs)

    @classmethod
    def refused_grpo_fields(cls) -> tuple[str, ...]:
        """GRPO's fields (`grpo_only_fields`) this algorithm does not declare as its own."""
        own = {f.name for f in dataclasses.fields(cls)}
        return tuple(k for k in grpo_only_fields() if k not in own)

    def check_single_process(self, world_size: int) -> None:
        if world_size > 1:
            raise ValueError(f"{type(self).__name__}: this trainer runs on one process for now (got {world_size} "
                             "ranks); run it without torchrun.")



@torch.no_grad()
def reference_logprobs(run: RunParts, mb, *, temperature: float) -> torch.Tensor:
    """Per-token logprobs [B, C] of the completion tokens under the reference: the policy with its
    LoRA adapter off, else the frozen copy `run.ref_model` (one process: no wrapper needed)."""
    assert run.plan is not None  # build_run chose the forward plan
    if run.is_peft:
        from grpokit.models import reference_logits_context

        with reference_logits_context(run.model):
            return completion_logprobs(run.model, mb, temperature=temperature, **run.forward_kwargs())[0]
    if run.ref_model is None:
        raise ValueError("no reference model: this run was built without one.")
    return completion_logprobs(run.ref_model, mb, temperature=temperature, **run.forward_kwargs())[0]


def parameter_counts(run: RunParts, extra_modules=()) -> dict[str, int]:
    """Trainable policy parameters, extra trained parameters (value head) and frozen reference
    parameters held in memory (0 for LoRA, whose reference is the base with the adapter off)."""
    policy_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    extra = sum(p.numel() for m in extra_modules for p in m.parameters())
    reference = sum(p.numel() for p in run.ref_model.parameters()) if run.ref_model is not None else 0
    return {"params/policy_trainable": policy_trainable, "params/policy_total": sum(p.numel() for p in run.model.parameters()),
            "params/extra_trainable": extra, "params/reference": reference}
