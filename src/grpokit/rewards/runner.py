"""RewardRunner: call F reward functions on N completions -> rewards [N, F] (None -> NaN), total [N].

One call of `runner(prompts, completions, completion_ids=..., columns=...)`:

1. checks the arguments against each function's signature (once per set of columns),
2. starts the `async def` functions together on an event loop in a helper thread,
3. sends the process-pool functions (`num_workers > 0`) to the pool in chunks, from a helper thread,
4. runs the remaining functions in the calling process, each with a deadline (`rewards.calls`),
5. checks every returned list (length, numbers, finite) and applies the error policy,
6. stacks the result, weights it and computes the logged statistics.

A group reward (`registry.group_reward`) is called once per group of `group_size` consecutive
completions (one prompt's G samples), wherever it runs (in this process, on the event loop, in
the pool): it always sees a whole group, never part of one or two groups at once.

Every call has a wall-clock deadline (`timeout`); how it is enforced in this process is in
`grpokit.rewards.calls`. In a worker process the late worker is killed.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit.rewards.calls import (RewardError, RewardTimeout, call_with_timeout, is_async_callable, Part,  # noqa: F401
                                   run_async)
from grpokit.rewards.pool import PoolTask, WorkerPool, payload_for
from grpokit.rewards.registry import load_reward_funcs, reward_name, scores_groups

__all__ = ["RewardRunner", "RewardOutput", "RewardError", "RewardTimeout"]

logger = logging.getLogger("grpokit.rewards")
ON_ERROR = ("raise", "none", "zero")
_FIXED_ARGS = ("prompts", "completions", "completion_ids")
EXTRA_ARGS = ("trainer_state", "log_metric", "log_extra", "environments", "num_generations")


def _ignore(*args, **kwargs) -> None:
    """log_metric / log_extra where nothing collects them (evaluation, `grpokit rewards test`)."""
"""TRL's per-call extras: the trainer's state, callables to log a scalar metric or a column of the
completions table, and (with environment_factory) each completion's environment. Passed to
functions run in this process (not to worker processes); `environments` only when there are some."""
RESERVED_COLUMNS = {"prompt", "completion", "completion_ids", "prompts", "completions"}


@dataclass
class RewardOutput:
    names: list[str]               # F function names, in order
    per_func: torch.Tensor         # [N, F] float32; NaN = None (not applicable), or an error under "none"
    total: torch.Tensor            # [N] nansum_f(w_f * r_f); NaN where every function gave NaN
    stats: dict[str, float]        # rewards/<name>/mean|std|frac_none|errors|timeouts|seconds, rewards/errors, ...
    errors: list[dict] = field(default_factory=list)  # {"function", "kind": error|timeout|nonfinite, "rows", "message"}


@dataclass
class _Plan:
    name: str
    fn: Callable
    is_async: bool
    in_pool: bool
    payload: bytes | None = None
    pass_all: bool = True                 # the function takes **kwargs
    accepted: frozenset = frozenset()     # named parameters it takes (when not pass_all)
    groups: bool = False                  # a group reward: called once per group


def _nan_stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, unbiased (Bessel) std, fraction of NaN) of `values`, NaN left out of the first two:
    mean NaN when no value is left, std NaN when fewer than two; fraction 0 for an empty list.
    In Python: a few hundred floats, where each torch reduction costs more than the whole loop."""
    kept = [v for v in values if v == v]
    k = len(kept)
    mean = math.fsum(kept) / k if k else float("nan")
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in kept) / (k - 1)) if k > 1 else float("nan")
    return mean, std, (len(values) - k) / len(values) if values else 0.0


