"""Attack suite for the code sandbox. Every attack must be contained and graded as a failure, and
this process must go on. The attacks run together in one batch (module fixture), then each test
checks its own grade and the side effects on the host.

Each attack is a "solution" to tests a correct `add` would pass (or, for a few, tests whose
expected value exists only outside the sandbox). Probes are honest solutions that report what the
sandbox looks like from inside; they must pass, so they fail if an isolation layer is missing.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpokit.rewards.code import CodeReward
from grpokit.rewards.sandbox import LocalSandbox, SandboxLimits, SandboxUnavailable
from tests.helpers import code_reward_or_skip

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the local sandbox needs Linux")

ADD = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
SECRET = "TOKEN-7f3a9c"  # exists only in the tests below and in a host file, never in the sandbox


HASH_FLOOD = """import os, json, struct, time
vals = [k * (2 ** 61 - 1) for k in range(1, 45001)]
frame = json.dumps({{"ok": {{"{tag}": {values}}}}}).encode()
def add(a, b):
    for fd in range(3, 12):
        try:
            os.write(fd, struct.pack(">I", len(frame)) + frame)
        except OSError:
            pass
    time.sleep(100)
"""


SHM_BOMB = """import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
size = 256 << 20
for i in range(6):  # 1.5 GiB in all, 256 MiB attached at a time
    shm = libc.shmget(0, ctypes.c_size_t(size), 0o1600)
    assert shm >= 0, ctypes.get_errno()
    addr = libc.shmat(shm, None, 0)
    ctypes.memset(ctypes.c_void_p(addr), 1, size)
    libc.shmdt(ctypes.c_void_p(addr))
def add(a, b):
    return a + b
"""


LEAKING_DAEMON = """import os, time
print(5, flush=True)
if not os.path.exists('.leak'):
    open('.leak', 'w').close()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            first = os.stat('.stdout').st_mtime_ns
            for _ in range(20000):
                time.sleep(0.001)
                try:
                    st = os.stat('.stdout')
                except OSError:
                    continue
                if st.st_mtime_ns != first and st.st_size > 0:
                    with open('.stdout', 'w') as f:
                        f.write('6\\n')
                    first = os.stat('.stdout').st_mtime_ns
        os._exit(0)
