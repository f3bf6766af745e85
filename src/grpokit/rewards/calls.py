"""Calling reward functions in this process, each with a wall-clock deadline.

In this process: from the main thread (the trainer's case) the function runs inline under a
SIGALRM interval timer whose handler raises `RewardTimeout` (it interrupts sleeps and blocking
system calls too); handing each call to a fresh watchdog thread instead cost 1.4-1.6 ms per call
here while torch's OpenMP threads spin on the cores, against 2 us inline. Off the main thread, or
when the process's real-time interval timer is already armed by someone else, the call runs in a
watchdog thread: it is abandoned at the deadline and a `RewardTimeout` is raised inside it (at
its next Python bytecode; C code finishes first). A reward function that arms SIGALRM itself
(math-verify's own timeouts, which grpokit's math reward switches off) replaces the deadline of
that call with its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class RewardError(RuntimeError):
    """A reward function raised (under on_error="raise"); the original exception is the __cause__."""


class RewardTimeout(RewardError):
    """A reward call missed its wall-clock deadline (under on_error="raise")."""


@dataclass
class Part:  # the outcome of one call on rows [start, stop)
    start: int
    stop: int
    status: str                           # ok | error | timeout
    value: Any = None
    error: str = ""
    cause: BaseException | None = None
    seconds: float = 0.0


def is_async_callable(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


def raise_in_thread(thread: threading.Thread, exc_type: type) -> None:
    """Best effort: make `thread` raise `exc_type` at its next bytecode (CPython)."""
    if thread.ident is not None and thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))


def call_with_timeout(fn: Callable, kwargs: dict, timeout: float | None, name: str) -> tuple[str, Any, Any]:
    """Run `fn(**kwargs)` with a deadline -> ("ok", value, None) | ("error", msg, exc) | ("timeout", ...)."""
    if _can_use_alarm():
        return _call_with_alarm(fn, kwargs, timeout)
    return _call_in_thread(fn, kwargs, timeout, name)


def _can_use_alarm() -> bool:
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))


def _call_with_alarm(fn: Callable, kwargs: dict, timeout: float | None) -> tuple[str, Any, Any]:
    """Inline, in the main thread, with SIGALRM raising `RewardTimeout` at the deadline."""
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            raise RewardTimeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        if timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            value = fn(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaitable(value))
        finally:
            armed[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "ok", value, None
    except RewardTimeout:
        return "timeout", None, None
    except Exception as e:  # noqa: BLE001 - reported with its traceback; KeyboardInterrupt propagates
        return "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}", e
    finally:
        signal.signal(signal.SIGALRM, previous)


def _call_in_thread(fn: Callable, kwargs: dict, timeout: float | None, name: str) -> tuple[str, Any, Any]:
    """In a watchdog thread, abandoned at the deadline (see the module docstring)."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def target():
        try:
            value = fn(**kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaitable(value))
            box["value"] = value
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
            box["tb"] = traceback.format_exc(limit=8)
        finally:
            done.set()

    thread = threading.Thread(target=target, name=f"grpokit-reward-{name}", daemon=True)
    thread.start()
    if not done.wait(timeout):
        raise_in_thread(thread, RewardTimeout)
        return "timeout", None, None
    if "error" in box:
        e = box["error"]
        return "error", f"{type(e).__name__}: {e}\n{box['tb']}", e
    return "ok", box["value"], None


async def _awaitable(x):
    return await x


def run_async(calls: list[tuple[int, Callable, dict, int]], timeout: float | None) -> dict[int, Part]:
    """Run the async calls (index, function, keyword arguments, rows) concurrently; a Part per index."""
    async def one(fn, kw, n):
        t0 = time.perf_counter()
        try:
            value = await asyncio.wait_for(fn(**kw), timeout)
            return Part(0, n, "ok", value, seconds=time.perf_counter() - t0)
        except asyncio.TimeoutError:
            return Part(0, n, "timeout", seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001
            return Part(0, n, "error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}",
                         cause=e, seconds=time.perf_counter() - t0)

    async def main():
        return await asyncio.gather(*(one(fn, kw, n) for _, fn, kw, n in calls))

    return {i: part for (i, *_), part in zip(calls, asyncio.run(main()))}
