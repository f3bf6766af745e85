"""stdin/stdout grading: a program's output is what its own process tree wrote while it ran, and
nothing the program leaves behind can change it (issue 24, part 1).

Each attack below prints a *wrong* answer and exits 0, having started something that tries to
replace that answer with the right one: a `setsid` daemon rewriting the output file by its path,
through a hard link, through the inherited descriptor or by renaming a file over it; a thread that
outlives its exited thread-group leader; a process that left the run's process group (so a `kill`
of the main process's group misses it); one cloned with CLONE_PARENT (a child of the server, not
of the program); a daemon started only in the second case; a daemon writing through the
`/proc/<pid>/fd` paths of the server, init and itself (there is no /proc inside, and none can be
mounted). Each must score
0 on a two-case test. The probes are honest programs that check a run's leftovers are gone before
the next run, and that a run cannot get at the server that reads its output; they must score 1.

The same attacks run through `sandbox="unsafe-local"` (no namespaces: the server is a child
subreaper and kills every descendant from `/proc` itself), where they must score 0 as well.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit.rewards.code import CodeReward
from tests.helpers import code_reward_or_skip

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the local sandbox needs Linux")

TESTS = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
SYS_EXIT, SYS_CLONE = {"x86_64": (60, 56), "aarch64": (93, 220)}.get(platform.machine(), (None, None))

# The program: reads a and b, knows the right answer a + b, prints the wrong one a - b, starts
# `daemon(act)` (a setsid'd grandchild calling act() every half millisecond for two seconds) and
# exits 0 after 50 ms, so the daemon acts both before and after the main process's exit.
PROLOGUE = """import os, sys, time, threading, ctypes
a, b = map(int, sys.stdin.read().split())
RIGHT = (str(a + b).ljust(24) + "\\n").encode()

def loop(act):
    end = time.monotonic() + 2
    while time.monotonic() < end:
        try:
            act()
        except OSError:
            pass
        time.sleep(0.0005)

def daemon(act, how="setsid"):
    if os.fork() == 0:
        try:
            if how == "setsid":
                os.setsid()
            elif how == "setpgid":       # leaves the run's process group, stays in its session
                os.setpgid(0, 0)
            if how == "thread":          # the rewriting thread outlives its exited leader (state Z)
                os.setsid()
                threading.Thread(target=loop, args=(act,)).start()
                ctypes.CDLL(None).syscall(%(sys_exit)d, 0)
            if os.fork() == 0:
                loop(act)
        finally:
            os._exit(0)

def sibling(act):                        # clone(CLONE_PARENT): a child of the server, not of this program
    if ctypes.CDLL(None).syscall(%(sys_clone)d, 0x00008000 | 17, 0, 0, 0, 0) == 0:
        try:
            os.setsid()
            loop(act)
        finally:
            os._exit(0)

def by_path(path=".stdout"):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, RIGHT, 0)
    finally:
        os.close(fd)

def by_descriptor():
    os.pwrite(1, RIGHT, 0)

def by_rename():
    with open(".stdout.new", "wb") as f:
        f.write(RIGHT)
    os.replace(".stdout.new", ".stdout")

print(a - b, flush=True)
""" % {"sys_exit": SYS_EXIT or 60, "sys_clone": SYS_CLONE or 56}
EPILOGUE = "\ntime.sleep(0.05)\n"


def attack(body: str) -> str:
    return PROLOGUE + body + EPILOGUE


ATTACKS = {
    # the attack: a session leader rewriting the file the output is read from
    "daemon_rewrites_output_by_path": attack("daemon(by_path)"),
    "daemon_rewrites_output_through_a_hard_link": attack(
        "try:\n    os.link('.stdout', '.alias')\nexcept OSError:\n    pass\n"
        "daemon(lambda: by_path('.alias'))"),
    "daemon_rewrites_output_through_the_inherited_descriptor": attack("daemon(by_descriptor)"),
    "daemon_renames_a_file_over_the_output": attack("daemon(by_rename)"),
    "daemon_uses_every_way_at_once": attack(
        "daemon(lambda: [f() for f in (by_path, by_descriptor, lambda: by_path('/work/.stdout'))])"),
    "thread_outlives_its_exited_leader": attack("daemon(lambda: (by_path(), by_descriptor()), how='thread')"),
    "process_outlives_a_kill_of_the_main_group": attack("daemon(lambda: (by_path(), by_descriptor()), "
                                                        "how='setpgid')"),
    "sibling_of_the_server_outlives_the_program": attack("sibling(lambda: (by_path(), by_descriptor()))"),
    "daemon_in_the_second_case_only": attack(
        "if os.path.exists('.seen'):\n    daemon(lambda: (by_path(), by_descriptor()))\n"
        "open('.seen', 'w').close()"),
}

# honest programs: case 1 leaves something behind (a heartbeat file it touches every 10 ms for 3 s),
# case 2 prints "clean" only if nothing of case 1 is still running
SURVIVOR_PROBE = """import os, sys, time, threading, ctypes
sys.stdin.read()