time.sleep(0.3)
"""


def fenced(src: str) -> str:
    return f"```python\n{src}\n```"


def attacks(host_dir: Path, port: int) -> dict:
    """name -> (solution source, tests, expected grade)."""
    secret_file = host_dir / "secret.txt"
    escape = host_dir / "escape.txt"
    me = os.getpid()
    wrong_add = "def add(a, b):\n    return a - b\n"
    return {
        # control: an honest solution passes, so a 0.0 below means "caught", not "broken harness"
        "control": ("def add(a, b):\n    return a + b", ADD, 1.0),
        # resource exhaustion
        "infinite_loop_at_load": ("while True:\n    pass", ADD, 0.0),
        "infinite_loop_in_call": ("def add(a, b):\n    while True:\n        pass", ADD, 0.0),
        "sleep_in_call": ("import time\ndef add(a, b):\n    time.sleep(100)\n    return a + b", ADD, 0.0),
        "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
                      "def add(a, b):\n    return a + b", ADD, 0.0),
        "memory_bomb_one_block": ("x = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b", ADD, 0.0),
        "memory_bomb_growing": ("xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))\n"
                                "def add(a, b):\n    return a + b", ADD, 0.0),
        # memory RLIMIT_AS does not count: SysV shared memory (attached, filled, detached: the pages
        # stay resident in the segment) and memfd pages; only the sandbox's cgroup bounds them
        "sysv_shm_bomb": (SHM_BOMB, ADD, 0.0),
        "memfd_bomb": ("import os\nfds = []\nfor i in range(48):\n    fd = os.memfd_create('x')\n"
                       "    for _ in range(15):\n        os.write(fd, b'x' * (1 << 20))\n    fds.append(fd)\n"
                       "def add(a, b):\n    return a + b", ADD, 0.0),
        "huge_file": ("with open('big.bin', 'wb') as f:\n    while True:\n        f.write(b'x' * 10 ** 6)\n"
                      "def add(a, b):\n    return a + b", ADD, 0.0),
        "output_flood": ("import sys\ndef add(a, b):\n    while True:\n        sys.stderr.write('x' * 100000)\n"
                         "        print('y' * 100000)", ADD, 0.0),
        "huge_reply": ("def add(a, b):\n    return 'x' * (64 * 1024 ** 2)", ADD, 0.0),
        "deep_reply": ("def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x", ADD, 0.0),
        # the file system
        "write_outside_host_tmp": (f"open({str(escape)!r}, 'w').write('pwned')\n" + wrong_add.replace("-", "+"),
                                   ADD, 0.0),
        "write_project_dir": ("open('/work/main/pwned.txt', 'w').write('x')\ndef add(a, b):\n    return a + b",
                              ADD, 0.0),
        "write_system_dir": ("open('/usr/pwned.txt', 'w').write('x')\ndef add(a, b):\n    return a + b", ADD, 0.0),
        "write_private_tmp_then_cheat": (f"open('/tmp/{escape.name}', 'w').write('x')\n" + wrong_add, ADD, 0.0),
        "read_host_secret": (f"def get_secret():\n    return open({str(secret_file)!r}).read().strip()",
                             [f"assert get_secret() == {SECRET!r}"], 0.0),
        "search_everywhere_for_expected": (
            "import gc, os\n"
            "def get_secret():\n"
            "    for obj in gc.get_objects():\n"
            "        if isinstance(obj, str) and obj.startswith('TOKEN-'):\n"
            "            return obj\n"
            "    for root, dirs, files in os.walk('/'):\n"
            "        for name in files:\n"
            "            try:\n"
            "                text = open(os.path.join(root, name), errors='ignore').read(10 ** 6)\n"
            "            except OSError:\n"
            "                continue\n"
            "            i = text.find('TOKEN-')\n"
            "            if i >= 0:\n"
            "                return text[i:i + 12]\n"
            "    return 'not found'", [f"assert get_secret() == {SECRET!r}"], 0.0),
        # the network
        "connect_host_listener": (f"import socket\ndef add(a, b):\n"
                                  f"    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                                  f"    s.sendall(b'leak')\n    return a + b", ADD, 0.0),
        "connect_external_ip": ("import socket\ndef add(a, b):\n"
                                "    socket.create_connection(('1.1.1.1', 53), timeout=1)\n    return a + b", ADD, 0.0),
        "udp_external": ("import socket\ndef add(a, b):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                         "    s.sendto(b'x', ('8.8.8.8', 53))\n    return a + b", ADD, 0.0),
        # processes and privileges
        "kill_parent": ("import os\nos.kill(os.getppid(), 9)\ndef add(a, b):\n    return a + b", ADD, 0.0),
        "kill_everything": ("import os, signal\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n" + wrong_add,
                            ADD, 0.0),
        "kill_trainer_by_pid": (f"import os\nos.kill({me}, 9)\ndef add(a, b):\n    return a + b", ADD, 0.0),
        "kill_own_group": ("import os\ndef add(a, b):\n    os.killpg(0, 9)", ADD, 0.0),
        "raise_limits_and_uid": ("import os, resource\ndef add(a, b):\n"
                                 "    resource.setrlimit(resource.RLIMIT_CPU, (-1, -1))\n    os.setuid(0)\n"
                                 "    return a + b", ADD, 0.0),
        "chroot_escape": ("import os\ndef add(a, b):\n    os.mkdir('/work/x')\n    os.chroot('/work/x')\n"
                          "    return a + b", ADD, 0.0),
        "background_daemon": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    while True:\n"
                              "        time.sleep(1)\n" + wrong_add, ADD, 0.0),
        # faking the verdict
        "sys_exit_0_at_load": ("import sys\nsys.exit(0)", ADD, 0.0),
        "os_exit_0_at_load": ("import os\nos._exit(0)", ADD, 0.0),
        "os_exit_0_in_call": ("import os\ndef add(a, b):\n    os._exit(0)", ADD, 0.0),
        "print_fake_success": ("print('PASSED')\nprint('All tests passed')\nimport sys\n"
                               "sys.stderr.write('OK\\n')\n" + wrong_add, ADD, 0.0),
        "always_equal_object": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                "    __hash__ = object.__hash__\n    def __bool__(self):\n        return True\n"
                                "def add(a, b):\n    return Yes()", ADD, 0.0),
        "int_subclass_equal": ("class Five(int):\n    def __eq__(self, other):\n        return True\n"
                               "def add(a, b):\n    return Five(99)", ADD, 0.0),
        "patch_builtins_and_assert": ("import builtins\n"
                                      "builtins.AssertionError = type('AssertionError', (BaseException,), {})\n"
                                      "builtins.isinstance = lambda *a: True\n" + wrong_add, ADD, 0.0),
        "patch_harness": ("import __main__\n__main__.encode = lambda x, handle=None, depth=0: 5\n"
                          "__main__.decode = lambda x, resolve=None, depth=0: x\n" + wrong_add, ADD, 0.0),
        "shadow_a_module_the_test_uses": ("class math:\n    @staticmethod\n    def isclose(*args, **kwargs):\n"
                                          "        return True\n" + wrong_add,
                                          ["assert math.isclose(add(0.1, 0.2), 0.3)"], 0.0),
        "forge_channel_frames": ("import os, json, struct\n"
                                 "frame = json.dumps({'ok': True}).encode()\n"
                                 "for fd in range(3, 12):\n"
                                 "    try:\n"
                                 "        os.write(fd, struct.pack('>I', len(frame)) + frame * 1)\n"
                                 "    except OSError:\n"
                                 "        pass\n" + wrong_add, ADD, 0.0),
        "garbage_on_channel": ("import os\nfor fd in range(3, 12):\n    try:\n"
                               "        os.write(fd, b'\\xff\\xff\\xff\\xffgarbage')\n    except OSError:\n"
                               "        pass\n" + wrong_add, ADD, 0.0),
        # grading control flow: an exception the test's own machinery catches must not pass a test
        "stopiteration_passes_all_map": ("def add(a, b):\n    raise StopIteration",
                                         ["assert all(map(lambda p: add(*p) == sum(p), [(2, 3), (-1, 1)]))"], 0.0),
        "stopiteration_passes_not_any_map": ("def add(a, b):\n    raise StopIteration",
                                             ["assert not any(map(lambda p: add(*p) != sum(p), [(2, 3)]))"], 0.0),
        # a reply that would stall the trainer: 45,000 distinct ints with one hash (multiples of
        # 2**61 - 1), forged straight onto the channel as a set and as dict keys
        "hash_collision_set_reply": (HASH_FLOOD.format(tag="$s", values="vals"), ADD, 0.0),
        "hash_collision_dict_reply": (HASH_FLOOD.format(tag="$d", values="[[v, 0] for v in vals]"), ADD, 0.0),
        # probes: honest code reporting what it sees; these must pass
        "probe_only_loopback": ("import socket\ndef ifaces():\n    return [n for _, n in socket.if_nameindex()]",
                                ["assert ifaces() == ['lo']"], 1.0),
        "probe_network_unreachable": ("import socket, errno\ndef err():\n    try:\n"
                                      "        socket.create_connection(('1.1.1.1', 80), timeout=1)\n"
                                      "    except OSError as e:\n        return e.errno\n    return 0",
                                      ["import errno\nassert err() == errno.ENETUNREACH"], 1.0),
        "probe_unprivileged_and_alone": ("import os\ndef me():\n    return (os.geteuid() != 0, os.getpid(),"
                                         " os.path.exists('/proc'), os.path.exists('/work/main'),"
                                         " os.path.exists('/root/.ssh'), os.environ.get('PATH'))",
                                         ["assert me() == (True, 2, False, False, False, "
                                          "'/usr/local/bin:/usr/bin:/bin')"], 1.0),
        # the interpreter is bound at /opt/python when it lives outside the system directories: no
        # host path of it (e.g. /root/.pyenv/...) exists inside, and no home directory at all
        "probe_no_host_python_path": ("import os, sys\ndef where():\n    return (os.path.exists("
                                      f"{os.path.realpath(sys.base_prefix)!r}) and not "
                                      f"{os.path.realpath(sys.base_prefix)!r}.startswith('/usr'), "
                                      "os.path.exists('/root'), os.path.exists('/home'),"
                                      " sys.version_info[:2])",
                                      [f"assert where() == (False, False, False, {tuple(sys.version_info[:2])!r})"],
                                      1.0),
        "probe_readonly_system": ("def tries():\n    out = []\n    for p in ('/usr/x', '/sandbox/server.py', '/x'):\n"
                                  "        try:\n            open(p, 'a').close()\n            out.append('written')\n"
                                  "        except OSError:\n            out.append('refused')\n    return out",
                                  ["assert tries() == ['refused', 'refused', 'refused']"], 1.0),
    }


@pytest.fixture(scope="module")
def reward():
    return code_reward_or_skip(timeout=1.5, max_concurrency=6, memory_bytes=512 << 20, processes=16)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    d = tmp_path_factory.mktemp("sandbox_host")
    (d / "secret.txt").write_text(SECRET + "\n")
    os.chmod(d, 0o755)
    os.chmod(d / "secret.txt", 0o644)  # world-readable on the host: only isolation keeps it out
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield d, listener
    listener.close()


@pytest.fixture(scope="module")
def results(reward, host):
    host_dir, listener = host
    cases = attacks(host_dir, listener.getsockname()[1])
    before = _open_descriptors()
    t0 = time.monotonic()
    grades = reward(None, [fenced(src) for src, _, _ in cases.values()], tests=[t for _, t, _ in cases.values()])
    graded = {name: (grade, expected) for name, grade, (_, _, expected) in zip(cases, grades, cases.values(), strict=True)}
    return graded, time.monotonic() - t0, before, _open_descriptors()


def _open_descriptors() -> dict[str, int]:
    """The trainer's open file descriptors by kind (socket, pipe, file, ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":", 1)[0] if ":[" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


