"""Starts the sandbox server in isolation. Trusted code; runs model-written code never.

    python -I -S -B _sandbox_launcher.py CONFIG_JSON

stdin/stdout are handed, untouched, to the server (the channel to the trainer); stderr carries
diagnostics. With "isolate": true:

  outer (this process)  unshare(mount, net, pid, ipc, uts [, user when not root]); fork
  init (pid 1 of the new pid namespace, still privileged there)
      - mounts a fresh tmpfs as the new root; binds only the interpreter and system libraries into
        it, read-only, nosuid, nodev; /dev/{null,zero,random,urandom}; a tmpfs /work (the only
        place the solution may write, size-capped) and a tmpfs /tmp; the server script read-only;
        then remounts the root read-only and chroots into it. Nothing else of the host's file
        system (home directories, datasets, the trainer's code, /proc) exists inside.
      - forks the server: new session, resource limits (CPU, address space, file size, processes,
        open files, no core dumps), drops to an unprivileged uid with no capabilities
        (root: a dedicated uid per concurrent sandbox; otherwise: a user namespace whose only
        user has had every capability dropped), no_new_privs, scrubbed environment; execs
        `python -I -S -B /sandbox/server.py` in /work.
      - waits; at the wall-clock limit (or when the server exits) kills every process in the
        namespace and exits. When init dies, the kernel kills whatever is left in the namespace.
  The network namespace has only a loopback interface, which is down: no packet can leave.
  Both outer and init die with SIGKILL if their parent dies (PR_SET_PDEATHSIG).

With "isolate": false (explicit opt-out): resource limits, a new session and a scrubbed
environment only.
"""

import ctypes
import json
import os
import resource
import signal
import sys

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


def bind_readonly(path, root):
    dst = root + path
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


def exec_server(python, server, cfg):
    os.closerange(3, 4096)
    os.execve(python, [python, "-I", "-S", "-B", server], SERVER_ENV)


def init(cfg, as_root):
    """pid 1 of the sandbox's pid namespace."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    root, uid, gid, lim = cfg["root"], cfg["uid"], cfg["gid"], cfg["limits"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755")
    for path in cfg["binds"]:
        bind_readonly(path, root)
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
    os.chroot(root)
    os.chdir("/")

    child = os.fork()
    if child == 0:
        try:
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
            exec_server(cfg["python"], "/sandbox/server.py", cfg)
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
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            break
        if pid == child:
            break
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
