"""Where a run's rollouts are sampled: in the training process between optimizer steps
(`InlinePipeline`, the synchronous run) or by a generation worker process that samples the next
batches while the trainer trains (`AsyncPipeline`, max_staleness set).

The loop and the run see one interface (`Pipeline`): `start` at the loop's start, `sample` for
each sampling of a step (the loop's batch and dynamic sampling's extra rounds, in data order),
`weights_changed` after every optimizer step, `metrics` once a step, `checkpoint` when a
checkpoint is written, `close` at the end.

The asynchronous pipeline, seen from the trainer:

    start:            fork the worker; request what the bound already allows
    sample(rows):     the j-th sampling of the run: its rollout, requested ahead when the bound
                      allowed (else now, with the current weights); wait for it (a timeout
                      naming the stage), checking each sync's probe report on the way
    weights_changed:  version += 1; at each sync step, request the samplings whose weights are
                      now due (schedule.needed_version), staging the weights once for them
    checkpoint:       wait for what was requested; the rollouts travel in the checkpoint, so a
                      resumed run trains on what the straight run trained on

Every rollout carries the version that sampled it (`Trajectories.policy_version`); its staleness
at the step that first trains on it is at most max_staleness, by construction (nothing is
discarded). A dynamic-sampling round takes the next requested sampling (its rows are the next
ones in the data order, as the synchronous run's round takes them).
"""

from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os
import pickle
import queue
import signal
import time
from typing import Any, Protocol

import torch

from grpokit.data.vision import VisionInputs
from grpokit.pipeline.schedule import Limits, Request
from grpokit.pipeline.weights import IDLE, STAGE, ProbeReport, WeightChannel, compare
from grpokit.pipeline.worker import worker_main
from grpokit.rollout.base import capabilities_of
from grpokit.trajectory import Segment, ToolStats, Trajectories

torch.serialization.add_safe_globals([Trajectories, Segment, ToolStats, VisionInputs])


class PipelineError(RuntimeError):
    """The generation worker failed, hung, or samples from other weights than the trainer's."""


class Pipeline(Protocol):
    def start(self, run, state) -> None: ...

    def sample(self, run, rows: list[int], seed: int) -> Trajectories: ...

    def weights_changed(self, run) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def checkpoint(self, run) -> dict: ...

    def close(self) -> None: ...

    def describe(self) -> str: ...


class InlinePipeline:
    """The synchronous run: each sampling in the training process, when the step asks. An engine
    that keeps state between calls (capabilities.keeps_state: its drafter's memory) has it saved
    in checkpoints, each rank's, and restored on resume, and its metrics of the last sampling
    (`engine.metrics()`: how many draft tokens were kept) logged with the step (rank 0's)."""

    def __init__(self) -> None:
        self.stats: dict[str, float] = {}

    def start(self, run, state) -> None:
        ranks = state.pipeline.get("ranks") if state.pipeline else None
        if ranks and capabilities_of(run.engine).keeps_state:
            run.engine.load_state_dict(ranks[run.comm.rank].get("engine", {}))

    def sample(self, run, rows: list[int], seed: int) -> Trajectories:
        out = run.sample_here(rows, seed)
        if capabilities_of(run.engine).keeps_state:
            self.stats = run.engine.metrics()
        return out

    def weights_changed(self, run) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return dict(self.stats)

    def checkpoint(self, run) -> dict:
        if not capabilities_of(run.engine).keeps_state:
            return {}
        return {"ranks": run.comm.gather_objects({"engine": run.engine.state_dict()})}

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return ""


