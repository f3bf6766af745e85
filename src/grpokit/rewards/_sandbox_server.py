"""The process that runs model-written code. It holds no secret and decides nothing.

Run inside the sandbox as `python -I -S -B server.py`; stdin/stdout are a framed channel to the
trainer (4-byte big-endian length + UTF-8 JSON). Requests:

  {"op": "ping"}                                  -> {"ok": true}
  {"op": "load", "mode": "assert"|"io", "source"} -> assert: exec the source in a namespace here;
                                                     io: write it to solution.py
  {"op": "get", "name"}                           -> the value bound to `name` in the namespace
  {"op": "call", "h", "args", "kwargs"}           -> call remote object `h`
  {"op": "attr"|"iter"|"len"|"item", "h", ...}    -> getattr / list(obj) / len / obj[key]
  {"op": "run", "stdin", "timeout", "output_limit"} -> run solution.py in a fresh process

Replies are {"ok": value} or {"err": [exception type, message]}. Values cross the channel as
plain data (None, bool, int, float, str, bytes, complex, list, tuple, dict, set, frozenset);
anything else stays here and is referred to by a handle {"$h": n}. The *tests are never sent
here*: the trainer evaluates each assert itself on the plain data returned, so nothing this process
does (exit codes, prints, patched builtins, forged replies) can turn a wrong answer into a pass.

A run's output is what its own process tree wrote to a pipe that only this process reads, and
it is read only once every process of the run is gone: after the program exits (or times out) its
process group is killed, then every other process it left behind (a `setsid` daemon, a process in
another group, the threads of an exited leader) is ended — by the sandbox's init, which sees the
whole pid namespace, or, where there is none (`LocalSandbox(isolation=False)`, a container), by
this process itself, a child subreaper that walks /proc for its descendants — and only then are
the pipes drained. Nothing has a path to the output: a daemon can neither rewrite nor replace it,
only append to it while the run lasts. This process is not dumpable, so the code it runs (same
uid) cannot trace it, read its memory or open its descriptors through /proc/<pid>/fd.

This file is also imported by the trainer for `encode`/`decode` (the only shared code).
"""

from __future__ import annotations

import base64
import json
import math
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess

MAX_DEPTH = 64
MAX_SAME_HASH = 64
"""A set, frozenset or dict arriving from the sandbox whose elements (keys) share one hash more
often than this is refused: ints hash to themselves modulo 2**61 - 1, so a solution can send
thousands of distinct values with one hash, and building a hash table of n of them takes n**2
comparisons in one C call that no deadline or signal interrupts. Counting the hashes first
costs one pass (the counts are keyed by distinct hash values, which do not collide)."""


def _spread_hashes(items: list) -> list:
    """`items` unchanged if hashing them stays linear; ValueError if too many share one hash."""
    counts: dict[int, int] = {}
    for item in items:
        h = hash(item)  # TypeError for an unhashable element, as the set itself would raise
        counts[h] = counts.get(h, 0) + 1
        if counts[h] > MAX_SAME_HASH:
            raise ValueError(f"more than {MAX_SAME_HASH} elements share one hash")
    return items


