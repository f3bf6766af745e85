"""Starts the sandbox server in isolation. Trusted code; runs model-written code never.

    python -I -S -B _sandbox_launcher.py CONFIG_JSON

stdin/stdout are handed, untouched, to the server (the channel to the trainer); stderr carries
diagnostics. With "isolate": true:

  outer (this process)  unshare(mount, net, pid, ipc, uts [, user when not root]); fork
  init (pid 1 of the new pid namespace, still privileged there)
      - mounts a fresh tmpfs as the new root; binds only the interpreter and system libraries into
        it, read-only, nosuid, nodev (an interpreter installed outside the system directories, e.g.
        under /root/.pyenv, appears at /opt/python: no host home path exists inside); /dev/{null,zero,random,urandom}; a tmpfs /work (the only
        place the solution may write, size-capped) and a tmpfs /tmp; the server script read-only;
        then remounts the root read-only and chroots into it. Nothing else of the host's file
        system (home directories, datasets, the trainer's code, /proc) exists inside.
      - forks the server: new session, resource limits (CPU, address space, file size, processes,
        open files, no core dumps), drops to an unprivileged uid with no capabilities
        (root: a dedicated uid per concurrent sandbox; otherwise: a user namespace whose only
        user has had every capability dropped), no_new_privs, scrubbed environment; execs
        `python -I -S -B /sandbox/server.py` in /work.
      - on the server's request (after each stdin/stdout run, before the server reads the run's
        output) kills every process of the namespace but the server and waits until none runs
        (a zombie thread-group leader counts as running while one of its threads does); it
        answers "f" if some still run after 2 s, and the server then refuses the run.
      - waits; at the wall-clock limit (or when the server exits) kills every process in the
        namespace and exits. When init dies, the kernel kills whatever is left in the namespace.
  The network namespace has only a loopback interface, which is down: no packet can leave.
  Both outer and init die with SIGKILL if their parent dies (PR_SET_PDEATHSIG).

With "isolate": false (explicit opt-out): resource limits, a new session and a scrubbed
environment only. Either way, when "cgroup_procs" are given, this process first joins the
sandbox's cgroup(s) (memory and processes of the whole sandbox), so everything it starts is in it.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 24, 28, 38
SERVER_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8",
              "LC_ALL": "C.UTF-8"}

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.unshare.argtypes = [ctypes.c_int]
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option, arg):
    _check(libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {src} on {dst}")


def _locked_flags(path):
    """Flags of the mount holding `path` that a bind remount must keep (locked in a user namespace)."""
    f = os.statvfs(path).f_flag
    table = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC, os.ST_NOATIME: MS_NOATIME,
             os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
    return sum(ms for st, ms in table.items() if f & st)


def bind_readonly(path, root, inside=None):
    """Bind host `path` read-only at `inside` (default: the same path) under `root`."""
    dst = root + (inside or path)
    if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink(os.readlink(path), dst)
        return
    if not os.path.exists(path):
        return
    if os.path.isdir(path):
        os.makedirs(dst, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
        open(dst, "a").close()
    mount(path, dst, None, MS_BIND)
    mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | _locked_flags(path))


def apply_limits(lim):
    pairs = [(resource.RLIMIT_CPU, lim["cpu_seconds"], lim["cpu_seconds"] + 1),
             (resource.RLIMIT_AS, lim["memory_bytes"], lim["memory_bytes"]),
             (resource.RLIMIT_FSIZE, lim["file_size_bytes"], lim["file_size_bytes"]),
             (resource.RLIMIT_NOFILE, lim["open_files"], lim["open_files"]),
             (resource.RLIMIT_CORE, 0, 0)]
    if lim.get("processes"):
        pairs.append((resource.RLIMIT_NPROC, lim["processes"], lim["processes"]))
    for what, soft, hard in pairs:
        resource.setrlimit(what, (soft, hard))


def drop_all_capabilities():
    """Inside a user namespace we stay uid 0 there: drop every capability, for good."""
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            _check(-1, f"drop capability {cap}")
    prctl(PR_SET_SECUREBITS, 0x2F)  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    _check(libc.capset(ctypes.byref(Header(0x20080522, 0)), data), "capset")


REAP_FDS = (3, 4)   # the server's ends of the reaper pipes: requests to init, acknowledgements back


def exec_server(python, server, cfg, reaper: bool = False):
    os.closerange(REAP_FDS[-1] + 1 if reaper else 3, 4096)
    env = dict(SERVER_ENV, **({"GRPOKIT_REAPER": ",".join(map(str, REAP_FDS))} if reaper else {}),
               **({"LD_LIBRARY_PATH": cfg["library_path"]} if cfg.get("library_path") else {}))
    os.execve(python, [python, "-I", "-S", "-B", server], env)


def _state(path: str, proc_fd: int) -> str | None:
    """The state letter in /proc/<path>/stat (Z: zombie), or None if it is gone."""
    try:
        fd = os.open(f"{path}/stat", os.O_RDONLY, dir_fd=proc_fd)
        try:
            stat = os.read(fd, 512).decode()
        finally:
            os.close(fd)
        return stat.rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def _running(pid: int, proc_fd: int) -> bool:
    """Whether a thread of `pid` still runs. A zombie's state alone does not say: a thread-group
    leader that exited by itself (SYS_exit) shows Z while its other threads run on."""
    state = _state(str(pid), proc_fd)
    if state is None:
        return False
    if state not in "ZX":
        return True
    try:
        fd = os.open(f"{pid}/task", os.O_RDONLY | os.O_DIRECTORY, dir_fd=proc_fd)
    except OSError:
        return False
    try:
        tasks = os.listdir(fd)
    finally:
        os.close(fd)
    return any((_state(f"{pid}/task/{t}", proc_fd) or "Z") not in "ZX" for t in tasks)


def _pids(proc_fd: int) -> list[int]:
    """Pids alive in this pid namespace (its own procfs, held open by init outside the chroot)."""
    return [int(name) for name in os.listdir(proc_fd) if name.isdigit()]


def reap_all_but(keep: int, proc_fd: int, seconds: float = 2.0) -> bool:
    """SIGKILL every process of the namespace except init and `keep` (the server), and wait until
    each is gone or a zombie with no running thread: a run's daemons (setsid, double fork, another
    process group, threads of an exited leader) cannot outlive it. False if some still run after
    `seconds` (the server then refuses the run)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in _pids(proc_fd) if p not in (1, keep) and _running(p, proc_fd)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        for p in alive:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _reap_zombies()
        select.select([], [], [], 0.001)


