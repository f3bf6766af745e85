"""When a rollout is sampled, and with which weights: the pure arithmetic of the asynchronous
pipeline (no processes, no tensors).

Versions count optimizer steps: version v is the policy after v optimizer steps, and a rollout
first trained at optimizer step s (the update that turns version s into s + 1) is `s - v` steps
stale. The pipeline samples each rollout with the *oldest* version the bound allows, on the
weight-sync grid, so which weights sample which rollout never depends on timing (a resumed run
and a straight one sample the same), and the worker gets the most time to sample ahead:

    needed_version(s) = the smallest multiple of weight_sync_steps >= s - max_staleness (>= 0)

Worked numbers (max_staleness L, weight_sync_steps w, k optimizer steps per generated batch):
    L=1, w=1, k=1: batch b (trained at step b) is sampled with version b-1: while step b-1
                   trains on batch b-1, the worker samples batch b.
    L=1, w=1, k=2: batch b (first trained at step 2b) is sampled with version 2b-1: after the
                   first of batch b-1's two updates.
    L=3, w=2, k=1: step 6 -> version 4 (3 would be off the grid); step 5 -> version 2.
    L=0: every rollout is sampled with the weights that train on it (the synchronous run).
"""

from __future__ import annotations

from dataclasses import dataclass


def needed_version(step: int, max_staleness: int, sync_every: int = 1) -> int:
    """The weights a rollout first trained at optimizer step `step` is sampled with (see above).
    Within the bound when max_staleness >= sync_every - 1 (the config checks it)."""
    oldest = step - max_staleness
    if oldest <= 0:
        return 0
    return -(-oldest // sync_every) * sync_every


@dataclass(frozen=True)
class Request:
    """One sampling of the run on this rank: G completions for each of `rows`."""

    index: int        # the run's j-th sampling on this rank (the loop asks for them in this order)
    rows: tuple       # dataset rows
    seed: int         # the sampling seed
    version: int      # the weights it is sampled with
    step: int         # the optimizer step expected to train on it first (a dynamic-sampling round takes it earlier)
    samples: int      # completions: len(rows) * G

    def to_dict(self) -> dict:
        return {"index": self.index, "rows": list(self.rows), "seed": self.seed, "version": self.version,
                "step": self.step, "samples": self.samples}

    @classmethod
    def from_dict(cls, d: dict) -> "Request":
        return cls(index=int(d["index"]), rows=tuple(int(r) for r in d["rows"]), seed=int(d["seed"]),
                   version=int(d["version"]), step=int(d["step"]), samples=int(d["samples"]))


@dataclass(frozen=True)
class Limits:
    """What may be requested ahead of the trainer."""

    max_staleness: int
    sync_every: int = 1          # weight_sync_steps
    queue_maxsize: int = 1024    # completions sampled (or being sampled) and not yet trained on
    max_inflight: int = -1       # completions requested and not yet returned (-1: no extra bound)

    def may_request(self, request_step: int, version: int, samples: int, queued: int, inflight: int) -> bool:
        """Whether a rollout first trained at `request_step` may be requested now, at `version`,
        with `queued` completions waiting to be trained on and `inflight` still being sampled."""
        if needed_version(request_step, self.max_staleness, self.sync_every) > version:
            return False
        if queued + samples > self.queue_maxsize:
            return False
        return self.max_inflight < 0 or inflight + samples <= self.max_inflight
