"""`code`: run the completion's Python against the row's test cases in a sandbox; reward = fraction
of tests passed (or 1/0 with all_or_nothing=True).

The code is the last ```python (or ```py) fenced block of the completion, else the last unlabelled
fenced block; no block -> `no_code_reward` (0.0).

Column `tests` (name set by `tests_column`), one of:
  * a list of assert statements (MBPP style), e.g. ["assert add(1, 2) == 3", "assert add(0, 0) == 0"];
    a string of test code (HumanEval's `def check(candidate): ...` plus `check(add)`) is one test;
  * a list of {"input": str, "output": str} (stdin/stdout, competitive programming style), or
    {"inputs": [...], "outputs": [...]} (APPS / CodeContests style);
  * any of these as a JSON string. None or [] -> None (not applicable: multi-task data).

How a test is graded — never by the sandbox's word:
  * stdin/stdout: the sandbox runs solution.py with the input; the trainer compares the output
    (whitespace-separated tokens must be equal) and requires exit status 0 and no timeout.
  * asserts: the solution is loaded in the sandbox; the *trainer* executes each assert. Every
    name the assert uses that the solution defines (functions, classes, constants) is a proxy:
    calling it runs the call in the sandbox and brings back the result as plain data (numbers,
    strings, lists, dicts, sets, tuples, bytes). Comparisons, `AssertionError`, builtins and the
    standard-library modules the test names are the trainer's own. So exiting early, printing
    "PASSED", patching builtins or the harness, or returning an object whose __eq__ is always True
    cannot pass a test: a non-plain result stays in the sandbox as a handle that refuses ==, bool()
    and hashing. The expected values never enter the sandbox.
Known limits of assert grading: arguments must be plain data (a lambda argument fails the test);
in-place mutation of an argument is not seen by the test; the first timeout ends the session (the
remaining tests fail), so a solution costs at most about `timeout` seconds beyond its start-up.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from grpokit.rewards._sandbox_server import decode, encode
from grpokit.rewards.sandbox import LocalSandbox, SandboxBackend, SandboxError, SandboxLimits
from grpokit.rewards.text import completion_text

__all__ = ["CodeReward", "extract_code", "parse_tests", "RemoteObject"]

logger = logging.getLogger("grpokit.rewards")
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_BUILTIN_NAMES = set(dir(builtins))
STARTUP_SECONDS = 3.0  # allowance for starting the sandbox and its interpreter


def extract_code(text: str, language: str = "python") -> str | None:
    """The last fenced code block in `language` (python also accepts py/python3), else the last
    unlabelled block; None if there is none."""
    aliases = {"python": {"python", "py", "python3"}}.get(language, {language})
    blocks = _FENCE.findall(text)
    tagged = [body for tag, body in blocks if tag.lower() in aliases]
    untagged = [body for tag, body in blocks if not tag]
    chosen = tagged or untagged
    return chosen[-1] if chosen else None


def parse_tests(value) -> tuple[str, list] | None:
    """A `tests` cell -> ("assert", [code, ...]) | ("io", [(stdin, expected_stdout), ...]) | None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            decoded = json.loads(value)
        except ValueError:
            return ("assert", [value]) if value.strip() else None
        return parse_tests(decoded) if not isinstance(decoded, str) else ("assert", [decoded])
    if isinstance(value, dict):
        if "inputs" in value and "outputs" in value:
            ins, outs = list(value["inputs"]), list(value["outputs"])
            if len(ins) != len(outs):
                raise ValueError(f"tests: {len(ins)} inputs but {len(outs)} outputs")
            return ("io", [(str(i), str(o)) for i, o in zip(ins, outs)]) if ins else None
        if "input" in value and "output" in value:
            return "io", [(str(value["input"]), str(value["output"]))]
        raise ValueError(f"tests: a dict needs 'inputs'/'outputs' or 'input'/'output' keys, got {sorted(value)}")
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        if all(isinstance(t, str) for t in value):
            return "assert", list(value)
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in value):
            return "io", [(str(t["input"]), str(t["output"])) for t in value]
    raise ValueError(f"tests: expected a list of assert strings or of {{'input', 'output'}} dicts, "
                     f"got {type(value).__name__}: {str(value)[:80]}")


def _free_names(tree: ast.AST) -> tuple[list[str], set[str]]:
    """Names a test reads but never binds itself (candidates for the solution's namespace), and
    those of them used as `name.attr` (candidates for modules the test means: `math.isclose`)."""
    loads, bound, dotted = [], set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loads.append(node.id) if isinstance(node.ctx, ast.Load) else bound.add(node.id))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            dotted.add(node.value.id)
    free = list(dict.fromkeys(n for n in loads if n not in bound and n not in _BUILTIN_NAMES))
    return free, dotted & set(free)