class AsyncPipeline:
    """A generation worker sampling ahead of the trainer, within `limits`.

    `steps_per_batch`: optimizer steps one generated batch feeds (num_iterations x
    steps_per_generation / gradient_accumulation_steps); `timeout`: heartbeat_stale_after_s;
    `tolerance`: sync_probe_tolerance."""

    def __init__(self, *, limits: Limits, steps_per_batch: int, group_size: int, timeout: float, tolerance: float,
                 rank: int = 0, correction: str = ""):
        self.limits, self.k, self.g, self.correction = limits, steps_per_batch, group_size, correction
        self.timeout, self.tolerance, self.rank = timeout, tolerance, rank
        self.process: Any = None
        self.channel: WeightChannel | None = None
        self.version = 0                    # the trainer's optimizer steps
        self.staged: int | None = None      # the version in the staging copy
        self.taken = 0                      # samplings handed to the loop
        self.requested: dict[int, Request] = {}   # index -> request not yet taken
        self.ready: dict[int, Trajectories] = {}  # index -> its rollout, received
        self.expected: dict[int, ProbeReport] = {}
        self.next_index = 0                 # the next sampling to request
        self.position = (0, 0)              # (epoch, cursor) after the last requested sampling
        self.next_step = 0                  # the optimizer step expected to train on it first
        self.total_steps = 0
        self.threads: int | None = None
        self.stats: dict[str, float] = {}
        self.resend: list[Request] = []     # restored requests whose rollouts were not saved
        self.not_exact = ""

    def describe(self) -> str:
        lim = self.limits
        return (f"generation: a worker process samples ahead of the trainer, each rollout at most "
                f"max_staleness={lim.max_staleness} optimizer step(s) old (weights sent every {lim.sync_every} "
                f"step(s), <= {lim.queue_maxsize} completions queued), probe-checked after each sync"
                + (f"; stale rollouts corrected with the sampler's log-probs ({self.correction})"
                   if self.correction else ""))

    # ---- start and stop ----
    def start(self, run, state) -> None:
        saved = (state.pipeline.get("ranks") or [{}] * run.world_size)[run.comm.rank] if state.pipeline else {}
        self.version = self.next_step = state.global_step
        self.position = (state.epoch, state.cursor)
        self.total_steps = run.total_steps
        self.channel = WeightChannel(run.model, probe_ids(run))
        self.stats = {}
        if saved:
            self.restore(saved, run)
            if capabilities_of(run.engine).keeps_state:  # the worker's engine state stays in the worker
                self.not_exact = "; ".join(x for x in (self.not_exact, (
                    "the generation worker's engine state (its drafter's memory) is not kept by checkpoints: the "
                    "same samples, to float rounding")) if x)
        self.threads = torch.get_num_threads()
        ctx = multiprocessing.get_context("fork")
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(
            target=worker_main, name=f"grpokit-generation-rank{self.rank}", daemon=True,
            args=(run.sample_here, run.model, lambda: run.engine.update_weights(run.model), self.channel,
                  self.requests, self.results, os.getpid()))
        # Ctrl-C in the instant between the fork and the worker's handler must not kill the worker:
        # SIGINT is blocked across the fork (the worker ignores it, then unblocks it)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        torch.set_num_threads(max(1, self.threads - 1))  # the worker runs on one
        self.request_ahead(run)

    def close(self) -> None:
        if self.process is None:
            return
        try:
            # idle with nothing asked of it: it stops at the sentinel; else (a batch no one will
            # train on, requests queued after an error, or hung) it is killed
            idle = self.channel is not None and int(self.channel.flags[STAGE]) == IDLE
            if idle and all(j in self.ready for j in self.requested):
                self.requests.put(None)
                self.process.join(timeout=5)
        finally:
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)
            self.process = None
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            for q in (self.requests, self.results):
                q.cancel_join_thread()
                q.close()

    # ---- the loop's calls ----
    def sample(self, run, rows: list[int], seed: int) -> Trajectories:
        j = self.taken
        request = self.requested.get(j)
        if request is None:  # not requested ahead: now, with the current weights
            request = self.request(run, rows, seed, step=self.version)
        if list(request.rows) != list(rows):
            raise PipelineError(f"rank {self.rank}: sampling {j} was requested for rows {list(request.rows)[:8]} "
                                f"but the loop asks for {list(rows)[:8]} (the pipeline's data order is broken)")
        started = time.perf_counter()
        while j not in self.ready:
            self.receive(f"the rollouts of step {self.version + 1} (queue)")
        waited = time.perf_counter() - started
        traj = self.ready.pop(j)
        del self.requested[j]
        self.taken += 1
        staleness = self.version - request.version
        if not 0 <= staleness <= self.limits.max_staleness:
            raise PipelineError(f"rank {self.rank}: sampling {j} was sampled with the weights of step "
                                f"{request.version} and would train at step {self.version}: {staleness} steps stale, "
                                f"over max_staleness={self.limits.max_staleness} (the pipeline's schedule is broken)")
        self.add_stat("async/wait_seconds", waited)
        self.stats["async/staleness"] = max(self.stats.get("async/staleness", 0.0), float(staleness))
        self.stats["async/queued_completions"] = float(sum(r.samples for r in self.requested.values()))
        if run.image_features is not None:
            run.image_features.clear()  # the previous step's features are of other weights
        return dataclasses.replace(traj, policy_version=torch.full((len(traj),), request.version, dtype=torch.long))

    def weights_changed(self, run) -> None:
        self.version += 1
        if self.version % self.limits.sync_every == 0:
            # a rank whose worker fails here stops every rank now, naming it
            with run.comm.guard("the weight sync"):
                self.request_ahead(run)

    def metrics(self) -> dict[str, float]:
        out, self.stats = self.stats, {}
        return out

    def checkpoint(self, run) -> dict:
        """What a checkpoint keeps: every requested rollout (waited for), the requests and the
        position. Rollouts that cannot be saved (environment objects) are left out, and the
        resumed run samples them again with its weights (then said not to be exact)."""
        while any(j not in self.ready for j in self.requested):
            self.receive("the rollouts requested before the checkpoint (queue)")
        pending = [{"request": r.to_dict(), "rollout": self.ready[j]} for j, r in sorted(self.requested.items())]
        if not savable(pending):
            pending = [{"request": t["request"], "rollout": None} for t in pending]
        mine = {"pending": pending, "taken": self.taken, "next_index": self.next_index,
                "position": list(self.position), "next_step": self.next_step}
        return {"ranks": run.comm.gather_objects(mine)}

    def restore(self, saved: dict, run) -> None:
        self.taken, self.next_index = int(saved["taken"]), int(saved["next_index"])
        self.position = (int(saved["position"][0]), int(saved["position"][1]))
        self.next_step = int(saved["next_step"])
        for item in saved["pending"]:
            r = Request.from_dict(item["request"])
            if item["rollout"] is None:  # not saved: sampled again with the resumed weights
                r = dataclasses.replace(r, version=self.version)
                self.not_exact = ("the checkpoint could not keep the rollouts sampled ahead (their environments); "
                                  "they are sampled again with the resumed weights")
            else:
                self.ready[r.index] = item["rollout"]
            self.requested[r.index] = r
        self.resend = [r for r in self.requested.values() if r.index not in self.ready]

    # ---- requests ----
    def request_ahead(self, run) -> None:
        """Request every next sampling the bound allows now."""
        for r in self.resend:
            self.send(run, r)
        self.resend = []
        while self.next_step < self.total_steps:
            queued = sum(r.samples for r in self.requested.values())
            inflight = sum(r.samples for j, r in self.requested.items() if j not in self.ready)
            samples = run.order.prompts_per_step * self.g
            if not self.limits.may_request(self.next_step, self.version, samples, queued, inflight):
                return
            rows, epoch, cursor = run.order.next_rows(*self.position)
            self.request(run, rows, run.sampling_seed(self.next_step), step=self.next_step, position=(epoch, cursor))

    def request(self, run, rows: list[int], seed: int, *, step: int,
                position: tuple[int, int] | None = None) -> Request:
        """The next sampling, with the current weights. `position`: the data position after
        `rows` (known when the pipeline chose them; the loop's rows follow its own walk)."""
        if position is None:
            walked, epoch, cursor = run.order.next_rows(*self.position)
            if list(walked) != list(rows):
                raise PipelineError(f"rank {self.rank}: the loop asks for rows {list(rows)[:8]} where the data order "
                                    f"continues with {list(walked)[:8]} (the pipeline's data order is broken)")
            position = (epoch, cursor)
        r = Request(index=self.next_index, rows=tuple(rows), seed=seed, version=self.version, step=step,
                    samples=len(rows) * self.g)
        self.next_index += 1
        self.position = position
        # the next sampling is expected at the next batch (a dynamic-sampling round taken now does
        # not move it)
        self.next_step = max(self.next_step, step + self.k)
        self.requested[r.index] = r
        self.send(run, r)
        return r

    def send(self, run, r: Request) -> None:
        staged_now = self.staged != r.version
        if staged_now:
            self.stage(run, r.version)
        self.requests.put(r)
        if staged_now:  # the trainer's side of the probe, while the worker loads and samples
            started = time.perf_counter()
            assert self.channel is not None
            self.expected[r.version] = self.channel.report(run.model, r.version)
            self.add_stat("async/sync_seconds", time.perf_counter() - started)

    def stage(self, run, version: int) -> None:
        assert self.channel is not None
        started = time.perf_counter()
        waiting_for = f"the worker to take the weights of step {self.staged} before those of step {version} (sync)"
        deadline = time.monotonic() + self.timeout
        while not self.channel.taken():
            if self.receive(waiting_for, block=0.05):
                deadline = time.monotonic() + self.timeout
            elif time.monotonic() > deadline:
                raise self.silence(waiting_for)
        self.channel.stage(run.model, version)
        self.staged = version
        self.add_stat("async/sync_seconds", time.perf_counter() - started)

    # ---- what the worker sends ----
    def receive(self, waiting_for: str, block: float | None = None) -> bool:
        """One message from the worker (False: none within `block` seconds); the worker's death
        or its silence past the timeout raises, naming what the trainer waited for and the
        worker's stage."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                message = self.results.get(timeout=min(0.5, block) if block is not None else 0.5)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise PipelineError(f"rank {self.rank}: the generation worker (pid {self.process.pid}) died "
                                        f"(exit code {self.process.exitcode}) while the trainer waited for "
                                        f"{waiting_for}") from None
                if block is not None:
                    return False
                if time.monotonic() > deadline:
                    raise self.silence(waiting_for) from None
        kind = message[0]
        if kind == "error":
            raise PipelineError(f"rank {self.rank}: the generation worker failed while the trainer waited for "
                                f"{waiting_for}:\n{message[1]}")
        if kind == "synced":
            got: ProbeReport = pickle.loads(message[1])
            expected = self.expected.pop(got.version, None)
            if expected is None:
                raise PipelineError(f"rank {self.rank}: the worker loaded the weights of step {got.version}, which "
                                    "the trainer did not stage (the pipeline's order is broken)")
            gap = compare(expected, got, self.tolerance)
            if gap is not None:
                raise PipelineError(f"rank {self.rank}: the sampler runs another policy than the trainer: {gap}")
            if expected.logps.numel():
                diff = float((expected.logps - got.logps).abs().max())
                self.stats["async/probe_gap"] = max(self.stats.get("async/probe_gap", 0.0), diff)
        elif kind == "result":
            self.ready[message[1]] = pickle.loads(message[2])
        return True

    def silence(self, waiting_for: str) -> PipelineError:
        stage = self.channel.worker_stage if self.channel is not None else "?"
        return PipelineError(f"rank {self.rank}: the generation worker (pid {self.process.pid}) sent nothing for "
                             f"{self.timeout:g} s (heartbeat_stale_after_s) while the trainer waited for "
                             f"{waiting_for}; the worker is {stage}")

    def add_stat(self, name: str, value: float) -> None:
        self.stats[name] = self.stats.get(name, 0.0) + value


def savable(pending: list[dict]) -> bool:
    """Whether the rollouts load back from a checkpoint (torch.load with weights_only)."""
    buffer = io.BytesIO()
    try:
        torch.save(pending, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - an environment object, a column of arbitrary objects
        return False


def probe_ids(run, count: int = 2, length: int = 16) -> list[list[int]]:
    """The probe set: the first text-only training prompts, at most `length` tokens each."""
    out: list[list[int]] = []
    for r in range(len(run.train)):
        if len(out) == count:
            break
        if run.train.images_of([r]) is None and len(run.train.prompt_ids[r]) >= 2:
            out.append(list(run.train.prompt_ids[r][:length]))
    return out


def make_pipeline(cfg, *, rank: int) -> Pipeline:
    """The run's pipeline: asynchronous when the config sets max_staleness, else inline."""
    staleness = getattr(cfg, "max_staleness", None)
    if staleness is None:
        return InlinePipeline()
    limits = Limits(max_staleness=staleness, sync_every=cfg.weight_sync_steps, queue_maxsize=cfg.queue_maxsize,
                    max_inflight=cfg.max_inflight_tasks)
    return AsyncPipeline(limits=limits, steps_per_batch=cfg.num_iterations * cfg.updates_per_generation(),
                         group_size=cfg.num_generations, timeout=cfg.heartbeat_stale_after_s,
                         tolerance=cfg.sync_probe_tolerance, rank=rank,
                         correction=(cfg.vllm_importance_sampling_mode
                                     if cfg.samples_stale() and cfg.corrects_sampler() else ""))