def beat():
    for _ in range(300):
        with open(".beat", "a") as f:
            f.write("x")
        time.sleep(0.01)

if not os.path.exists(".beat"):
    open(".beat", "w").close()
    if os.fork() == 0:
        %(leave)s
        os._exit(0)
    time.sleep(0.1)
    print("clean")
else:
    size = os.path.getsize(".beat")
    time.sleep(0.1)
    print("clean" if os.path.getsize(".beat") == size else "alive")
"""
LEAVE = {
    "setsid_daemon": "os.setsid()\n        beat()",
    "thread_of_an_exited_leader": ("os.setsid()\n        threading.Thread(target=beat).start()\n"
                                   f"        ctypes.CDLL(None).syscall({SYS_EXIT or 60}, 0)"),
    "process_in_its_own_group": "os.setpgid(0, 0)\n        beat()",
}
PROBE_TESTS = [{"input": "1\n", "output": "clean\n"}, {"input": "2\n", "output": "clean\n"}]

# the server that reads a run's output: a run may not trace it (which would let it forge the reply)
PTRACE_PROBE = """import ctypes, errno, os, sys
sys.stdin.read()
libc = ctypes.CDLL(None, use_errno=True)
r = libc.ptrace(0x4206, os.getppid(), None, None)  # PTRACE_SEIZE: does not stop the server
print(errno.errorcode.get(ctypes.get_errno(), "?") if r != 0 else "attached")
"""

# no path to the server's descriptors: no /proc, and none can be mounted
PROC_FD_ATTACK = PROLOGUE + """
def via_proc():
    for pid in ("self", str(os.getppid()), "1", "2"):
        for n in range(3, 16):
            try:
                fd = os.open(f"/proc/{pid}/fd/{n}", os.O_WRONLY)
            except OSError:
                continue
            try:
                os.write(fd, RIGHT)
            finally:
                os.close(fd)
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000 | 0x00020000) == 0:  # a user and mount namespace, to mount a procfs
    os.makedirs("/work/proc", exist_ok=True)
    libc.mount(b"proc", b"/work/proc", b"proc", 0, None)