def _local_module(name: str):
    """The trainer's own module `name` when the test uses `name.attr` and such a module exists; the
    solution cannot stand in for it (a solution defining `math` or `numpy` changes nothing)."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        if name in sys.stdlib_module_names or importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - not importable here: the name is the solution's
        pass
    return None


class RemoteError(Exception):
    """The solution raised in the sandbox (or sent something that is not a valid reply)."""


CONTROL_FLOW_EXCEPTIONS = (StopIteration, StopAsyncIteration, GeneratorExit)
"""Exceptions that Python's own machinery catches (map/filter/zip end at a StopIteration, so
`assert all(map(f, xs))` would pass on a solution that only raises it): never re-raised as such."""


def _remote_exception(type_name: str, message: str) -> Exception:
    """A builtin exception type raised in the sandbox is raised here as (a subclass of) that type,
    so a test that expects `ValueError` sees one; a control-flow exception (StopIteration, ...) or
    anything else is a plain RemoteError, which nothing catches but a test's own `except`."""
    base = getattr(builtins, type_name, None)
    if (isinstance(base, type) and issubclass(base, Exception)
            and not issubclass(base, CONTROL_FLOW_EXCEPTIONS)):
        try:
            return type(type_name, (base, RemoteError), {})(message)
        except TypeError:  # incompatible layout
            pass
    return RemoteError(f"{type_name}: {message}")


class RemoteObject:
    """A value that stayed in the sandbox. Calls, attributes, iteration, len() and [] go there and
    come back as plain data; ==, <, bool() and hash() are refused, so it cannot fake equality."""

    __slots__ = ("_rpc", "_h")

    def __init__(self, rpc, h: int):
        object.__setattr__(self, "_rpc", rpc)
        object.__setattr__(self, "_h", h)

    def __call__(self, *args, **kwargs):
        return self._rpc({"op": "call", "h": self._h, "args": _send(list(args)), "kwargs": _send(kwargs)})

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._rpc({"op": "attr", "h": self._h, "name": name})

    def __iter__(self):
        return iter(self._rpc({"op": "iter", "h": self._h}))

    def __len__(self):
        try:
            n = self._rpc({"op": "len", "h": self._h})
        except RemoteError as e:  # a TypeError lets list() fall back to plain iteration
            raise TypeError(str(e)) from None
        if type(n) is not int:
            raise TypeError("len() of a remote object must be an int")
        return n

    def __getitem__(self, key):
        return self._rpc({"op": "item", "h": self._h, "key": _send(key)})

    def _refuse(self, *args):
        raise TypeError("a result that is not plain data (numbers, strings, lists, dicts, ...) cannot be "
                        "compared or tested for truth")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __hash__ = _refuse

    def __repr__(self):
        return f"<remote object {self._h}>"


def _send(x):
    def handle(obj):
        if isinstance(obj, RemoteObject):
            return object.__getattribute__(obj, "_h")
        raise TypeError(f"cannot pass a {type(obj).__name__} to the sandboxed solution")
    return encode(x, handle)


class _Grader:
    """One sandbox session for one completion."""

    def __init__(self, session, timeout: float):
        self.session, self.timeout = session, timeout
        self.test_deadline = session.deadline

    def rpc(self, msg: dict):
        reply = self.session.request(msg, self.test_deadline)
        if set(reply) == {"ok"}:
            try:
                return decode(reply["ok"], lambda h: RemoteObject(self.rpc, h))
            except (ValueError, TypeError, RecursionError) as e:
                raise RemoteError(f"malformed value from the sandbox: {e}") from None
        err = reply.get("err")
        if isinstance(err, list) and len(err) == 2:
            raise _remote_exception(str(err[0])[:100], str(err[1])[:300])
        raise RemoteError("malformed reply from the sandbox")

    def load(self, mode: str, source: str) -> bool:
        self.test_deadline = time.monotonic() + STARTUP_SECONDS + self.timeout
        try:
            self.rpc({"op": "load", "mode": mode, "source": source})
            return True
        except RemoteError:
            return False

    def run_assert(self, code, tree: ast.AST) -> bool:
        self.test_deadline = time.monotonic() + self.timeout
        namespace = {"__builtins__": builtins, "__name__": "__test__"}
        free, dotted = _free_names(tree)
        for name in free:
            module = _local_module(name) if name in dotted else None
            if module is not None:
                namespace[name] = module
                continue
            try:
                namespace[name] = self.rpc({"op": "get", "name": name})
            except RemoteError:
                pass  # not defined by the solution: a NameError if the test really uses it
        try:
            exec(code, namespace)
            return True
        except SandboxError:
            raise
        except Exception:  # noqa: BLE001 - AssertionError, RemoteError, TypeError, ...: a failed test
            return False

    def run_io(self, stdin: str, expected: str, output_limit: int) -> tuple[bool, bool]:
        """-> (passed, timed_out)"""
        self.test_deadline = time.monotonic() + self.timeout + STARTUP_SECONDS
        try:
            r = self.rpc({"op": "run", "stdin": stdin, "timeout": self.timeout, "output_limit": output_limit})
        except RemoteError:
            return False, False
        if not isinstance(r, dict) or not isinstance(r.get("stdout"), str):
            return False, False
        timed_out = r.get("timed_out") is not False
        return (not timed_out and r.get("exit") == 0 and r["stdout"].split() == expected.split()), timed_out


