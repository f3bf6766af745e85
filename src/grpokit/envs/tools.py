"""Running the tool calls of a rollout: every call of every sample at once, each with a deadline.

Synchronous tools run in a thread pool, `async def` ones on one event loop in a helper thread;
a call that raises gives its error as the tool's result (`{'error': '...'}`, as TRL) and is
counted as a failure, a call past its deadline gives a timeout error, counted too (its thread is
abandoned and told to raise at its next Python bytecode, as the reward runner does). Nothing a
tool does stops the rollout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Callable

from grpokit.rewards.calls import RewardTimeout, raise_in_thread

OK, FAILED, TIMEOUT = "ok", "failed", "timeout"


@dataclass
class ToolResult:
    name: str
    content: Any            # what goes into the tool message (a string, or a list of content parts)
    status: str             # OK | FAILED | TIMEOUT


def tool_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def is_async_tool(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class ToolRunner:
    """Runs tool calls concurrently; `submit` returns at once, `result` waits (up to the deadline)."""

    def __init__(self, timeout: float | None = 60.0, max_workers: int = 32):
        self.timeout = timeout
        self.max_workers = max_workers
        self._pool: cf.ThreadPoolExecutor | None = None   # made on first use (again after close)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

    def _workers(self) -> cf.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="grpokit-tool")
        return self._pool

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpokit-tool-loop", daemon=True)
            self._loop_thread.start()
        return self._loop

    def submit(self, tools: dict[str, Callable], call: dict) -> "PendingCall":
        """Start one call `{"type": "function", "function": {"name", "arguments"}}` on `tools`."""
        started = time.perf_counter()
        fn_spec = call.get("function", call) if isinstance(call, dict) else {}
        name = str(fn_spec.get("name", "unknown"))
        if isinstance(call, dict) and call.get("type", "function") != "function":
            return PendingCall(name, done=ToolResult(name, {"error": f"Unsupported tool call type: {call.get('type')}"},
                                                     FAILED))
        fn = tools.get(name)
        if fn is None:
            return PendingCall(name, done=ToolResult(name, {"error": f"Tool {name} not found."}, FAILED))
        args = fn_spec.get("arguments") or {}
        if not isinstance(args, dict):
            return PendingCall(name, done=ToolResult(name, {"error": f"arguments of {name} must be an object"}, FAILED))
        if is_async_tool(fn):
            coro = _guarded(fn, args)
            if not inspect.isawaitable(coro):
                return PendingCall(name, done=coro)
            return PendingCall(name, future=asyncio.run_coroutine_threadsafe(coro, self._event_loop()),
                               started=started, is_async=True)
        holder: dict[str, Any] = {}

        def run():
            holder["thread"] = threading.current_thread()
            return fn(**args)

        return PendingCall(name, future=self._workers().submit(run), started=started, holder=holder)

    def result(self, pending: "PendingCall") -> ToolResult:
        if pending.done is not None:
            return pending.done
        left = None if self.timeout is None else max(0.0, self.timeout - (time.perf_counter() - pending.started))
        try:
            value = pending.future.result(timeout=left)
        except (cf.TimeoutError, TimeoutError):
            pending.future.cancel()
            thread = (pending.holder or {}).get("thread")
            if thread is not None:
                raise_in_thread(thread, RewardTimeout)
            return ToolResult(pending.name, {"error": f"{pending.name} timed out after {self.timeout:g} s"}, TIMEOUT)
        except Exception as e:  # noqa: BLE001 - the tool's error is its result
            return ToolResult(pending.name, {"error": str(e)}, FAILED)
        if isinstance(value, ToolResult):
            return value
        return ToolResult(pending.name, value, OK)

    def close(self, wait: float = 1.0) -> None:
        """Stop the workers: idle ones exit at once; a tool still running past its deadline is
        left behind after `wait` seconds (a thread cannot be killed)."""
        threads = list(getattr(self._pool, "_threads", ()))
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            threads.append(self._loop_thread)
        self._pool, self._loop, self._loop_thread = None, None, None
        end = time.perf_counter() + wait
        for t in threads:
            t.join(max(0.0, end - time.perf_counter()))


async def _awaiting(fn, args):
    return await fn(**args)


def _guarded(fn, args) -> Coroutine[Any, Any, Any] | ToolResult:
    try:
        return _awaiting(fn, args)
    except Exception as e:  # noqa: BLE001
        return ToolResult(tool_name(fn), {"error": str(e)}, FAILED)


@dataclass
class PendingCall:
    name: str
    future: Any = None
    started: float = 0.0
    done: ToolResult | None = None
    holder: dict | None = None
    is_async: bool = False