class RewardRunner:
    """Calls reward functions on a batch; see the module docstring for the order of work.

    reward_funcs: callables, registry names or "module:function" paths (resolved without kwargs).
    weights:      one float per function (None: all 1.0), as TRL's reward_weights.
    timeout:      wall-clock seconds for one call of one function (one chunk in the pool); None: no limit.
    on_error:     "raise" (default) | "none" (the rows get NaN) | "zero" (the rows get 0.0), for
                  exceptions, timeouts and NaN/inf values. Counted in stats and logged. A wrong
                  length, a non-number or an unbindable signature always raises.
    num_workers:  processes for synchronous, picklable functions (0: all run in this process).
                  A function with `use_process_pool = False` (reward models, the code sandbox,
                  functions that need the whole batch) always runs here.
    chunk_size:   rows per pool call (default: about two chunks per worker); rounded up to a
                  multiple of group_size when given, so that a chunk never splits a group.
    """

    def __init__(self, reward_funcs: Sequence[Callable | str] | Callable | str, weights: Sequence[float] | None = None,
                 timeout: float | None = 30.0, on_error: str = "raise", num_workers: int = 0,
                 chunk_size: int | None = None, group_size: int | None = None):
        funcs = load_reward_funcs(reward_funcs) if isinstance(reward_funcs, (str, bytes)) or callable(reward_funcs) \
            else [f if callable(f) else load_reward_funcs([f])[0] for f in reward_funcs]
        if not funcs:
            raise ValueError("RewardRunner: no reward functions.")
        if on_error not in ON_ERROR:
            raise ValueError(f"RewardRunner: on_error={on_error!r}; use one of {ON_ERROR}.")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"RewardRunner: timeout must be > 0 seconds or None, got {timeout}.")
        if weights is None:
            weights = [1.0] * len(funcs)
        weights = [float(w) for w in weights]
        if len(weights) != len(funcs):
            raise ValueError(f"RewardRunner: {len(weights)} weights for {len(funcs)} reward functions.")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"RewardRunner: weights must be finite, got {weights}.")
        self.funcs, self.weights = list(funcs), weights
        self.timeout, self.on_error, self.num_workers = timeout, on_error, int(num_workers)
        self.chunk_size, self.group_size = chunk_size, group_size
        self.names = self._unique_names([reward_name(f) for f in funcs])
        self._plans = []
        for name, fn in zip(self.names, self.funcs):
            is_async = is_async_callable(fn)
            in_pool = self.num_workers > 0 and not is_async and getattr(fn, "use_process_pool", True)
            payload = payload_for(fn) if in_pool else None
            if in_pool and payload is None:
                logger.warning("reward %r cannot be sent to a worker process (it is not picklable, or it lives "
                               "in __main__), so it runs in this process; define it in an importable module.", name)
                in_pool = False
            self._plans.append(_Plan(name, fn, is_async, in_pool, payload, groups=scores_groups(fn)))
        self._checked: frozenset | None = None
        self._pool: WorkerPool | None = None
        self._uid = uuid.uuid4().hex[:8]
        self._warned_all_none = False

    @staticmethod
    def _unique_names(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for n in names:
            seen[n] = seen.get(n, 0) + 1
            out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
        return out

    # ---- checks before the first step ----
    def check_signature(self, columns: Iterable[str], more_columns_later: bool = False) -> None:
        """Raise ValueError (naming the function and the argument) if a function cannot be called
        with the dataset's columns. `columns` may include "prompt" (it is passed as `prompts`).
        `more_columns_later`: other columns come at call time (rollout_func's extra fields), so an
        argument no column names yet is checked then."""
        cols = frozenset(columns) - RESERVED_COLUMNS
        available = set(_FIXED_ARGS) | set(EXTRA_ARGS) | cols
        for plan in self._plans:
            try:
                sig = inspect.signature(plan.fn)
            except (TypeError, ValueError):  # no introspectable signature: pass everything
                plan.pass_all = True
                continue
            plan.pass_all, accepted = False, set()
            for p in sig.parameters.values():
                if p.kind is p.VAR_KEYWORD:
                    plan.pass_all = True
                elif p.kind is p.VAR_POSITIONAL:
                    continue
                elif p.kind is p.POSITIONAL_ONLY:
                    if p.default is p.empty:
                        raise ValueError(f"reward function {plan.name!r}: parameter {p.name!r} is positional-only; "
                                         f"reward functions are called with keyword arguments "
                                         f"({', '.join(_FIXED_ARGS)}, and one per dataset column).")
                elif p.name in available or more_columns_later:
                    accepted.add(p.name)
                elif p.default is p.empty:
                    raise ValueError(
                        f"reward function {plan.name!r} needs the argument {p.name!r}, but the dataset has no column "
                        f"{p.name!r} (columns: {sorted(cols) or 'none besides prompt'}). Add the column, rename the "
                        f"parameter to one of them, or give it a default.")
            plan.accepted = frozenset(accepted)
            check = getattr(plan.fn, "check_columns", None)
            if callable(check):
                try:
                    check(set(cols))
                except ValueError as e:
                    raise ValueError(f"reward function {plan.name!r}: {e}") from None
        self._checked = None if more_columns_later else cols

    def preflight(self) -> list[str]:
        """Before step 1: each function's own check that needs more than the columns (a judge's
        reliability gate, `preflight()` on the function) -> the lines it reports; a function that
        refuses raises ValueError."""
        lines: list[str] = []
        for plan in self._plans:
            check = getattr(plan.fn, "preflight", None)
            if callable(check):
                lines += list(check() or [])
        return lines

    # ---- one batch ----
    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence | None = None,
                 columns: Mapping[str, Sequence] | None = None, extras: Mapping[str, Any] | None = None,
                 group_size: int | None = None) -> RewardOutput:
        """`extras` (see EXTRA_ARGS) reach the in-process and async functions that take them, as they
        are. `group_size` (default: the runner's): completions per prompt, consecutive; a group
        reward is called once per group of them."""
        n = len(completions)
        columns = {k: v for k, v in (columns or {}).items() if k not in RESERVED_COLUMNS}
        if len(prompts) != n:
            raise ValueError(f"RewardRunner: {len(prompts)} prompts for {n} completions (repeat each prompt G times).")
        if completion_ids is not None and len(completion_ids) != n:
            raise ValueError(f"RewardRunner: {len(completion_ids)} completion_ids for {n} completions.")
        for k, v in columns.items():
            if len(v) != n:
                raise ValueError(f"RewardRunner: column {k!r} has {len(v)} values for {n} completions "
                                 "(repeat each row's value G times).")
        g = group_size or self.group_size
        if any(p.groups for p in self._plans) and (not g or n % g):
            names = ", ".join(p.name for p in self._plans if p.groups)
            raise ValueError(f"RewardRunner: the group reward(s) {names} need whole groups: {n} completions in "
                             f"groups of {g} (pass group_size= / set num_generations).")
        if self._checked != frozenset(columns):
            self.check_signature(columns)
        full = {"prompts": list(prompts), "completions": list(completions),
                "completion_ids": list(completion_ids) if completion_ids is not None else None,
                **{k: list(v) for k, v in columns.items()}}

        t_start = time.perf_counter()
        parts: dict[int, list[Part]] = {}
        extras = {"trainer_state": None, "log_metric": _ignore, "log_extra": _ignore, "num_generations": g,
                  **(extras or {})}
        # (plan, first row, end row) of every async call: one per group for a group reward
        async_spans = [(i, s, e) for i, p in enumerate(self._plans) if p.is_async for s, e in self._spans(p, n, g)]
        async_calls = [(k, self._plans[i].fn, {**self._kwargs(self._plans[i], full, s, e),
                                               **self._extras(self._plans[i], extras)}, e - s)
                       for k, (i, s, e) in enumerate(async_spans)]
        pool_idx = [i for i, p in enumerate(self._plans) if p.in_pool]
        helpers = []
        if async_calls:
            def run_all():
                out: dict[int, list[Part]] = {}
                for k, part in run_async(async_calls, self.timeout).items():
                    i, s, e = async_spans[k]
                    out.setdefault(i, []).append(dataclasses.replace(part, start=s, stop=e))
                return out

            helpers.append(self._in_thread(run_all, parts))
        if pool_idx:
            helpers.append(self._in_thread(lambda: self._run_pool(pool_idx, full, n, g), parts))
        for i, plan in enumerate(self._plans):
            if plan.is_async or plan.in_pool:
                continue
            parts[i] = []
            for s, e in self._spans(plan, n, g):
                t0 = time.perf_counter()
                status, value, cause = call_with_timeout(plan.fn, {**self._kwargs(plan, full, s, e),
                                                                   **self._extras(plan, extras)}, self.timeout,
                                                         plan.name)
                parts[i].append(Part(s, e, status, value if status == "ok" else None,
                                     value if status == "error" else "", cause, time.perf_counter() - t0))
        for t, box in helpers:
            t.join()
            if "error" in box:
                raise box["error"]
        return self._assemble(parts, n, time.perf_counter() - t_start)

    @staticmethod
    def _spans(plan: _Plan, n: int, g: int | None) -> list[tuple[int, int]]:
        """The row ranges one function is called on: every group for a group reward, else all rows."""
        if plan.groups and g:
            return [(s, s + g) for s in range(0, n, g)]
        return [(0, n)]

    @staticmethod
    def _in_thread(work: Callable[[], dict], into: dict) -> tuple[threading.Thread, dict]:
        box: dict[str, Any] = {}

        def target():
            try:
                into.update(work())
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                box["error"] = e

        t = threading.Thread(target=target, daemon=True, name="grpokit-reward-helper")
        t.start()
        return t, box

    @staticmethod
    def _extras(plan: _Plan, extras: dict) -> dict:
        return {k: v for k, v in extras.items() if plan.pass_all or k in plan.accepted}

    def _kwargs(self, plan: _Plan, full: dict, start: int, stop: int) -> dict:
        keys = full.keys() if plan.pass_all else [k for k in full if k in plan.accepted]
        return {k: (full[k][start:stop] if full[k] is not None else None) for k in keys}

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = self.chunk_size or max(1, math.ceil(n / (2 * self.num_workers)))
        if self.group_size:
            size = math.ceil(size / self.group_size) * self.group_size
        return [(s, min(n, s + size)) for s in range(0, n, size)]

    def _run_pool(self, idx: list[int], full: dict, n: int, g: int | None = None) -> dict[int, list[Part]]:
        if self._pool is None:
            self._pool = WorkerPool(self.num_workers)
        tasks: list[PoolTask] = []
        for i in idx:
            payload = self._plans[i].payload
            assert payload is not None  # a plan runs in the pool only with a payload (see __init__)
            plan = self._plans[i]
            size = self._extras(plan, {"num_generations": g})  # an int crosses to a worker; the other extras do not
            tasks += [PoolTask(f"{self._uid}:{i}", payload, {**self._kwargs(plan, full, s, e), **size},
                               self.timeout, (i, s, e))
                      for s, e in (self._spans(plan, n, g) if plan.groups else self._chunks(n))]
        out: dict[int, list[Part]] = {i: [] for i in idx}
        for r in self._pool.run(tasks):
            i, s, e = r.task.tag
            msg = f"{r.error}\n{r.traceback}" if r.traceback else r.error
            out[i].append(Part(s, e, r.status, r.value, msg, None, r.seconds))
        return out

    # ---- checking and stacking ----
    def _assemble(self, parts: dict[int, list[Part]], n: int, seconds: float) -> RewardOutput:
        f = len(self._plans)
        per_func = torch.full((n, f), float("nan"), dtype=torch.float32)
        stats: dict[str, float] = {}
        errors: list[dict] = []
        for j, plan in enumerate(self._plans):
            n_err = n_timeout = 0
            for part in parts[j]:
                rows = list(range(part.start, part.stop))
                if part.status == "ok":
                    values, bad = self._check_values(plan.name, part.value, part.start, part.stop)
                    per_func[part.start:part.stop, j] = torch.tensor(values, dtype=torch.float32)
                    if bad:
                        n_err += len(bad)
                        self._policy(plan.name, "nonfinite", bad, f"returned non-finite values at rows {bad} "
                                     "(return None for 'not applicable')", None, per_func, j, errors)
                elif part.status == "timeout":
                    n_timeout += len(rows)
                    self._policy(plan.name, "timeout", rows, f"did not finish within {self.timeout} s",
                                 None, per_func, j, errors)
                else:
                    n_err += len(rows)
                    first, _, detail = part.error.partition("\n")
                    self._policy(plan.name, "error", rows, f"raised {first}", part.cause, per_func, j, errors, detail)
            mean, std, frac_nan = _nan_stats(per_func[:, j].tolist())
            stats[f"rewards/{plan.name}/mean"] = mean
            stats[f"rewards/{plan.name}/std"] = std
            stats[f"rewards/{plan.name}/frac_none"] = frac_nan
            stats[f"rewards/{plan.name}/errors"] = float(n_err)
            stats[f"rewards/{plan.name}/timeouts"] = float(n_timeout)
            stats[f"rewards/{plan.name}/seconds"] = sum(p.seconds for p in parts[j])
        w = torch.tensor(self.weights, dtype=torch.float32)
        all_nan = torch.isnan(per_func).all(dim=1)
        total = torch.nansum(per_func * w, dim=1)
        total[all_nan] = float("nan")
        if bool(all_nan.any()) and not self._warned_all_none:
            logger.warning("every reward function returned None for rows %s; they get no advantage (set a "
                           "reward that applies to every row).", all_nan.nonzero().flatten().tolist()[:10])
            self._warned_all_none = True
        stats["rewards/errors"] = float(sum(stats[f"rewards/{p.name}/errors"] for p in self._plans))
        stats["rewards/timeouts"] = float(sum(stats[f"rewards/{p.name}/timeouts"] for p in self._plans))
        stats["rewards/total/mean"], stats["rewards/total/std"], stats["rewards/frac_all_none"] = _nan_stats(
            total.tolist())
        stats["rewards/seconds"] = seconds
        return RewardOutput(list(self.names), per_func, total, stats, errors)

    @staticmethod
    def _check_values(name: str, value: Any, start: int, stop: int) -> tuple[list[float], list[int]]:
        n = stop - start
        if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
            value = value.tolist() if getattr(value, "ndim", 1) == 1 else value
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
            raise ValueError(f"reward function {name!r} returned {type(value).__name__}; it must return a list with "
                             f"one float (or None) per completion.")
        if len(value) != n:
            raise ValueError(f"reward function {name!r} returned {len(value)} values for {n} completions "
                             f"(rows {start}..{stop - 1}).")
        out, bad = [], []
        for i, v in enumerate(value):
            if v is None:
                out.append(float("nan"))
                continue
            if not isinstance(v, numbers.Real) and getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
                v = v.item()
            if not isinstance(v, numbers.Real):
                raise ValueError(f"reward function {name!r} returned {v!r} ({type(v).__name__}) at row {start + i}; "
                                 "expected a float, or None for 'not applicable'.")
            v = float(v)
            if not math.isfinite(v):
                bad.append(start + i)
            out.append(v)
        return out, bad

    def _policy(self, name: str, kind: str, rows: list[int], what: str, cause: BaseException | None,
                per_func: torch.Tensor, j: int, errors: list[dict], detail: str = "") -> None:
        span = f"row {rows[0]}" if len(rows) == 1 else f"rows {rows[0]}..{rows[-1]}"
        message = f"reward function {name!r} {what} ({span})"
        if self.on_error == "raise":
            exc_type = {"timeout": RewardTimeout, "nonfinite": ValueError}.get(kind, RewardError)
            hint = "; set on_error='none' or 'zero' to go on" + (", or raise timeout" if kind == "timeout" else "")
            # an in-process exception is chained as __cause__; a worker's comes as its traceback text
            tail = f"\nin the worker process:\n{detail}" if detail and cause is None else ""
            raise exc_type(message + hint + tail) from cause
        per_func[rows, j] = float("nan") if self.on_error == "none" else 0.0
        logger.warning("%s; counted as %s", message, "None" if self.on_error == "none" else "0.0")
        errors.append({"function": name, "kind": kind, "rows": rows, "message": message, "traceback": detail})

    # ---- lifetime ----
    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