def encode(x, handle=None, depth=0):
    """Python value -> JSON-able tagged data; `handle(obj)` makes a handle for other objects."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if x is None or isinstance(x, bool):
        return x if x is None else bool(x)
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        f = float(x)
        return f if math.isfinite(f) else {"$f": repr(f)}
    if isinstance(x, str):
        return str(x)
    if isinstance(x, (bytes, bytearray)):
        return {"$b": base64.b64encode(bytes(x)).decode("ascii")}
    if isinstance(x, complex):
        return {"$c": [encode(x.real, None, d), encode(x.imag, None, d)]}
    if isinstance(x, tuple):
        return {"$t": [encode(v, handle, d) for v in x]}
    if isinstance(x, list):
        return [encode(v, handle, d) for v in x]
    if isinstance(x, dict):
        return {"$d": [[encode(k, handle, d), encode(v, handle, d)] for k, v in x.items()]}
    if isinstance(x, frozenset):
        return {"$fs": [encode(v, handle, d) for v in x]}
    if isinstance(x, set):
        return {"$s": [encode(v, handle, d) for v in x]}
    if handle is None:
        raise TypeError(f"cannot send a {type(x).__name__} object")
    return {"$h": handle(x)}


def decode(x, resolve=None, depth=0):
    """Inverse of `encode`, strict: anything unexpected raises ValueError/TypeError."""
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    d = depth + 1
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is list:
        return [decode(v, resolve, d) for v in x]
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value")
    (tag, v), = x.items()
    if tag == "$f" and v in ("nan", "inf", "-inf"):
        return float(v)
    if tag == "$b" and type(v) is str:
        return base64.b64decode(v.encode("ascii"), validate=True)
    if tag == "$c" and type(v) is list and len(v) == 2:
        re_, im = (decode(p, None, d) for p in v)
        if type(re_) is not float or type(im) is not float:
            raise ValueError("malformed complex")
        return complex(re_, im)
    if tag == "$h" and type(v) is int and resolve is not None:
        return resolve(v)
    if type(v) is not list:
        raise ValueError("malformed value")
    if tag == "$t":
        return tuple(decode(i, resolve, d) for i in v)
    if tag == "$s":
        return set(_spread_hashes([decode(i, resolve, d) for i in v]))
    if tag == "$fs":
        return frozenset(_spread_hashes([decode(i, resolve, d) for i in v]))
    if tag == "$d":
        if any(type(pair) is not list or len(pair) != 2 for pair in v):
            raise ValueError("malformed dict item")
        keys = _spread_hashes([decode(pair[0], resolve, d) for pair in v])
        return dict(zip(keys, (decode(pair[1], resolve, d) for pair in v), strict=True))
    raise ValueError(f"unknown tag {tag!r}")


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
STDERR_KEEP = 2000       # bytes of a run's stderr sent back (diagnostics only)
END_RUN_SECONDS = 2.0    # how long ending a run's processes may take before the run is refused


def _prctl(option: int, arg: int) -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                               ctypes.c_ulong(0)) == 0)
    except (ImportError, OSError, AttributeError):
        return False


def _stat(pid: str) -> tuple[str, int] | None:
    """(state letter, parent pid) of /proc/<pid>, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode("ascii", "replace").rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid: int, state: str) -> bool:
    """True unless every thread of `pid` has exited: a thread-group leader that exited alone shows
    state Z while its other threads run on."""
    if state not in "ZX":
        return True
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    return any((_stat(f"{pid}/task/{t}") or ("Z", 0))[0] not in "ZX" for t in tasks)