def _reap_zombies(block=False):
    """waitpid every finished child (orphans of the namespace are init's); returns their pids."""
    done = []
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        done.append((pid, status))
        block = False
    return done


def init(cfg, as_root):
    """pid 1 of the sandbox's pid namespace."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    root, uid, gid, lim = cfg["root"], cfg["uid"], cfg["gid"], cfg["limits"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for path, inside in cfg["binds"]:
        bind_readonly(path, root, inside)
    os.makedirs(root + "/dev", mode=0o755)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{dev}", "a").close()
        mount(f"/dev/{dev}", f"{root}/dev/{dev}", None, MS_BIND)
    for path, mode, owner in (("/work", "700", f",uid={uid},gid={gid}"), ("/tmp", "1777", "")):
        os.makedirs(root + path, mode=0o755)
        mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV,
              f"size={lim['disk_bytes'] // 1024}k,nr_inodes=1024,mode={mode}{owner}")
    os.makedirs(root + "/sandbox", mode=0o755)
    with open(cfg["server"], "rb") as src, open(root + "/sandbox/server.py", "wb") as dst:
        dst.write(src.read())
    os.chmod(root + "/sandbox/server.py", 0o444)
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # this pid namespace's own procfs, outside the chroot, held open by init only: it lists the
    # sandbox's processes so that init can end a run's leftovers (reap_all_but)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    proc_fd = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
    requests_r, requests_w = os.pipe()
    acks_r, acks_w = os.pipe()
    os.chroot(root)
    os.chdir("/")

    child = os.fork()
    if child == 0:
        try:
            os.close(proc_fd)
            os.dup2(requests_w, REAP_FDS[0])
            os.dup2(acks_r, REAP_FDS[1])
            os.setsid()
            os.chdir("/work")
            apply_limits(lim)
            if as_root:
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
            else:
                drop_all_capabilities()
            prctl(PR_SET_NO_NEW_PRIVS, 1)
            exec_server(cfg["python"], "/sandbox/server.py", cfg, reaper=True)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"sandbox: cannot start the server: {e!r}\n".encode())
        os._exit(126)

    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # init does not hold the channel: the trainer sees EOF when the server dies
    os.dup2(devnull, 1)
    timed_out = []

    def on_alarm(signum, frame):
        timed_out.append(True)
        os.kill(-1, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["limits"]["wall_seconds"])
    for fd in (requests_w, acks_r):
        os.close(fd)
    status, server_alive, listening = 0, True, [requests_r]
    while server_alive:
        # a request byte from the server: end every process but the server, then acknowledge
        ready, _, _ = select.select(listening, [], [], 0.02)
        if ready:
            if not os.read(requests_r, 1):
                listening = []  # the server closed its end
            else:
                done = reap_all_but(child, proc_fd)
                try:
                    os.write(acks_w, b"k" if done else b"f")
                except OSError:
                    pass
        for pid, st in _reap_zombies():
            if pid == child:
                status, server_alive = st, False
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        os.kill(-1, signal.SIGKILL)  # everything the solution left behind in the namespace
    except ProcessLookupError:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(124 if timed_out else (os.waitstatus_to_exitcode(status) & 0xFF))


def main():
    cfg = json.loads(sys.argv[1])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != cfg["parent_pid"]:  # the trainer died before prctl took effect
        os._exit(1)
    for procs in cfg.get("cgroup_procs", []):  # the sandbox's cgroup, before anything else starts
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    if not cfg["isolate"]:
        os.chdir(cfg["workdir"])
        apply_limits(cfg["limits"])
        exec_server(cfg["python"], cfg["server"], cfg)
    as_root = os.geteuid() == 0
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    _check(libc.unshare(flags | (0 if as_root else CLONE_NEWUSER)), "unshare")
    if not as_root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
        cfg["uid"] = cfg["gid"] = 0
    pid = os.fork()
    if pid == 0:
        try:
            init(cfg, as_root)
        except BaseException as e:  # noqa: BLE001
            os.write(2, f"sandbox: cannot set up isolation: {e!r}\n".encode())
        os._exit(125)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main()
