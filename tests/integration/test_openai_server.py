"""tests/helpers_server.openai_server: a real `transformers serve` on a model saved by the test,
offline, answered through the `openai` client as the judges will call any OpenAI-compatible server;
the model id requests name, a failed start that shows the server's log, and no process left behind.
SmolLM2-135M-Instruct's GGUF file serves as it is (`<folder>:<file>.gguf`; tested in test_judge_server.py)."""

import os
import time

import pytest

from tests.helpers_server import (group_members, missing_serve_packages, openai_server, save_tiny_chat_model,
                                  served_model)

pytestmark = pytest.mark.slow

if missing_serve_packages():
    pytest.skip(f"transformers serve and the openai client need {', '.join(missing_serve_packages())} "
                "(pip install 'grpokit[judges]'), not installed", allow_module_level=True)

import openai  # noqa: E402

HELLO = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """(base_url, model id) of a server on a tiny Llama with a chat template, started once for the module."""
    path = save_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat") / "model")
    start = time.perf_counter()
    with openai_server(path) as base_url:
        print(f"\ntransformers serve (tiny model) up in {time.perf_counter() - start:.1f} s")
        yield base_url, path


def test_a_chat_completion_through_the_openai_client(tiny_server):
    base_url, path = tiny_server
    assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [path]  # the id requests name: the path as given
    latencies = []
    for _ in range(3):
        start = time.perf_counter()
        reply = client.chat.completions.create(model=path, messages=HELLO, max_tokens=8, temperature=0)
        latencies.append(time.perf_counter() - start)
        text = reply.choices[0].message.content
        assert isinstance(text, str) and text.strip(), reply
        assert reply.usage.completion_tokens > 0
    print(f"chat.completions.create, 8 tokens: {', '.join(f'{t:.3f}' for t in latencies)} s")


def test_the_server_answers_only_for_its_model(tiny_server):
    base_url, path = tiny_server
    assert served_model(base_url) == path
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="some/other-model", messages=HELLO, max_tokens=4)
    assert e.value.status_code == 400
    assert e.value.response.json()["detail"] == f"Server is pinned to '{path}'; requested 'some/other-model'."


def test_a_server_that_cannot_start_shows_its_log(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError) as e:
        with openai_server(str(tmp_path / "empty"), timeout_s=120):
            pass
    message = str(e.value)
    assert "exited with code" in message and str(tmp_path / "empty") in message
    assert "Traceback" in message or "Error" in message, message  # the server's own log


def test_nothing_is_left_running(tmp_path):
    path = save_tiny_chat_model(tmp_path / "model", seed=1)
    with openai_server(path) as base_url:
        pgid = _server_pgid(base_url)
        assert len(group_members(pgid)) >= 2  # the server and its model's process (and multiprocessing's tracker)
    assert group_members(pgid) == []  # (a zombie init has not reaped yet is not running)


def _server_pgid(base_url: str) -> int:
    """The process group of the server listening on base_url's port (read from /proc)."""
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            for line in open(table).read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                    inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            links = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        if any(f"socket:[{inode}]" in links for inode in inodes):
            return os.getpgid(int(pid))
    raise AssertionError(f"no process listens on port {port}")


# SmolLM2-135M's GGUF file served as it is (`<folder>:<file>.gguf`): in test_judge_server.py, which
# asks it a question and then uses it as a judge (one server start for both: the model loads in ~20 s).