daemon(via_proc)
""" + EPILOGUE


def fenced(src: str) -> str:
    return f"```python\n{src}\n```"


@pytest.fixture(scope="module")
def reward():
    return code_reward_or_skip(timeout=2.0, max_concurrency=4, memory_bytes=512 << 20, processes=16)


@pytest.fixture(scope="module")
def grades(reward):
    cases = dict(ATTACKS)
    cases["proc_fd_paths_of_the_server"] = PROC_FD_ATTACK
    return dict(zip(cases, reward(None, [fenced(s) for s in cases.values()], tests=[TESTS] * len(cases)), strict=True))


def test_control_passes(reward):
    honest = "a, b = map(int, input().split())\nprint(a + b)"
    wrong = "a, b = map(int, input().split())\nprint(a - b)"
    assert reward(None, [fenced(honest), fenced(wrong)], tests=[TESTS] * 2) == [1.0, 0.0]


@pytest.mark.skipif(SYS_EXIT is None, reason="the thread attack knows SYS_exit on x86_64 and aarch64 only")
@pytest.mark.parametrize("name", [*ATTACKS, "proc_fd_paths_of_the_server"])
def test_output_cannot_be_rewritten_by_what_the_run_leaves_behind(grades, name):
    assert grades[name] == 0.0, f"{name}: a wrong program scored {grades[name]}"


@pytest.mark.skipif(SYS_EXIT is None, reason="the thread probe knows SYS_exit on x86_64 and aarch64 only")
@pytest.mark.parametrize("leave", list(LEAVE))
def test_nothing_of_a_run_is_alive_when_the_next_starts(reward, leave):
    probe = SURVIVOR_PROBE % {"leave": LEAVE[leave]}
    assert reward(None, [fenced(probe)], tests=[PROBE_TESTS]) == [1.0]


def test_a_run_cannot_trace_the_server_that_reads_its_output(reward):
    tests = [{"input": "", "output": "EPERM"}]
    assert reward(None, [fenced(PTRACE_PROBE)], tests=[tests]) == [1.0]


@pytest.mark.skipif(SYS_EXIT is None, reason="the thread attack knows SYS_exit on x86_64 and aarch64 only")
def test_without_namespaces_the_server_kills_the_run_tree_itself():
    """`unsafe-local` has no pid namespace and no init to end a run's leftovers: the server is a
    child subreaper, kills every descendant it finds in /proc, and reads the output from a pipe."""
    unsafe = CodeReward(timeout=2.0, max_concurrency=4, sandbox="unsafe-local", memory_limit="rlimit")
    names = list(ATTACKS)
    grades = unsafe(None, [fenced(ATTACKS[n]) for n in names], tests=[TESTS] * len(names))
    assert dict(zip(names, grades, strict=True)) == dict.fromkeys(names, 0.0)
    probes = [SURVIVOR_PROBE % {"leave": leave} for leave in LEAVE.values()]
    assert unsafe(None, [fenced(p) for p in probes], tests=[PROBE_TESTS] * len(probes)) == [1.0] * len(probes)
    honest = "a, b = map(int, input().split())\nimport subprocess\nsubprocess.run(['echo', str(a + b)])"
    assert unsafe(None, [fenced(honest)], tests=[TESTS]) == [1.0]


def test_a_child_that_prints_before_the_program_exits_counts(reward):
    """Output is the run's process tree's, not only the main process's: a child the program waits
    for, or one still writing when it exits, is part of it (as in a shell pipeline)."""
    waits = "import subprocess\na, b = map(int, input().split())\nsubprocess.run(['/bin/echo', str(a + b)])"
    forks = "import os\na, b = map(int, input().split())\nif os.fork() == 0:\n    print(a + b, flush=True)\n    os._exit(0)\n" \
            "os.wait()"
    assert reward(None, [fenced(waits), fenced(forks)], tests=[TESTS] * 2) == [1.0, 1.0]


def test_leftover_files_do_not_leak_between_runs(reward):
    """The output file of the previous design no longer exists; a run sees only its own files."""
    probe = "import os\ninput()\nprint('none' if not any(n.startswith('.std') for n in os.listdir('.')) else 'some')"
    tests = [{"input": "1\n", "output": "none"}, {"input": "2\n", "output": "none"}]
    assert reward(None, [fenced(probe)], tests=[tests]) == [1.0]


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3.11").exists() or
                    not Path("/usr/bin/setpriv").exists(), reason="needs root, setpriv and a system python3.11")
@pytest.mark.skipif(SYS_EXIT is None, reason="the thread attack knows SYS_exit on x86_64 and aarch64 only")
def test_the_unprivileged_user_namespace_path_too(tmp_path):
    """Started by a normal user, the server is uid 0 of a user namespace, as is the program it
    runs: the same attacks and probes."""
    jobs = [(ATTACKS["daemon_uses_every_way_at_once"], TESTS), (ATTACKS["thread_outlives_its_exited_leader"], TESTS),
            (SURVIVOR_PROBE % {"leave": LEAVE["thread_of_an_exited_leader"]}, PROBE_TESTS),
            (PTRACE_PROBE, [{"input": "", "output": "EPERM"}])]
    script = ("import json, sys\nfrom grpokit.rewards.code import CodeReward\n"
              "jobs = json.load(sys.stdin)\n"
              "r = CodeReward(timeout=2.0, max_concurrency=4, memory_limit='rlimit')\n"
              "print(json.dumps(r(None, ['```python\\n' + s + '\\n```' for s, _ in jobs], tests=[t for _, t in jobs])))\n")
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3.11",
                          "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
                         input=json.dumps(jobs), capture_output=True, text=True, timeout=60)
    if "SandboxUnavailable" in out.stderr:
        pytest.skip("unprivileged user namespaces are disabled here: " + out.stderr.splitlines()[-1])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [0.0, 0.0, 1.0, 1.0]