@pytest.mark.parametrize("name", list(attacks(Path("/tmp"), 1)))
def test_attack_is_contained_and_graded(results, name):
    grades = results[0]
    grade, expected = grades[name]
    assert grade == expected, f"{name}: graded {grade}, expected {expected}"


def test_the_batch_was_bounded_in_time(results):
    seconds = results[1]
    # 48 solutions, 6 at a time, each at most ~ start-up + one 1.5 s timeout
    assert seconds < 40


def test_nothing_escaped_to_the_host(results, host):
    host_dir, listener = host
    assert not (host_dir / "escape.txt").exists()
    assert not Path("/tmp/escape.txt").exists()
    assert not Path("/work/main/pwned.txt").exists() and not Path("/usr/pwned.txt").exists()
    with pytest.raises(BlockingIOError):  # nobody connected to the host's loopback listener
        listener.accept()


def test_the_trainer_holds_no_connection_or_pipe_afterwards(results):
    before, after = results[2], results[3]
    # every sandbox's channel is closed once graded; no socket was opened on the trainer's side
    assert after.get("socket", 0) <= before.get("socket", 0), (before, after)
    assert after.get("pipe", 0) <= before.get("pipe", 0), (before, after)


def _sandbox_processes(base_uid: int = 1_300_000_000) -> list[str]:  # LocalSandbox's uid range
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        uid = int(fields.get("Uid", "0").split()[0])
        if base_uid <= uid < base_uid + 4096 * 128:
            found.append(f"{status.parent.name}: {fields.get('Name', '').strip()}")
    return found


