"""A small process pool for CPU-bound reward functions, with a wall-clock timeout per call.

`concurrent.futures` cannot stop a running task, so a reward stuck in sympy would hold its worker
for ever. Here every call has a deadline; a worker that misses it is killed (SIGKILL) and replaced
on the next call, and only that call's rows are marked as timed out. A worker that dies (segfault,
`os._exit`, out of memory) turns into an error for its call, never a hang.

Workers are fresh interpreters (`python -m grpokit.rewards.pool <fd>`, talking over a socketpair),
not forks: nothing of the trainer (CUDA context, threads, locks) is inherited, and, unlike
multiprocessing's spawn/forkserver, the user's main script is never re-run, so an unguarded
TRL-style script is safe. A worker gets the trainer's sys.path and caches each function it is sent
(pickled once per worker: module-level functions, partials of them, instances of module-level
classes); unpickling, and so importing, is not part of a call's timed window (AccuracyReward warms
math-verify up when it is unpickled). Functions defined in `__main__` cannot be rebuilt there;
RewardRunner keeps those in its own process.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from grpokit.rewards.registry import REWARD_REGISTRY
from grpokit.rewards.registry import resolve_reward as _resolve

__all__ = ["WorkerPool", "PoolTask", "PoolResult", "payload_for"]

LOAD_TIMEOUT = 300.0  # seconds a worker may spend unpickling (importing) a function before its first call


class _FromRegistry:
    """Picklable stand-in for a function that cannot be pickled but was chosen by name or path."""

    def __init__(self, spec: str, kwargs: dict):
        self.spec, self.kwargs, self._fn = spec, kwargs, None

    def __getstate__(self):
        return {"spec": self.spec, "kwargs": self.kwargs, "_fn": None}

    def __call__(self, **kw):
        if self._fn is None:
            self._fn = _resolve(self.spec, self.kwargs)
        return self._fn(**kw)


def payload_for(fn: Callable) -> bytes | None:
    """The pickle a worker rebuilds `fn` from; None if it cannot be sent (a worker is a fresh
    interpreter: it can import modules, but not the trainer's `__main__`)."""
    try:
        payload = pickle.dumps(fn)
        if b"__main__" not in payload:
            return payload
    except Exception:
        pass
    spec = getattr(fn, "__grpokit_spec__", None)
    if spec is None:
        return None
    entry = REWARD_REGISTRY.get(spec[0], spec[0])
    # a worker can rebuild it only from an import: a built-in name or a "module:function" path
    if isinstance(entry, str) and not entry.startswith("__main__"):
        return pickle.dumps(_FromRegistry(*spec))
    return None


@dataclass
class PoolTask:
    key: str                  # identifies the function (its pickle is sent once per worker)
    payload: bytes            # pickle of the function
    kwargs: dict              # the call's keyword arguments (one chunk of the batch)
    timeout: float | None     # wall-clock seconds allowed once the call has started
    tag: Any = None           # caller's bookkeeping (function index, row range)


@dataclass
class PoolResult:
    task: PoolTask
    status: str               # "ok" | "error" | "timeout"
    value: Any = None         # the function's return value when ok
    error: str = ""           # "ExcType: message" when error
    traceback: str = ""
    seconds: float = 0.0


@dataclass
class _Worker:
    proc: Any
    conn: Any
    known: set = field(default_factory=set)
    task: PoolTask | None = None
    started: float = 0.0
    loading: bool = False


def _worker_main(conn) -> None:  # runs in the worker process
    import importlib

    path, preload = conn.recv()
    sys.path[:] = path
    for module in preload:
        importlib.import_module(module)
    cache: dict[str, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        key, payload, kwargs = msg
        t0 = time.perf_counter()
        try:
            if key not in cache:  # importing the function's module is not part of the timed call
                cache[key] = pickle.loads(payload)
            conn.send(("started",))
            t0 = time.perf_counter()
            value = cache[key](**kwargs)
            if not isinstance(value, (list, tuple)):
                value = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else value
            out = ("ok", value, "", "", time.perf_counter() - t0)
            conn.send(out)
            continue
        except BaseException as e:  # noqa: BLE001 - report everything, the parent decides
            out = ("error", None, f"{type(e).__name__}: {e}", traceback.format_exc(limit=8),
                   time.perf_counter() - t0)
        try:
            conn.send(out)
        except Exception as e:  # an unpicklable return value or exception
            conn.send(("error", None, f"could not send the result back: {type(e).__name__}: {e}", "",
                       time.perf_counter() - t0))


class WorkerPool:
    """`num_workers` processes; `run(tasks)` returns one `PoolResult` per task, in order."""

    def __init__(self, num_workers: int, preload: tuple[str, ...] = ()):
        if num_workers < 1:
            raise ValueError(f"WorkerPool needs num_workers >= 1, got {num_workers}")
        self.num_workers, self.preload = num_workers, tuple(preload)
        self._workers: list[_Worker] = []
        self._owner_pid = os.getpid()

    def _start_worker(self) -> _Worker:
        parent, child = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # holds grpokit/
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, "-m", "grpokit.rewards.pool", str(child.fileno())],
                                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        child.close()
        conn = Connection(parent.detach())
        conn.send((list(sys.path), self.preload))
        return _Worker(proc=proc, conn=conn)

    def _kill(self, w: _Worker) -> None:
        try:
            w.proc.kill()
        except Exception:
            pass
        try:
            w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        w.conn.close()
        self._workers.remove(w)

    def run(self, tasks: list[PoolTask]) -> list[PoolResult]:
        results: dict[int, PoolResult] = {}
        pending = deque(enumerate(tasks))
        busy: dict[Any, tuple[int, _Worker, PoolTask]] = {}  # by the worker's connection
        while pending or busy:
            while pending and len(busy) < self.num_workers:
                for dead in [w for w in self._workers if w.task is None and w.proc.poll() is not None]:
                    self._kill(dead)
                idle = [w for w in self._workers if w.task is None]
                w = idle[0] if idle else self._start_worker()
                if not idle:
                    self._workers.append(w)
                i, task = pending.popleft()
                try:
                    w.conn.send((task.key, b"" if task.key in w.known else task.payload, task.kwargs))
                except (OSError, BrokenPipeError):  # the worker died while idle: replace it, retry
                    self._kill(w)
                    pending.appendleft((i, task))
                    continue
                w.known.add(task.key)
                # the deadline starts when the worker reports "started" (function loaded); loading
                # itself (importing the function's module) gets LOAD_TIMEOUT
                w.task, w.started, w.loading = task, time.monotonic(), True
                busy[w.conn] = (i, w, task)
            now = time.monotonic()
            deadlines = [w.started + limit for _, w, task in busy.values()
                         if (limit := self._limit(w, task)) is not None]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            for conn in wait(list(busy), timeout=wait_s):
                i, w, task = busy[conn]
                try:
                    msg = w.conn.recv()
                    if msg == ("started",):
                        w.started, w.loading = time.monotonic(), False
                        continue
                    busy.pop(conn)
                    w.task = None
                    status, value, err, tb, secs = msg
                    results[i] = PoolResult(task, status, value, err, tb, secs)
                except (EOFError, OSError):
                    busy.pop(conn)
                    try:
                        code = w.proc.wait(timeout=1)
                    except subprocess.TimeoutExpired:
                        code = None
                    results[i] = PoolResult(task, "error", error=f"WorkerDied: the worker process exited "
                                            f"(exit code {code}) during the call", seconds=time.monotonic() - w.started)
                    self._kill(w)
            now = time.monotonic()
            for conn, (i, w, task) in list(busy.items()):
                limit = self._limit(w, task)
                if limit is not None and now - w.started >= limit:
                    busy.pop(conn)
                    results[i] = PoolResult(task, "timeout", seconds=now - w.started,
                                            error="loading the function" if w.loading else "")
                    self._kill(w)
        return [results[i] for i in range(len(tasks))]

    @staticmethod
    def _limit(w: _Worker, task: PoolTask) -> float | None:
        return LOAD_TIMEOUT if w.loading else task.timeout

    def close(self) -> None:
        for w in list(self._workers):
            try:
                w.conn.send(None)
            except Exception:
                pass
        for w in list(self._workers):
            try:
                w.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=5)
            w.conn.close()
        self._workers.clear()

    def __del__(self):  # best effort; RewardRunner.close() is the explicit way
        try:
            if os.getpid() == self._owner_pid:
                self.close()
        except Exception:
            pass


if __name__ == "__main__":  # a worker: python -m grpokit.rewards.pool FD
    _worker_main(Connection(int(sys.argv[1])))