def _descendants(root: int) -> list[tuple[int, int, bool]]:
    """(pid, parent pid, running) of every process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(name)
            if st is not None:
                states[int(name)] = st[0]
                children.setdefault(st[1], []).append(int(name))
    out, todo = [], [root]
    while todo:
        parent = todo.pop()
        for pid in children.get(parent, ()):
            out.append((pid, parent, _running(pid, states[pid])))
            todo.append(pid)
    return out


def _kill_descendant(pid: int, parents: set[int]) -> None:
    """SIGKILL `pid` if its parent is (still) one of `parents` (this process and its descendants):
    through a pidfd where there is one, so that a pid reused meanwhile is never hit."""
    pidfd = None
    try:
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            pidfd = os.pidfd_open(pid)
        st = _stat(str(pid))
        if st is None or st[1] not in parents:
            return
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_descendants(spare: int | None = None) -> None:
    """End every process below this one (a child subreaper: whatever a run orphans, a setsid daemon
    included, is reparented here, so nothing leaves the tree) and reap the zombies among its
    children, except `spare` (the run's main process, whose status its Popen collects). Raises
    RuntimeError if some still run after END_RUN_SECONDS."""
    me = os.getpid()
    deadline = time.monotonic() + END_RUN_SECONDS
    while True:
        tree = _descendants(me)
        running = [pid for pid, _, alive in tree if alive]
        parents = {me, *(pid for pid, _, _ in tree)}
        for pid in running:
            _kill_descendant(pid, parents)
        for pid, parent, _ in tree:
            if parent == me and pid != spare:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
        if not running:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not end the run's processes {running}")
        time.sleep(0.001)


def _anonymous_file(directory: str, data: bytes) -> int:
    """A readable descriptor of `data` in a file with no name (nothing can open or replace it)."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        path = os.path.join(directory, f".in-{os.urandom(8).hex()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_into(fd: int, buf: bytearray, keep: int) -> bool:
    """Read what `fd` has now into `buf` (beyond `keep` bytes it is read and dropped, so the writer
    never blocks); False at end of file."""
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except InterruptedError:
            continue
        if not data:
            return False
        if len(buf) < keep:
            buf += data[:keep - len(buf)]


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the program has exited, leaving it a zombie (not reaped): its pid, and so its
    process group's id, cannot be reused before the group is killed."""
    if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
        try:
            return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    return proc.poll() is not None


def run_program(argv: list[str], workdir: str, stdin: bytes, timeout: float, output_limit: int,
                end_run: Callable[[int], None]) -> dict:
    """Run `argv` with `stdin`; its stdout/stderr go to pipes only this process reads. When the
    program has exited (or timed out) its group is killed, `end_run(main_pid)` ends every other
    process it left, and only then are the pipes drained: the output is final before it is read."""
    import subprocess

    fd_in = _anonymous_file(workdir, stdin)
    try:
        proc = subprocess.Popen(argv, stdin=fd_in, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                                start_new_session=True)
    finally:
        os.close(fd_in)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): (out, output_limit + 1), proc.stderr.fileno(): (err, STDERR_KEEP)}
    for fd in streams:
        os.set_blocking(fd, False)
    pidfd = None
    try:
        pidfd = os.pidfd_open(proc.pid)  # readable when the program exits
    except (AttributeError, OSError):
        pass
    deadline = time.monotonic() + timeout
    timed_out, open_fds = False, set(streams)
    try:
        while not _exited(proc):
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            waits = [*open_fds, *([pidfd] if pidfd is not None else [])]
            ready, _, _ = select.select(waits, [], [], left if pidfd is not None else min(left, 0.005))
            if pidfd is not None and pidfd in ready:  # exited but not yet waitable (traced): poll
                os.close(pidfd)
                pidfd = None
            for fd in ready:
                if fd in open_fds and not _read_into(fd, *streams[fd]):
                    open_fds.discard(fd)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the program and its process group
        except OSError:
            pass
        end_run(proc.pid)  # every other process of the run, in any group or session
        code = proc.wait()
        # no process of the run is left to write: what the pipes hold is all the output there is
        for fd, (buf, keep) in streams.items():
            _read_into(fd, buf, keep)
    finally:
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    return {"stdout": bytes(out[:output_limit]).decode("utf-8", "replace"), "truncated": len(out) > output_limit,
            "exit": code, "timed_out": timed_out, "stderr": bytes(err).decode("utf-8", "replace")}


