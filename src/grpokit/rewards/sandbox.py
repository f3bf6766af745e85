"""Sandboxes that run model-written code: a `SandboxBackend` starts an isolated server process and
returns a `SandboxSession`, a framed request/reply channel to it with a wall-clock deadline.

Backends:
  LocalSandbox     Linux namespaces + chroot + rlimits + an unprivileged uid (see
                   _sandbox_launcher.py). Fails closed: if isolation cannot be set up it raises
                   SandboxUnavailable, unless built with isolation=False (an explicit, logged opt-out).
  CommandSandbox   the hook for containers and remote sandboxes: any command that runs
                   `python -I -S -B -c <server source>` with its stdin/stdout connected, e.g.
                   ["docker", "run", "--rm", "-i", "--network=none", ..., "python:3.11-slim"].
                   Isolation is then the command's job.

Grading never happens in the sandbox (see code.py and _sandbox_server.py), so a backend only has to
contain the code; it is never trusted to report a result.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = ["SandboxLimits", "SandboxSession", "SandboxBackend", "LocalSandbox", "CommandSandbox",
           "SandboxUnavailable", "SandboxError", "SandboxTimeout", "SandboxClosed"]

logger = logging.getLogger("grpokit.rewards")
HERE = Path(__file__).resolve().parent
SERVER_PATH = HERE / "_sandbox_server.py"
LAUNCHER_PATH = HERE / "_sandbox_launcher.py"


class SandboxUnavailable(RuntimeError):
    """Isolation cannot be set up on this machine; nothing was run."""


class SandboxError(RuntimeError):
    """The sandboxed process misbehaved (bad frame, too large a message, ...)."""


class SandboxTimeout(SandboxError):
    """No reply before the deadline."""


class SandboxClosed(SandboxError):
    """The sandboxed process exited (or was killed)."""


@dataclass
class SandboxLimits:
    wall_seconds: float = 10.0          # whole session, enforced by the trainer and by the sandbox's init
    cpu_seconds: int = 10               # RLIMIT_CPU per process
    memory_bytes: int = 1 << 30         # RLIMIT_AS per process (1 GiB)
    file_size_bytes: int = 16 << 20     # RLIMIT_FSIZE: largest file (and stdout capture) a process may write
    disk_bytes: int = 32 << 20          # size of each of the /work and /tmp tmpfs
    processes: int = 16                 # RLIMIT_NPROC for the sandbox's uid (root: one uid per sandbox)
    open_files: int = 64                # RLIMIT_NOFILE
    max_message_bytes: int = 8 << 20    # largest reply the trainer accepts


class SandboxSession:
    """A running sandboxed server. `request(msg, timeout)` -> reply dict; `close()` kills it all."""

    def __init__(self, proc: subprocess.Popen, limits: SandboxLimits, on_close=None):
        self.proc, self.limits, self._on_close = proc, limits, on_close
        self.deadline = time.monotonic() + limits.wall_seconds
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # started with PIPEs
        self._out, self._err = proc.stdout.fileno(), proc.stderr.fileno()
        self._buf = b""
        self._stderr = bytearray()
        self.closed = False

    @property
    def stderr(self) -> str:
        """The last few KB the sandbox wrote to stderr (diagnostics)."""
        return self._stderr.decode("utf-8", "replace")

    def _drain_stderr(self) -> bool:
        data = os.read(self._err, 65536)
        self._stderr += data
        del self._stderr[:-4096]
        return bool(data)

    def send(self, msg: dict, deadline: float | None = None) -> None:
        if self.closed:
            raise SandboxClosed("the sandbox is closed")
        data = json.dumps(msg).encode()
        data = struct.pack(">I", len(data)) + data
        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        deadline = min(deadline or self.deadline, self.deadline)
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxTimeout("timed out sending to the sandbox")
            _, writable, _ = select.select([], [fd], [], left)
            if writable:
                try:
                    data = data[os.write(fd, data[:65536]):]
                except (BrokenPipeError, OSError):
                    raise SandboxClosed("the sandboxed process exited") from None

    def recv(self, deadline: float | None = None) -> dict:
        deadline = min(deadline or self.deadline, self.deadline)
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack(">I", self._buf[:4])
                if n > self.limits.max_message_bytes:
                    raise SandboxError(f"the sandbox sent a {n}-byte message (limit {self.limits.max_message_bytes})")
                if len(self._buf) >= 4 + n:
                    body, self._buf = self._buf[4:4 + n], self._buf[4 + n:]
                    try:
                        msg = json.loads(body)
                    except (ValueError, RecursionError) as e:
                        raise SandboxError(f"the sandbox sent malformed JSON: {e}") from None
                    if not isinstance(msg, dict):
                        raise SandboxError("the sandbox sent a non-object message")
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise SandboxTimeout("no reply from the sandbox before the deadline")
            ready, _, _ = select.select([self._out, self._err], [], [], left)
            if self._err in ready:
                self._drain_stderr()
            if self._out in ready:
                chunk = os.read(self._out, 1 << 20)
                if not chunk:
                    raise SandboxClosed("the sandboxed process exited")
                self._buf += chunk

    def request(self, msg: dict, deadline: float | None = None) -> dict:
        self.send(msg, deadline)
        return self.recv(deadline)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # launcher, sandbox init and all they started
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            logger.error("sandbox process %d did not exit after SIGKILL", self.proc.pid)
        try:
            while self._drain_stderr():
                pass
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if self._on_close is not None:
            self._on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@runtime_checkable
class SandboxBackend(Protocol):
    """Starts one isolated `_sandbox_server.py` process per session.

    `start(limits)` must return a `SandboxSession` (or an object with its `request`, `close` and
    `deadline`) whose process cannot reach the network, the trainer's files or the trainer's
    processes, and is killed — with everything it started — by `close()` or when `limits.wall_seconds`
    has passed.
    """

    def start(self, limits: SandboxLimits) -> SandboxSession: ...


CGROUP_MOUNTS = "/sys/fs/cgroup"
MEMORY_LIMITS = ("cgroup", "rlimit")


class SandboxCgroup:
    """One sandbox's memory and process bound: a cgroup (v2 `memory.max` / `pids.max`, or v1's
    memory and pids controllers) that the launcher joins before it starts anything, so the whole
    sandbox (every process, its SysV shared memory, memfd and tmpfs pages, which RLIMIT_AS does
    not count) is charged to it; at the limit the kernel's OOM killer ends a process of the
    sandbox, not of the trainer. `close()` kills whatever is left in it and removes it."""

    def __init__(self, name: str, memory_bytes: int, processes: int):
        self.dirs: list[str] = []
        layout = cgroup_layout()
        if isinstance(layout, str):
            raise SandboxUnavailable(layout)
        try:
            for controller, parent in layout.items():
                path = os.path.join(parent, name)
                os.mkdir(path)
                self.dirs.append(path)
                if controller in ("v2", "memory"):
                    limit, swap = (("memory.max", memory_bytes), ("memory.swap.max", 0)) if controller == "v2" else \
                        (("memory.limit_in_bytes", memory_bytes), ("memory.memsw.limit_in_bytes", memory_bytes))
                    _write(os.path.join(path, limit[0]), limit[1])  # required: the bound itself
                    if os.path.exists(os.path.join(path, swap[0])):  # present only with swap accounting
                        _write(os.path.join(path, swap[0]), swap[1])
                if controller in ("v2", "pids") and processes:
                    _write(os.path.join(path, "pids.max"), processes + 2)  # + the launcher and init
        except OSError as e:
            self.close()
            raise SandboxUnavailable(f"cannot create the sandbox's cgroup: {e}") from None

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def close(self) -> None:
        for d in reversed(self.dirs):
            for _ in range(200):
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids = [int(x) for x in f.read().split()]
                except OSError:
                    pids = []
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                logger.error("could not remove the sandbox cgroup %s", d)
        self.dirs = []


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def cgroup_layout() -> dict[str, str] | str:
    """Where this machine lets us create sandbox cgroups: {"v2": parent} (a cgroup v2 hierarchy
    with the memory and pids controllers delegated below `parent`), or {"memory": parent, "pids":
    parent} (cgroup v1), or the reason there is none. Parents are this process's own cgroups
    (so a sandbox stays within the trainer's own limits) when they can be written, else the
    hierarchy's root."""
    own = _own_cgroups()
    reasons = []
    for mount in (CGROUP_MOUNTS, os.path.join(CGROUP_MOUNTS, "unified")):
        controllers = os.path.join(mount, "cgroup.controllers")
        if not os.path.isfile(controllers):
            continue
        if not {"memory", "pids"} <= set(open(controllers).read().split()):
            reasons.append(f"the cgroup v2 hierarchy at {mount} has no memory/pids controller")
            continue
        parent = os.path.join(mount, "grpokit-sandboxes")
        try:
            os.makedirs(parent, exist_ok=True)
            _write(os.path.join(mount, "cgroup.subtree_control"), "+memory +pids")
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +pids")
            return {"v2": parent}
        except OSError as e:
            reasons.append(f"cannot delegate memory/pids below {mount}: {e.strerror}")
    layout = {}
    for controller in ("memory", "pids"):
        mount = os.path.join(CGROUP_MOUNTS, controller)
        if not os.path.isfile(os.path.join(mount, "cgroup.procs")):
            reasons.append(f"no cgroup v1 {controller} controller at {mount}")
            break
        mine = os.path.join(mount, own.get(controller, "/").lstrip("/"))
        for parent in (mine, mount):
            if os.path.isdir(parent) and os.access(parent, os.W_OK):
                layout[controller] = parent
                break
        else:
            reasons.append(f"no permission to create cgroups in {mount}")
            break
    if len(layout) == 2:
        return layout
    return "; ".join(reasons) or "no cgroup hierarchy found"


def _own_cgroups() -> dict[str, str]:
    out = {}
    try:
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else ["v2"]:
                out[c] = path
    except OSError:
        pass
    return out


def _popen(argv: list[str], env: dict | None = None, cwd: str = "/") -> subprocess.Popen:
    # no preexec_fn (unsafe with threads): limits and isolation are applied by the launcher itself
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, close_fds=True, env=env if env is not None else {}, cwd=cwd)


SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin", "/etc/ld.so.cache")
SANDBOX_PYTHON_HOME = "/opt/python"


def _under(path: str, dirs) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def sandbox_binds(python: str, base_prefix: str, extra_binds=()) -> tuple[list[tuple[str, str]], str, str]:
    """(host path, path inside) pairs to bind read-only, the interpreter's path inside, and the
    LD_LIBRARY_PATH it needs there ("" when none).

    System directories keep their paths. An interpreter installed elsewhere (pyenv, conda, a
    uv-managed Python under /root) is bound at /opt/python, so the sandbox never shows a host
    home path; its libpython is found through LD_LIBRARY_PATH (its RUNPATH names the host path).
    An executable outside its prefix is bound at /opt/python-bin. extra_binds keep their paths.
    """
    prefix = os.path.realpath(base_prefix)
    binds: list[tuple[str, str]] = [(d, d) for d in SYSTEM_DIRS]
    inside_python, library_path = python, ""
    if not _under(prefix, SYSTEM_DIRS):
        binds.append((prefix, SANDBOX_PYTHON_HOME))
        if os.path.isdir(os.path.join(prefix, "lib")):
            library_path = SANDBOX_PYTHON_HOME + "/lib"
        if _under(python, [prefix]):
            inside_python = SANDBOX_PYTHON_HOME + python[len(prefix.rstrip("/")):]
    if inside_python == python and not _under(python, SYSTEM_DIRS):
        binds.append((os.path.dirname(python), "/opt/python-bin"))
        inside_python = "/opt/python-bin/" + os.path.basename(python)
    for p in extra_binds:
        if not _under(p, [inside for _, inside in binds]):
            binds.append((p, p))
    return binds, inside_python, library_path


