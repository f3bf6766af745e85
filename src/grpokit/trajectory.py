"""What one step sampled, as typed trajectories, and what the rewards made of it.

A sample is a prompt followed by segments: model-generated ones (trained; they carry the
sampler's logprobs) and external ones (a tool's or an environment's output: in the context,
never trained, left out of every loss normaliser). Single-turn GRPO is one model segment per
sample. Shapes: N = prompts * G samples per step, groups contiguous (rows g*G .. g*G+G-1 share a
prompt).

`Trajectories` is built complete by whoever samples (the engine's caller), `Rollout` by whoever
scores them (`Trajectories.scored`); neither is filled in later, and a field never changes
meaning: rewards stay rewards, an algorithm's advantages, values or preference pairs live in
its own objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

MODEL = "model"
EXTERNAL = "external"


@dataclass(frozen=True)
class Segment:
    """Completion tokens [start, end) of one sample, written by the model or by something else."""

    start: int
    end: int
    source: str = MODEL       # MODEL (trained) | EXTERNAL (tool / environment output: context only)

    def __post_init__(self):
        if self.source not in (MODEL, EXTERNAL):
            raise ValueError(f"Segment.source={self.source!r}: use {MODEL!r} or {EXTERNAL!r}.")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"Segment [{self.start}, {self.end}) is not a range.")

    @property
    def trained(self) -> bool:
        return self.source == MODEL


@dataclass
class ToolCounts:
    """One multi-turn sample's counts, kept by the driver as its conversation goes."""

    turns: int = 0            # model turns
    tool_calls: int = 0       # tool calls made
    tool_failures: int = 0    # calls that failed: raised, unknown tool, timed out
    tool_timeouts: int = 0    # calls past their deadline
    malformed_calls: int = 0  # turns whose tool calls could not be parsed (they end the conversation)


TOOL_COUNTS = tuple(f.name for f in dataclasses.fields(ToolCounts))


@dataclass(frozen=True)
class ToolStats:
    """The multi-turn counts of N samples: per count of `ToolCounts`, an [N] long tensor."""

    counts: dict[str, torch.Tensor]

    @classmethod
    def of(cls, samples: list[ToolCounts]) -> "ToolStats":
        return cls({name: torch.tensor([getattr(c, name) for c in samples], dtype=torch.long) for name in TOOL_COUNTS})

    @classmethod
    def zeros(cls, n: int) -> "ToolStats":
        return cls({name: torch.zeros(n, dtype=torch.long) for name in TOOL_COUNTS})

    def __len__(self) -> int:
        return len(self.counts[TOOL_COUNTS[0]])

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.counts[name]

    def select(self, idx: list[int]) -> "ToolStats":
        pick = torch.tensor(idx, dtype=torch.long)
        return ToolStats({name: t[pick] for name, t in self.counts.items()})

    @classmethod
    def concat(cls, parts: list["ToolStats"]) -> "ToolStats":
        return cls({name: torch.cat([p.counts[name] for p in parts]) for name in TOOL_COUNTS})

    def sums(self) -> dict[str, float]:
        return {name: float(t.sum()) for name, t in self.counts.items()}


@dataclass(frozen=True, kw_only=True)
class Trajectories:
    """N sampled trajectories: each a prompt, then completion tokens (model and external segments)."""

    row_index: list[int]                 # dataset row of each sample's prompt
    prompts: list                        # prompt as the rewards see it (str or messages)
    completions: list                    # completion as the rewards see it (str or messages)
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]      # every token after the prompt, model and external
    sampling_logps: list[list[float]]    # the sampler's logprob of each completion token (0 on external ones)
    truncated: torch.Tensor              # [N] bool: stopped by the completion budget
    segments: list[list[Segment]] | None = None   # None: each completion is one model segment
    nonfinite: torch.Tensor | None = None   # [N] bool: the sampler's logprobs were NaN/inf (never trained)
    tool_stats: ToolStats | None = None  # multi-turn: each sample's turns, tool calls, failures, timeouts and
                                         # malformed calls; None: single-turn
    extra_columns: dict[str, list] | None = None  # per-sample columns for the rewards (rollout_func's extra fields)
    images: list | None = None           # per sample: its prompt's images (grpokit.data.vision.VisionInputs, one
                                         # object shared by the group; None for a text prompt); None: no images
    completion_images: list | None = None  # per sample: the images in its completion (tool results;
                                           # VisionInputs over the completion tokens, with slots) or None
    environments: list | None = None     # per sample: its environment object (environment_factory), for
                                         # the rewards' `environments=`; None: no environments
    policy_version: torch.Tensor | None = None  # [N] long: the optimizer step whose weights sampled each
                                                # sample (asynchronous generation); None: the current weights

    def __post_init__(self):
        if self.nonfinite is not None and len(self.nonfinite) != len(self.completion_ids):
            raise ValueError(f"nonfinite has {len(self.nonfinite)} entries for {len(self.completion_ids)} completions.")
        if self.segments is None:
            return
        if len(self.segments) != len(self.completion_ids):
            raise ValueError(f"{len(self.segments)} segment lists for {len(self.completion_ids)} completions.")
        for i, (segs, ids) in enumerate(zip(self.segments, self.completion_ids)):
            at = 0
            for s in segs:
                if s.start != at:
                    raise ValueError(f"sample {i}: segments must cover its completion in order (gap or overlap at {at}).")
                at = s.end
            if at != len(ids):
                raise ValueError(f"sample {i}: segments cover {at} of its {len(ids)} completion tokens.")

    def __len__(self) -> int:
        return len(self.completion_ids)

    def trained_mask(self, i: int) -> list[bool]:
        """Per completion token of sample i: True where the model wrote it (trained)."""
        if self.segments is None:
            return [True] * len(self.completion_ids[i])
        return [s.trained for s in self.segments[i] for _ in range(s.end - s.start)]

    def scored(self, rewards_per_func: torch.Tensor, rewards: torch.Tensor, reward_names: list[str],
               reward_stats: dict[str, Any] | None = None, logged_metrics: dict[str, float] | None = None,
               logged_columns: dict[str, list] | None = None) -> "Rollout":
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(Trajectories)}
        return Rollout(**own, rewards_per_func=rewards_per_func, rewards=rewards, reward_names=list(reward_names),
                       reward_stats=dict(reward_stats or {}), logged_metrics=dict(logged_metrics or {}),
                       logged_columns=dict(logged_columns or {}))

    def select(self, idx: list[int]):
        """The samples `idx`, in that order (a new object of the same type)."""
        pick = torch.tensor(idx, dtype=torch.long)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == len(self):
                out[f.name] = v[pick]
            elif isinstance(v, ToolStats):
                out[f.name] = v.select(idx)
            elif f.name == "extra_columns" and v is not None:
                out[f.name] = {k: [col[i] for i in idx] for k, col in v.items()}
            elif isinstance(v, list) and len(v) == len(self) and f.name != "reward_names":
                out[f.name] = [v[i] for i in idx]
            else:
                out[f.name] = v
        return type(self)(**out)