class CodeReward:
    """Fraction of the row's tests the completion's code passes, run in a sandbox.

    tests_column: the column with the tests (see the module docstring for the formats).
    timeout: wall-clock seconds per test (and per load of the solution).
    sandbox: "local" (LocalSandbox: namespaces, fails closed), "unsafe-local" (no isolation:
             explicit opt-out), or any SandboxBackend (e.g. CommandSandbox for a container).
    max_concurrency: sandboxes at once (default: the number of CPUs).
    memory_bytes, processes, output_limit_bytes: per-sandbox limits: memory of the whole sandbox
             (its cgroup; also RLIMIT_AS per process), processes, captured stdout.
    memory_limit: "cgroup" (LocalSandbox bounds each sandbox with a cgroup and refuses to run
             where it cannot) or "rlimit" (explicit opt-out: per-process RLIMIT_AS only).
    all_or_nothing: 1.0 only if every test passes, else 0.0.
    no_code_reward: the reward of a completion without a code block.
    """

    use_process_pool = False  # runs its sandboxes from threads: they are processes already

    def __init__(self, tests_column: str = "tests", timeout: float = 2.0,
                 sandbox: str | SandboxBackend = "local", max_concurrency: int | None = None,
                 memory_bytes: int = 512 << 20, processes: int = 8, output_limit_bytes: int = 1 << 20,
                 all_or_nothing: bool = False, no_code_reward: float = 0.0, language: str = "python",
                 memory_limit: str = "cgroup"):
        if language != "python":
            raise ValueError(f"code: language={language!r}; only python is supported.")
        if sandbox == "local":
            sandbox = LocalSandbox(memory_limit=memory_limit)
        elif sandbox == "unsafe-local":
            sandbox = LocalSandbox(isolation=False, memory_limit=memory_limit)
        elif isinstance(sandbox, str):
            raise ValueError(f"code: sandbox={sandbox!r}; use 'local', 'unsafe-local' or a SandboxBackend.")
        if hasattr(sandbox, "check"):
            sandbox.check()  # fail closed, before the first step
        self.__name__ = "code"
        self.sandbox, self.tests_column, self.timeout = sandbox, tests_column, float(timeout)
        self.max_concurrency = max_concurrency or os.cpu_count() or 1
        self.memory_bytes, self.processes, self.output_limit = memory_bytes, processes, output_limit_bytes
        self.all_or_nothing, self.no_code_reward = all_or_nothing, float(no_code_reward)
        self._warned: set[str] = set()

    def check_columns(self, columns: set[str]) -> None:
        if self.tests_column not in columns:
            raise ValueError(f"needs the test cases in a column named {self.tests_column!r} (columns: "
                             f"{sorted(columns)}); or set reward_kwargs {{'code': {{'tests_column': ...}}}}.")

    def limits(self, num_tests: int) -> SandboxLimits:
        budget = STARTUP_SECONDS + self.timeout * (num_tests + 1) + 1.0
        return SandboxLimits(wall_seconds=budget, cpu_seconds=math.ceil(budget), memory_bytes=self.memory_bytes,
                             processes=self.processes, file_size_bytes=max(self.output_limit + 1, 16 << 20))

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float | None]:
        if self.tests_column not in columns:
            self.check_columns(set(columns))
        jobs = [self._prepare(i, completion_text(c), t) for i, (c, t) in enumerate(zip(completions,
                                                                                       columns[self.tests_column]))]
        with ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="grpokit-code") as pool:
            return list(pool.map(lambda job: job if not isinstance(job, tuple) else self.grade(*job), jobs))

    def _prepare(self, row: int, text: str, tests):
        try:
            parsed = parse_tests(tests)
        except ValueError as e:
            raise ValueError(f"row {row}: {e}") from None
        if parsed is None:
            return None
        kind, cases = parsed
        if kind == "assert":
            compiled = []
            for k, src in enumerate(cases):
                try:
                    tree = ast.parse(src)
                    compiled.append((compile(tree, f"<test {k}>", "exec"), tree))
                except SyntaxError as e:
                    if src not in self._warned:
                        self._warned.add(src)
                        logger.warning("code: test %d of row %d does not compile (%s); the row gets None.", k, row, e)
                    return None
            cases = compiled
        code = extract_code(text)
        if code is None:
            return self.no_code_reward
        return code, kind, cases

    def grade(self, code: str, kind: str, cases: list) -> float:
        """Fraction of `cases` passed by `code` (see the module docstring)."""
        passed = 0
        session = self.sandbox.start(self.limits(len(cases)))
        grader = _Grader(session, self.timeout)
        try:
            if grader.load(kind, code):
                for case in cases:
                    if kind == "assert":
                        ok = grader.run_assert(*case)
                        timed_out = False
                    else:
                        ok, timed_out = grader.run_io(case[0], case[1], self.output_limit)
                    passed += ok
                    if timed_out:
                        break
        except SandboxError:  # timed out, died, or spoke nonsense: the remaining tests fail
            pass
        finally:
            session.close()
        if self.all_or_nothing:
            return float(passed == len(cases))
        return passed / len(cases)
