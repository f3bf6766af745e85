"""The judges against a real OpenAI-compatible server that the test starts (`transformers serve`,
tests/helpers_server.py; no mock of the HTTP API): the OpenAI backend's requests reach it and its
answers come back, through the trainer; a tiny random model answers nonsense, so every group is
counted as failed and left at advantage 0 without stopping the run; a server that is down is
retried within the deadline, counted and survived; SmolLM2-135M's GGUF served as it is gives readable
verdicts."""

import json

import pytest

from tests.helpers_server import missing_serve_packages, openai_server, served_model, smollm2_serve_name

pytestmark = pytest.mark.slow

if missing_serve_packages():
    pytest.skip(f"transformers serve and the openai client need {', '.join(missing_serve_packages())} "
                "(pip install 'grpokit[judges]'), not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    """A tiny chat model with room for a judge's request (character tokens: a listwise request of
    4 candidates is ~500 of them; a longer one is the server's 400)."""
    from grpokit.models import save_model
    from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

    path = str(tmp_path_factory.mktemp("judge-chat") / "model")
    tokenizer = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    save_model(make_tiny_model(tokenizer, arch="llama", num_kv_heads=4, max_positions=2048), tokenizer, path)
    with openai_server(path) as base_url:
        yield base_url, path


@pytest.mark.train
def test_a_judge_behind_a_server_through_the_trainer(tiny_server, tmp_path):
    from grpokit.rewards.judges import JudgeReward, OpenAIBackend
    from tests.helpers import tiny_grpo_trainer

    base_url, path = tiny_server
    answers = []

    class Recording(OpenAIBackend):  # the real client, its answers kept for the assertions
        async def complete_many(self, requests):
            out = await super().complete_many(requests)
            answers.extend(out)
            return out

    judge = JudgeReward(backend=Recording(path, base_url=base_url, max_tokens=12, max_concurrency=4),
                        max_retries=1, deadline_s=60)
    trainer = tiny_grpo_trainer(tmp_path, [judge, lambda completions, **kw: [len(c) / 10 for c in completions]],
                        reward_timeout=120)
    trainer.train()
    assert answers and all(isinstance(a, str) for a in answers)  # every request answered by the server
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    judged = [r for r in rows if "judge/calls" in r]
    assert len(judged) == 2  # both steps ran; the tiny model's nonsense is counted, not fatal
    assert all(r["judge/frac_failed"] + r["judge/frac_identical"] + r["judge/frac_low_agreement"] <= 1.0
               for r in judged)
    unreadable = sum(r["judge/frac_failed"] for r in judged)
    assert unreadable > 0 and judged[-1]["rewards/judge/frac_none"] > 0


def test_concurrency_and_rate_limits_hold_against_the_server(tiny_server):
    """max_concurrency=2: never more than 2 requests in flight; requests_per_second=10: 6 requests
    start over at least 0.5 s (one every 0.1 s)."""
    import asyncio
    import time

    from grpokit.rewards.judges import OpenAIBackend

    base_url, path = tiny_server
    in_flight, peak, starts = 0, 0, []

    async def on_request(request):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        starts.append(time.perf_counter())

    async def on_response(response):
        nonlocal in_flight
        in_flight -= 1

    backend = OpenAIBackend(path, base_url=base_url, max_tokens=4, max_concurrency=2, requests_per_second=10)

    async def run():
        backend._bind()
        backend._client._client.event_hooks = {"request": [on_request], "response": [on_response]}  # the HTTP client
        return await backend.complete_many([[{"role": "user", "content": f"hi {i}"}] for i in range(6)])

    answers = asyncio.run(run())
    assert all(isinstance(a, str) for a in answers), answers
    assert peak <= 2 and len(starts) == 6
    assert starts[-1] - starts[0] >= 0.45  # 0.5 s of pacing; the first send is measured a little late


def test_a_server_that_is_down_is_retried_and_counted(tmp_path):
    import asyncio
    import time

    from grpokit.rewards.judges import JudgeReward
    from tests.helpers_server import free_port

    judge = JudgeReward(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_retries=2, deadline_s=10)
    metrics = {}
    start = time.perf_counter()
    out = asyncio.run(judge(["q"] * 3, ["a", "bb", "ccc"], log_metric=lambda k, v: metrics.setdefault(k, v)))
    assert out == [None] * 3 and metrics["judge/frac_failed"] == 1.0 and metrics["judge/calls"] == 6
    assert time.perf_counter() - start < 10


def test_smollm2_behind_transformers_serve_gives_verdicts():
    """The real judge path end to end: the GGUF file served as it is, the listwise and pairwise
    judges' requests, answers read (JSON or plain text) into rankings."""
    import openai

    from grpokit.rewards.judges import JudgeReward, OpenAIBackend, PairwiseJudgeReward

    try:
        model = smollm2_serve_name()
    except Exception as e:  # noqa: BLE001  # the smollm2 extra is not installed
        pytest.skip(f"SmolLM2's GGUF file is not installed: {e}")
    with openai_server(model, timeout_s=300) as base_url:
        assert served_model(base_url) == model  # requests name the file as the command line did
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content  # a real model answers (served from the GGUF file)
        backend = OpenAIBackend(model, base_url=base_url, max_tokens=40, max_concurrency=4, timeout=120)
        comps = ["The capital of France is Paris.", "Berlin.", "I am not sure."]
        listwise = JudgeReward(backend=backend, min_agreement=None, deadline_s=240).rank_group(
            "What is the capital of France?", comps)
        pairwise = PairwiseJudgeReward(backend=backend, min_agreement=None, deadline_s=240).rank_group(
            "What is the capital of France?", comps)
    assert listwise.calls >= 2 and pairwise.calls >= 4
    assert listwise.ranks is not None or pairwise.ranks is not None, (listwise.reason, pairwise.reason)
    for verdict in (listwise, pairwise):
        if verdict.ranks is not None:  # a rank vector over the 3 candidates: each in [1, 3], summing to 1+2+3
            assert len(verdict.ranks) == 3 and all(1 <= r <= 3 for r in verdict.ranks)
            assert sum(verdict.ranks) == pytest.approx(6.0)