def test_no_sandbox_process_survives(results):
    deadline = time.monotonic() + 5
    while _sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _sandbox_processes() == []  # fork bomb children, the setsid daemon: all gone


def test_stdin_stdout_attacks(reward, host):
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
    cases = {
        "control": ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
        "print_fake_success": ("print('PASSED')\nprint('5')", 0.0),  # right token on test 1, extra one
        "exit_before_output": ("import sys\nsys.exit(0)", 0.0),
        "read_expected_from_disk": ("import os\nfound = []\nfor root, _, files in os.walk('/'):\n"
                                    "    for f in files:\n        if f.startswith(('.exp', 'expected')):\n"
                                    "            found.append(open(os.path.join(root, f)).read())\n"
                                    "print(found[0] if found else 'nothing')", 0.0),
        "infinite_output": ("while True:\n    print('5' * 1000)", 0.0),
        "timeout": ("while True:\n    pass", 0.0),
        # prints the right answer of test 1 only, and leaves a setsid'd daemon that rewrites the
        # next run's output with test 2's answer: only test 1 may pass
        "daemon_rewrites_next_output": (LEAKING_DAEMON, 0.5),
    }
    grades = reward(None, [fenced(s) for s, _ in cases.values()], tests=[tests] * len(cases))
    assert dict(zip(cases, grades, strict=True)) == {k: v for k, (_, v) in cases.items()}


