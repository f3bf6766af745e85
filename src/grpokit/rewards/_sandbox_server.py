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

This file is also imported by the trainer for `encode`/`decode` (the only shared code).
"""

import base64
import json
import math
import os
import struct
import sys

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
        return dict(zip(keys, (decode(pair[1], resolve, d) for pair in v)))
    raise ValueError(f"unknown tag {tag!r}")


def _read_exact(fd, n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def _serve():
    import subprocess

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

    reaper = os.environ.get("GRPOKIT_REAPER")
    reap_request, reap_ack = (int(fd) for fd in reaper.split(",")) if reaper else (None, None)

    def reap():
        """Ask the sandbox's init to end every process but this one, and wait until it has (a
        LocalSandbox with isolation; elsewhere the run's own session is all that is ended)."""
        if reap_request is None:
            return
        os.write(reap_request, b"r")
        if os.read(reap_ack, 1) != b"k":
            raise RuntimeError("the sandbox's init did not end the run's processes")

    def run_io(stdin, timeout, output_limit):
        with open(os.path.join(workdir, ".stdin"), "wb") as f:
            f.write(stdin.encode())
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")

        def limit_output():
            import resource
            resource.setrlimit(resource.RLIMIT_FSIZE, (output_limit + 1, output_limit + 1))

        with open(os.path.join(workdir, ".stdin"), "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", "solution.py"], stdin=fin, stdout=fout,
                                    stderr=ferr, cwd=workdir, start_new_session=True, preexec_fn=limit_output)
            timed_out = False
            try:
                code = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out, code = True, None
            try:
                os.killpg(proc.pid, 9)  # the run and anything it started in its session
            except OSError:
                pass
            if code is None:
                code = proc.wait()
            reap()  # ... and in any other session (setsid daemons), before the output is read
        with open(out_path, "rb") as f:
            out = f.read(output_limit + 1)
        with open(err_path, "rb") as f:
            err = f.read(2000)
        return {"stdout": out[:output_limit].decode("utf-8", "replace"), "truncated": len(out) > output_limit,
                "exit": code, "timed_out": timed_out, "stderr": err.decode("utf-8", "replace")}

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