class LocalSandbox:
    """Namespaced, chrooted, resource-limited local sandbox (Linux). See _sandbox_launcher.py.

    isolation=False runs the server with resource limits, a new session, a scrubbed environment and
    a throw-away directory only — no network or file-system isolation. It exists for machines
    without namespaces and must be asked for explicitly.
    base_uid: start of the uid range used when running as root: base_uid + (pid % 4096) * max_sessions
    + slot, one uid per concurrent sandbox (RLIMIT_NPROC and signals are per uid). No account needs to
    exist for them. extra_binds: more host paths to expose read-only.
    memory_limit: "cgroup" (default) bounds each sandbox's memory (`memory_bytes` for all its
    processes, shared memory and tmpfs included) and processes with a cgroup, and fails closed
    (SandboxUnavailable) where no cgroup can be made; "rlimit" is the explicit, logged opt-out:
    RLIMIT_AS per process only, which shared memory (SysV shm, memfd) escapes.
    """

    def __init__(self, isolation: bool = True, base_uid: int = 1_300_000_000, max_sessions: int = 128,
                 extra_binds: tuple[str, ...] = (), memory_limit: str = "cgroup"):
        if memory_limit not in MEMORY_LIMITS:
            raise ValueError(f"LocalSandbox: memory_limit={memory_limit!r}; use one of {', '.join(MEMORY_LIMITS)}.")
        self.memory_limit = memory_limit
        if memory_limit == "cgroup":
            layout = cgroup_layout()
            if isinstance(layout, str):
                raise SandboxUnavailable(
                    f"the code sandbox cannot bound its memory here ({layout}). Run as root on a machine with "
                    "cgroups (v2 with memory and pids delegated, or v1), use CommandSandbox with a container "
                    "memory limit, or pass memory_limit='rlimit' (per-process limits only: shared memory "
                    "escapes them) at your own risk.")
        else:
            logger.warning("LocalSandbox(memory_limit='rlimit'): a sandbox's memory is bounded per process only; "
                           "SysV shared memory and memfd are not counted.")
        if sys.platform != "linux" and isolation:
            raise SandboxUnavailable("LocalSandbox isolation needs Linux namespaces; use CommandSandbox "
                                     "(a container) or LocalSandbox(isolation=False) at your own risk.")
        self.isolation = isolation
        self.python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        self.binds, self.inside_python, self.library_path = sandbox_binds(self.python, sys.base_prefix, extra_binds)
        # uids unique per session, and per trainer process (several ranks may share a machine)
        first = base_uid + (os.getpid() % 4096) * max_sessions
        self._uids: queue.Queue[int] = queue.Queue()
        for i in range(max_sessions):
            self._uids.put(first + i)
        self._probe: str | None = None
        self._probe_lock = threading.Lock()
        if not isolation:
            logger.warning("LocalSandbox(isolation=False): model-written code runs WITHOUT network or file-system "
                           "isolation (resource limits and timeouts only).")

    def start(self, limits: SandboxLimits) -> SandboxSession:
        uid = self._uids.get()
        root = tempfile.mkdtemp(prefix="grpokit-sandbox-")
        os.chmod(root, 0o700)
        cgroup = None
        try:
            if self.memory_limit == "cgroup":
                cgroup = SandboxCgroup(f"grpokit-{os.getpid()}-{uid}", limits.memory_bytes, limits.processes)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            self._uids.put(uid)
            raise
        cfg: dict[str, Any] = {"isolate": self.isolation, "root": root, "workdir": root, "uid": uid, "gid": uid,
               "python": self.inside_python if self.isolation else self.python, "server": str(SERVER_PATH),
               "binds": self.binds, "library_path": self.library_path if self.isolation else "",
               "parent_pid": os.getpid(),
               "cgroup_procs": cgroup.procs_files if cgroup else [],
               "limits": {k: (int(v) if k != "wall_seconds" else float(v)) for k, v in asdict(limits).items()}}
        if not self.isolation:
            cfg["limits"]["processes"] = 0  # a shared uid: NPROC would count the trainer's own processes

        def cleanup():
            if cgroup is not None:
                cgroup.close()
            shutil.rmtree(root, ignore_errors=True)  # empty unless isolation=False
            self._uids.put(uid)

        try:
            proc = _popen([self.python, "-I", "-S", "-B", str(LAUNCHER_PATH), json.dumps(cfg)], cwd=root)
        except BaseException:
            cleanup()
            raise
        return SandboxSession(proc, limits, on_close=cleanup)

    def check(self) -> None:
        """Start one sandbox and ping it; raise SandboxUnavailable (with the reason) if that fails."""
        with self._probe_lock:
            if self._probe is None:
                session = self.start(SandboxLimits(wall_seconds=20))
                try:
                    reply = session.request({"op": "ping"})
                    self._probe = "" if reply == {"ok": True} else f"unexpected reply {reply!r}"
                except SandboxError as e:
                    session.close()
                    self._probe = f"{e}; sandbox stderr: {session.stderr.strip() or '(empty)'}"
                finally:
                    session.close()
        if self._probe:
            raise SandboxUnavailable(
                f"the local code sandbox cannot start: {self._probe}. It needs Linux namespaces (run as root, or "
                "enable unprivileged user namespaces: sysctl kernel.unprivileged_userns_clone=1). Alternatives: "
                "CommandSandbox with a container, or LocalSandbox(isolation=False) (no isolation; not for "
                "untrusted models).")


class CommandSandbox:
    """Runs the server through `command` (a container or remote-execution CLI) that provides isolation.

    The server is passed as `python -I -S -B -c <source>` appended to `command`; stdin/stdout must be
    connected to it (docker: `-i`). Wall-clock kills stop the local command process group; make sure
    the command takes the remote side down with it (e.g. docker run --rm with --init and a `timeout`).
    """

    def __init__(self, command: list[str], python: str = "python3"):
        self.command, self.python = list(command), python
        self._source = SERVER_PATH.read_text()

    def start(self, limits: SandboxLimits) -> SandboxSession:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        proc = _popen([*self.command, self.python, "-I", "-S", "-B", "-c", self._source], env=env)
        return SandboxSession(proc, limits)

    def check(self) -> None:
        with self.start(SandboxLimits(wall_seconds=60)) as session:
            try:
                if session.request({"op": "ping"}) != {"ok": True}:
                    raise SandboxUnavailable("CommandSandbox: unexpected reply to ping")
            except SandboxError as e:
                raise SandboxUnavailable(f"CommandSandbox {self.command}: {e}; stderr: {session.stderr}") from None