def test_sandbox_refuses_to_run_when_isolation_fails(monkeypatch, tmp_path):
    broken = tmp_path / "launcher.py"
    broken.write_text("import sys\nsys.stderr.write('unshare: Operation not permitted\\n')\nsys.exit(1)\n")
    monkeypatch.setattr("grpokit.rewards.sandbox.LAUNCHER_PATH", broken)
    with pytest.raises(SandboxUnavailable, match="Operation not permitted"):
        CodeReward(sandbox=LocalSandbox())
    with pytest.raises(SandboxUnavailable):
        CodeReward(sandbox="local")


def test_session_wall_clock_kills_a_silent_sandbox():
    sandbox = LocalSandbox()
    session = sandbox.start(SandboxLimits(wall_seconds=0.5))
    t0 = time.monotonic()
    session.send({"op": "load", "mode": "assert", "source": "while True: pass"})
    with pytest.raises(Exception, match="deadline|exited"):
        session.recv()
    session.close()
    assert time.monotonic() - t0 < 3 and session.proc.returncode is not None


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3.11").exists() or
                    not Path("/usr/bin/setpriv").exists(), reason="needs root, setpriv and a system python3.11")
def test_unprivileged_user_namespace_path(tmp_path):
    """The same sandbox started by a non-root user: a user namespace whose only user has no capabilities."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    script = (
        "from grpokit.rewards.code import CodeReward\n"
        # an unprivileged user cannot create cgroups: the explicit opt-out to per-process limits
        "r = CodeReward(timeout=1.5, max_concurrency=4, memory_limit='rlimit')\n"
        "f = lambda s: '```python\\n' + s + '\\n```'\n"
        "sols = ['def add(a, b):\\n    return a + b',\n"
        "        'import os\\nos.chroot(\"/work\")\\ndef add(a, b):\\n    return a + b',\n"
        "        'import ctypes\\nlibc = ctypes.CDLL(None, use_errno=True)\\n'\n"
        "        'assert libc.mount(None, b\"/usr\", None, 32 | 4096, None) == 0\\ndef add(a, b):\\n    return a + b',\n"
        "        'open(\"/usr/x\", \"w\")\\ndef add(a, b):\\n    return a + b',\n"
        "        'import socket\\ndef add(a, b):\\n    socket.create_connection((\"1.1.1.1\", 53), timeout=1)',\n"
        "        'import os\\nos.kill(-1, 9)\\ndef add(a, b):\\n    return a + b']\n"
        "print(r(None, [f(s) for s in sols], tests=[['assert add(2, 3) == 5']] * len(sols)))\n")
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3.11",
                          "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
                         capture_output=True, text=True, timeout=60)
    if "SandboxUnavailable" in out.stderr:
        pytest.skip("unprivileged user namespaces are disabled here: " + out.stderr.splitlines()[-1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]"


def test_shared_memory_is_bounded_by_the_cgroup_not_by_rlimits():
    """Sensitivity: with per-process limits only (the opt-out) the SysV shared memory bomb fills
    1.5 GiB under a 512 MiB limit and passes; the suite's 0.0 above comes from the cgroup."""
    try:
        unbounded = CodeReward(timeout=4, max_concurrency=1, memory_bytes=512 << 20, memory_limit="rlimit")
    except SandboxUnavailable as e:
        pytest.skip(f"no local sandbox: {e}")
    assert unbounded(None, [fenced(SHM_BOMB)], tests=[ADD]) == [1.0]