@dataclass(frozen=True, kw_only=True)
class Rollout(Trajectories):
    """Trajectories with their rewards."""

    rewards_per_func: torch.Tensor       # [N, F] float32, NaN = function returned None
    rewards: torch.Tensor                # [N] weighted sum over functions (NaN: no function applied)
    reward_names: list[str] = field(default_factory=list)
    reward_stats: dict[str, Any] = field(default_factory=dict)   # the reward runner's per-step statistics
    logged_metrics: dict[str, float] = field(default_factory=dict)   # a reward's log_metric(name, value), means
    logged_columns: dict[str, list] = field(default_factory=dict)    # a reward's log_extra(column, values), [N]


COUNTERS = ("/errors", "/timeouts", "/seconds")


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Several scored rollouts of one step (dynamic sampling's rounds) as one, in order: per-sample
    fields concatenated, the reward runner's counters (errors, timeouts, seconds) summed and its
    per-batch statistics left out (the loop computes the rewards' means from the samples), a
    reward's logged metrics averaged over the parts that logged them."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(p.reward_names != first.reward_names for p in parts):
        raise ValueError("concat_rollouts: the parts were scored by different reward functions.")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in parts]
        if f.name == "segments":
            out[f.name] = None if all(v is None for v in values) else [
                s for p, v in zip(parts, values)
                for s in (v if v is not None else [[Segment(0, len(ids))] for ids in p.completion_ids])]
        elif f.name == "reward_names":
            out[f.name] = list(first.reward_names)
        elif f.name == "extra_columns":
            names = {k for v in values if v for k in v}
            out[f.name] = {k: [x for p, v in zip(parts, values) for x in ((v or {}).get(k) or [None] * len(p))]
                           for k in names} or None
        elif f.name in ("images", "completion_images"):
            out[f.name] = None if all(v is None for v in values) else [
                x for p, v in zip(parts, values) for x in (v if v is not None else [None] * len(p))]
        elif f.name == "tool_stats":
            out[f.name] = None if all(v is None for v in values) else ToolStats.concat(
                [v if v is not None else ToolStats.zeros(len(p)) for p, v in zip(parts, values)])
        elif f.name == "policy_version":
            out[f.name] = None if any(v is None for v in values) else torch.cat(values)
        elif isinstance(values[0], torch.Tensor):
            out[f.name] = torch.cat(values)
        elif values[0] is None:
            out[f.name] = None if all(v is None for v in values) else torch.cat(
                [v if v is not None else torch.zeros(len(p), dtype=torch.bool) for p, v in zip(parts, values)])
        elif isinstance(values[0], list):
            out[f.name] = [x for v in values for x in v]
        elif f.name == "reward_stats":
            out[f.name] = {k: sum(v.get(k, 0) for v in values) for k in first.reward_stats
                           if k.endswith(COUNTERS)}
        elif f.name == "logged_metrics":
            names = {k for v in values for k in v}
            out[f.name] = {k: sum(v[k] for v in values if k in v) / sum(k in v for v in values) for k in names}
        elif f.name == "logged_columns":
            names = {k for v in values for k in v}
            out[f.name] = {k: [x for p, v in zip(parts, values) for x in v.get(k, [None] * len(p))] for k in names}
        else:
            out[f.name] = values[0]
    return Rollout(**out)