def _serve():
    # the code this process runs has its uid: it may not trace it, read its memory or open its
    # descriptors (the channel, a run's output pipes) through /proc/<pid>/fd
    if sys.platform.startswith("linux") and not _prctl(PR_SET_DUMPABLE, 0):
        sys.stderr.write("sandbox server: cannot make itself non-dumpable (prctl PR_SET_DUMPABLE)\n")
        sys.exit(3)
    reaper = os.environ.get("GRPOKIT_REAPER")
    # no init to end a run's processes (no pid namespace): this process does it itself, as a child
    # subreaper (whatever a run orphans is reparented here) that finds its descendants in /proc
    subreaper = not reaper and os.path.isdir("/proc/self/task") and _prctl(PR_SET_CHILD_SUBREAPER, 1)

    chan_in, chan_out = os.dup(0), os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # the solution reads EOF on stdin ...
    os.dup2(2, 1)        # ... and its prints go to stderr, never into the channel
    try:
        workdir = os.getcwd()
        probe = os.path.join(workdir, ".w")
        open(probe, "w").close()
        os.remove(probe)
    except OSError:
        import tempfile
        workdir = tempfile.mkdtemp()
    namespace = {"__name__": "__solution__", "__builtins__": __builtins__}
    handles = {}

    def handle(obj):
        handles[len(handles) + 1] = obj
        return len(handles)

    def send(obj):
        data = json.dumps(obj).encode()
        data = struct.pack(">I", len(data)) + data
        while data:
            data = data[os.write(chan_out, data):]

    def value(x):
        return {"ok": encode(x, handle)}

    reap_fds = [int(fd) for fd in reaper.split(",")] if reaper else []

    def end_run(main_pid: int) -> None:
        """End every process of a run but this one, and wait until they are gone: the sandbox's
        init does it where there is one (it sees the whole pid namespace); else this process, a
        subreaper, kills its descendants; else (no /proc) only the run's process group was ended."""
        if reap_fds:
            os.write(reap_fds[0], b"r")
            if os.read(reap_fds[1], 1) != b"k":
                raise RuntimeError("the sandbox's init could not end the run's processes")
        elif subreaper:
            kill_descendants(spare=main_pid)

    def run_io(stdin: str, timeout: float, output_limit: int) -> dict:
        result = run_program([sys.executable, "-I", "-S", "-B", "solution.py"], workdir, stdin.encode(),
                             timeout, output_limit, end_run)
        if subreaper:
            kill_descendants()  # the main process's zombie is collected by now: nothing is spared
        while True:  # zombies of children the run made this process's own (clone with CLONE_PARENT)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        return result

    while True:
        try:
            n, = struct.unpack(">I", _read_exact(chan_in, 4))
            msg = json.loads(_read_exact(chan_in, n))
        except EOFError:
            return
        op = msg.get("op")
        try:
            if op == "ping":
                reply = {"ok": True}
            elif op == "load":
                if msg["mode"] == "assert":
                    exec(compile(msg["source"], "solution.py", "exec"), namespace)
                else:
                    with open(os.path.join(workdir, "solution.py"), "w") as f:
                        f.write(msg["source"])
                reply = {"ok": True}
            elif op == "get":
                reply = value(namespace[msg["name"]]) if msg["name"] in namespace else \
                    {"err": ["NameError", f"name {msg['name']!r} is not defined"]}
            elif op == "call":
                args = decode(msg["args"], handles.__getitem__)
                kwargs = decode(msg["kwargs"], handles.__getitem__)
                reply = value(handles[msg["h"]](*args, **kwargs))
            elif op == "attr":
                reply = value(getattr(handles[msg["h"]], msg["name"]))
            elif op == "iter":
                reply = value(list(handles[msg["h"]]))
            elif op == "len":
                reply = value(len(handles[msg["h"]]))
            elif op == "item":
                reply = value(handles[msg["h"]][decode(msg["key"], handles.__getitem__)])
            elif op == "run":
                reply = value(run_io(msg["stdin"], msg["timeout"], msg["output_limit"]))
            else:
                reply = {"err": ["ProtocolError", f"unknown op {op!r}"]}
        except BaseException as e:  # noqa: BLE001 - SystemExit from the solution included
            reply = {"err": [type(e).__name__, str(e)[:500]]}
        try:
            send(reply)
        except (TypeError, ValueError, RecursionError) as e:
            send({"err": [type(e).__name__, str(e)[:500]]})


if __name__ == "__main__":
    _serve()