def test_without_a_cgroup_the_sandbox_fails_closed(tmp_path):
    """An unprivileged user has no cgroup to bound the sandbox's memory: CodeReward refuses to
    run (naming the opt-out) instead of running with per-process limits that shared memory escapes."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    script = "from grpokit.rewards.code import CodeReward\nCodeReward(timeout=1.5)\n"
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3.11",
                          "-c", script], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": src},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "cannot bound its memory" in out.stderr and "memory_limit='rlimit'" in out.stderr, out.stderr[-2000:]


def test_the_suite_detects_a_missing_sandbox(tmp_path):
    """Sensitivity check: a few harmless attacks, run with isolation switched off, do get through,
    so the grades asserted above are the sandbox's doing, not a harness that fails everything."""
    (tmp_path / "secret.txt").write_text(SECRET)
    cases = attacks(tmp_path, 1)
    names = ["control", "read_host_secret", "write_outside_host_tmp", "probe_only_loopback",
             "probe_unprivileged_and_alone"]
    unsafe = CodeReward(timeout=1.5, sandbox="unsafe-local")
    grades = unsafe(None, [fenced(cases[n][0]) for n in names], tests=[cases[n][1] for n in names])
    assert dict(zip(names, grades, strict=True)) == {"control": 1.0, "read_host_secret": 1.0, "write_outside_host_tmp": 1.0,
                                        "probe_only_loopback": float(len(socket.if_nameindex()) == 1),
                                        "probe_unprivileged_and_alone": 0.0}
    assert (tmp_path / "escape.txt").read_text() == "pwned"


def test_decoding_refuses_one_hash_shared_by_many_values_and_keeps_ordinary_sets():
    """Building a hash table of n values with one hash costs n**2 comparisons in one C call (45k:
    ~20 s) that no deadline interrupts: such a reply is refused after one linear pass; ordinary
    large sets and dicts decode as before."""
    from grpokit.rewards._sandbox_server import MAX_SAME_HASH, decode, encode

    flood = [k * (2 ** 61 - 1) for k in range(1, 45001)]
    for msg in ({"$s": flood}, {"$fs": flood}, {"$d": [[v, 0] for v in flood]}):
        t0 = time.monotonic()
        with pytest.raises(ValueError, match="share one hash"):
            decode(msg)
        assert time.monotonic() - t0 < 0.5
    big = set(range(100_000)) | {"a", (1, 2)}
    assert decode(encode(big)) == big
    assert decode(encode({i: str(i) for i in range(50_000)})) == {i: str(i) for i in range(50_000)}
    few = [k * (2 ** 61 - 1) for k in range(1, MAX_SAME_HASH + 1)]  # a few collisions are fine
    assert decode({"$s": few}) == set(few)


def test_a_hash_flood_reply_costs_one_completion_no_more_than_a_timeout(reward):
    t0 = time.monotonic()
    grades = reward(None, [fenced(HASH_FLOOD.format(tag="$s", values="vals"))], tests=[ADD])
    seconds = time.monotonic() - t0
    assert grades == [0.0]
    assert seconds < 5, seconds  # was 18-26 s: the set was built in the trainer outside every deadline


def test_an_interpreter_outside_the_system_dirs_is_bound_at_a_neutral_path():
    from grpokit.rewards.sandbox import sandbox_binds
    binds, python, libs = sandbox_binds("/root/.pyenv/versions/3.11.7/bin/python3.11", "/root/.pyenv/versions/3.11.7")
    assert ("/root/.pyenv/versions/3.11.7", "/opt/python") in binds
    assert python == "/opt/python/bin/python3.11"
    assert not any(inside.startswith("/root") for _, inside in binds)
    # a system interpreter keeps its path and needs nothing more
    binds, python, libs = sandbox_binds("/usr/bin/python3.11", "/usr")
    assert python == "/usr/bin/python3.11" and libs == "" and all(host == inside for host, inside in binds)
    # an executable outside its prefix (some venv layouts) gets a directory of its own
    binds, python, _ = sandbox_binds("/srv/py/bin/python3", "/opt/conda/envs/x")
    assert python == "/opt/python-bin/python3" and ("/srv/py/bin", "/opt/python-bin") in binds
