"""The ranking page and the `human` reward over real HTTP (issue 26): the token, the Host check,
escaping, bad rankings (400/404/409), each labeller's own shown order mapped back; the reward
through RewardRunner with a scripted labeller ranking through the API while the runner waits
(hidden preference: shorter completions), the deadline and the fallback, human_fraction, the
agreement with the fallback, resume; and two training steps whose rankings arrive in the step."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from grpokit.feedback.reward import HumanFeedbackReward
from grpokit.feedback.server import FeedbackServer
from grpokit.feedback.store import FeedbackStore, group_id
from grpokit.rewards import RewardRunner, group_reward, resolve_reward

TOKEN = "test-token"


def call(base, path, body=None, token=TOKEN, headers=None, via="header"):
    """-> (status, headers, parsed JSON or text)."""
    url = base + path
    h = dict(headers or {})
    if token is not None and via == "header":
        h["X-Feedback-Token"] = token
    elif token is not None:
        url += ("&" if "?" in url else "?") + f"token={token}"
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers=h, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, head, raw = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, dict(e.headers), e.read().decode()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw


@pytest.fixture
def served(tmp_path):
    store = FeedbackStore(tmp_path)
    server = FeedbackServer(store, token=TOKEN)
    server.start()
    yield store, server, f"http://127.0.0.1:{server.port}"
    server.stop()
    store.close()


def test_every_request_needs_the_token(served):
    store, server, base = served
    assert server.url == f"{base}/?token={TOKEN}"
    for path in ("/", "/api/next?labeller=ann", "/api/progress", "/nowhere"):
        for token in (None, "wrong", TOKEN[:-1]):
            status, _, body = call(base, path, token=token)
            assert status == 403 and "token" in body, (path, token)
    status, _, body = call(base, "/api/rank", {"group_id": "x", "labeller": "a", "ranking": [0]}, token=None)
    assert status == 403
    assert call(base, "/api/progress")[0] == 200                      # the header the page sends
    assert call(base, "/api/progress", via="query")[0] == 200         # the printed URL's ?token=
    assert call(base, "/", via="query")[0] == 200
    # bound to loopback, a request addressed to another host name is refused (DNS rebinding)
    status, _, body = call(base, "/api/progress", headers={"Host": f"evil.example:{server.port}"})
    assert status == 403 and "127.0.0.1 or localhost" in body
    assert call(base, "/api/progress", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_binding_elsewhere_than_loopback_warns(tmp_path, caplog):
    store = FeedbackStore(tmp_path)
    server = FeedbackServer(store, host="0.0.0.0", token=TOKEN)
    with caplog.at_level("WARNING", logger="grpokit.feedback"):
        server.start()
    try:
        assert "not to loopback" in caplog.text
        # bound elsewhere, other host names are allowed, the token still is not optional
        assert call(f"http://127.0.0.1:{server.port}", "/api/progress", headers={"Host": "box.lan"})[0] == 200
        assert call(f"http://127.0.0.1:{server.port}", "/api/progress", token=None)[0] == 403
    finally:
        server.stop()
        store.close()


def test_prompts_and_candidates_are_text_never_html(served):
    store, server, base = served
    evil = "<script>document.title='owned'</script><img src=x onerror=alert(1)>"
    prompt = [{"role": "system", "content": "<b>be brief</b>"}, {"role": "user", "content": "say </textarea>"}]
    gid = store.add_group(prompt, [evil, "plain"], step=1)
    status, head, body = call(base, "/api/next?labeller=ann")
    assert status == 200 and head["content-type"] == "application/json" and head["x-content-type-options"] == "nosniff"
    assert body["group"]["id"] == gid and sorted(body["group"]["candidates"]) == sorted([evil, "plain"])
    assert body["group"]["prompt"] == [{"role": "system", "content": "<b>be brief</b>", "images": []},
                                       {"role": "user", "content": "say </textarea>", "images": []}]
    status, head, page = call(base, "/")
    assert status == 200 and head["content-type"].startswith("text/html")
    assert evil not in page and "be brief" not in page  # the page carries no data; the API gives it as JSON
    # the page's only way to show data is textContent / text nodes, never an HTML sink
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in page, sink
    assert "textContent" in page and "createTextNode" in page
    # and its policy runs only its own script (the per-response nonce), requests only to itself
    csp = head["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert re.findall(r"<script([^>]*)>", page) == [f' nonce="{nonce}"']
    assert head["referrer-policy"] == "no-referrer" and "src=" not in page.replace("script-src", "")  # no external assets
    assert call(base, "/")[1]["content-security-policy"] != csp  # a fresh nonce each time


def test_bad_rankings_are_refused_with_a_reason(served):
    store, server, base = served
    gid = store.add_group("p", ["a", "b", "c"], step=1)
    rank = lambda body: call(base, "/api/rank", body)  # noqa: E731
    status, _, body = rank({"group_id": gid, "labeller": "ann", "ranking": [0, 1]})
    assert status == 400 and "each of the 3 candidates" in body["error"]
    assert rank({"group_id": gid, "labeller": "ann", "ranking": [0, 1, 1]})[0] == 400
    assert rank({"group_id": gid, "labeller": "ann", "ranking": [0, 1, 5]})[0] == 400
    assert rank({"group_id": gid, "labeller": "ann"})[0] == 400
    assert rank({"group_id": gid, "labeller": "", "ranking": [0, 1, 2]})[0] == 400
    assert call(base, "/api/rank", b"{not json")[0] == 400
    assert call(base, "/api/next")[0] == 400  # no labeller
    status, _, body = rank({"group_id": "f" * 32, "labeller": "ann", "ranking": [0, 1, 2]})
    assert status == 404
    assert rank({"group_id": gid, "labeller": "ann", "ranking": [0, [1, 2]]})[0] == 200
    status, _, body = rank({"group_id": gid, "labeller": "ann", "ranking": [0, 1, 2]})
    assert status == 409 and "already answered" in body["error"]
    status, _, body = rank({"group_id": gid, "labeller": "bob", "skip": True})
    assert status == 200 and body["skipped"] is True
    store.close_groups([gid])  # the step is over
    status, _, body = rank({"group_id": gid, "labeller": "cy", "ranking": [0, 1, 2]})
    assert status == 409 and "not waiting" in body["error"]
    assert [r.labeller for r in store.rankings_for(gid, include_skipped=True)] == ["ann", "bob"]


def test_each_labeller_sees_an_order_of_their_own_mapped_back(served):
    store, server, base = served
    texts = [f"candidate {i}" for i in range(5)]
    gid = store.add_group("p", texts, step=4)
    shown = {}
    for name in ["ann"] + [f"bob{k}" for k in range(20)]:
        got = call(base, f"/api/next?labeller={name}")[2]["group"]
        assert got["step"] == 4 and sorted(got["candidates"]) == texts
        assert call(base, f"/api/next?labeller={name}")[2]["group"]["candidates"] == got["candidates"]  # stable
        shown[name] = got["candidates"]
        if name != "ann" and shown[name] != shown["ann"]:
            break
    assert shown[name] != shown["ann"]
    for who in ("ann", name):
        # the labeller's hidden preference: candidate 0 best, 4 worst, 2 and 3 tied; in shown positions
        pos = {t: p for p, t in enumerate(shown[who])}
        ranking = [pos["candidate 0"], pos["candidate 1"], [pos["candidate 2"], pos["candidate 3"]], pos["candidate 4"]]
        status, _, body = call(base, "/api/rank", {"group_id": gid, "labeller": who, "ranking": ranking})
        assert status == 200 and body["ranking"] == [[0], [1], [2, 3], [4]]
    assert [r.ranking for r in store.rankings_for(gid)] == [[[0], [1], [2, 3], [4]]] * 2
    assert server.shown_order("ann", gid, 5) == [texts.index(t) for t in shown["ann"]]  # kept server-side
    assert call(base, "/api/progress")[2] == {"waiting": 1, "ranked": 1, "rankings": 2, "step": 4}


# a minimal DOM for the page's script under node: drives it with keys and clicks, records what it sends
PAGE_HARNESS = r"""
const fs = require("fs");
const sent = [];
const keyHandlers = [];
const elements = {};
function fake(tag) {
  const e = {tag, children: [], textContent: "", value: "", className: "", listeners: {},
    append(...xs) { this.children.push(...xs); }, replaceChildren() { this.children = []; },
    addEventListener(type, f) { (this.listeners[type] = this.listeners[type] || []).push(f); },
    click() { (this.listeners.click || []).forEach((f) => f()); }, blur() {}};
  return e;
}
global.document = {
  getElementById(id) { return elements[id] = elements[id] || fake("#" + id); },
  createElement: (tag) => fake(tag),
  createTextNode: (text) => ({tag: "#text", text}),
  addEventListener(type, f) { if (type === "keydown") keyHandlers.push(f); },
};
global.localStorage = {getItem: () => null, setItem() {}};
global.location = {search: "?token=T"};
global.setInterval = () => 0;
const queue = [];
global.fetch = async (path, opts) => {
  sent.push({path, token: opts.headers["X-Feedback-Token"], body: opts.body ? JSON.parse(opts.body) : null});
  const reply = queue.shift() || {group: null, progress: {waiting: 0, ranked: 0, step: null}};
  return {ok: true, status: 200, json: async () => reply};
};
const group = {id: "g1", step: 2, prompt: [{role: "user", content: "<b>hi</b>"}],
               candidates: ["<script>x()</script>", "two", "three", "four"]};
const progress = {waiting: 1, ranked: 0, step: 2};
const tick = () => new Promise((r) => setTimeout(r, 5));
function key(k) { keyHandlers.forEach((f) => f({key: k, target: null, preventDefault() {}})); }
(async () => {
  eval(fs.readFileSync(process.argv[2], "utf8"));
  await tick();
  document.getElementById("name").value = "ann";
  queue.push({group, progress});
  document.getElementById("start").click();
  await tick();
  const cards = document.getElementById("cands").children;
  const texts = cards.map((c) => c.children.filter((x) => x.tag === "#text").map((x) => x.text).join(""));
  const turn = document.getElementById("prompt").children[0].children;
  key("2"); key("4"); key("Backspace"); key("3"); key("9"); key("3"); key("t");
  const badges = document.getElementById("cands").children.map((c) => c.children.filter((x) => x.className === "badge").map((x) => x.textContent).join(""));
  queue.push({ok: true, progress}, {group: {...group, id: "g2"}, progress});
  key("Enter");
  await tick();
  queue.push({ok: true, progress}, {group: {...group, id: "g3"}, progress});
  key("s");
  await tick();
  key("1"); key("2"); key("3");  // one left: Enter places it last
  queue.push({ok: true, progress}, {group: null, progress});
  document.getElementById("submit").click();
  await tick();
  console.log(JSON.stringify({sent, texts, turn: turn.map((x) => x.textContent || x.text), badges,
                              empty: document.getElementById("cands").children.length,
                              progress: document.getElementById("progress").textContent}));
  process.exit(0);  // the page polls for the next group every 2 s
})();
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the browser test is a later step)")
def test_the_page_script_ranks_with_the_keyboard_and_the_mouse(tmp_path):
    """Not a browser (that test is a later step): the page's own script under node with a stub DOM.
    Keys 2, 4, Backspace, 3, then 9 (no such candidate) and 3 again (placed) are ignored, T ties
    the rest, Enter submits; S skips; with one candidate left, the Submit button places it last.
    Every text reaches the page as a text node; the token goes with every request."""
    from importlib import resources

    page = (resources.files("grpokit") / "assets" / "feedback" / "page.html").read_text()
    (tmp_path / "page.js").write_text(re.search(r"<script[^>]*>(.*)</script>", page, re.S).group(1))
    (tmp_path / "harness.js").write_text(PAGE_HARNESS)
    done = subprocess.run(["node", str(tmp_path / "harness.js"), str(tmp_path / "page.js")], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {s["token"] for s in out["sent"]} == {"T"}
    assert [(s["path"], s["body"]) for s in out["sent"]] == [
        ("/api/next?labeller=ann", None),
        ("/api/rank", {"group_id": "g1", "labeller": "ann", "ranking": [[1], [2], [0, 3]]}),
        ("/api/next?labeller=ann", None),
        ("/api/rank", {"group_id": "g2", "labeller": "ann", "skip": True}),
        ("/api/next?labeller=ann", None),
        ("/api/rank", {"group_id": "g3", "labeller": "ann", "ranking": [[0], [1], [2], [3]]}),
        ("/api/next?labeller=ann", None)]
    assert out["texts"] == ["<script>x()</script>", "two", "three", "four"]  # text nodes, as given
    assert out["turn"] == ["user", "<b>hi</b>"]
    assert out["badges"] == ["#3 (tie)", "#1", "#2", "#3 (tie)"]
    assert out["empty"] == 0 and out["progress"] == "waiting 1 · ranked 0 · step 2"


# ---- the reward ----

class Labeller(threading.Thread):
    """A scripted person: polls /api/next and ranks what it gets through /api/rank, preferring
    shorter completions (ties by the text), until stopped."""

    def __init__(self, base, name="script", prefer=lambda text: (len(text), text), token=TOKEN):
        super().__init__(daemon=True)
        self.base, self.name_, self.prefer, self.token = base, name, prefer, token
        self.stop = threading.Event()
        self.ranked: list[dict] = []

    def run(self):
        while not self.stop.is_set():
            try:
                group = call(self.base, f"/api/next?labeller={self.name_}", token=self.token)[2]["group"]
            except OSError:
                group = None
            if group is None:
                time.sleep(0.02)
                continue
            order = sorted(range(len(group["candidates"])), key=lambda p: self.prefer(group["candidates"][p]))
            status, _, body = call(self.base, "/api/rank", {"group_id": group["id"], "labeller": self.name_,
                                                            "ranking": order}, token=self.token)
            if status == 200:
                self.ranked.append(group)


def base_of(reward):
    return f"http://127.0.0.1:{reward.server.port}"


@contextlib.contextmanager
def labelling(reward):
    """A scripted labeller ranking on `reward`'s page while the block runs; then stopped, and the
    reward closed."""
    person = Labeller(base_of(reward))
    person.start()
    try:
        yield person
    finally:
        person.stop.set()
        person.join(5)
        reward.close()


def metrics_sink():
    seen: dict[str, list[float]] = {}
    return seen, lambda name, value: seen.setdefault(name, []).append(value)


GROUPS = [("p0", ["a much longer one", "mid", "s", "tiny one"]),  # lengths all distinct
          ("p1", ["xx", "xxxxxxxx", "xxxx", "x"])]


def run_groups(runner, groups=GROUPS, **extras):
    prompts = [p for p, cands in groups for _ in cands]
    completions = [c for _, cands in groups for c in cands]
    return runner(prompts, completions, extras=extras)


def test_the_reward_waits_for_a_labeller_ranking_through_the_page(tmp_path, capsys):
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=20, token=TOKEN)
    lines = reward.preflight()
    assert f"/?token={TOKEN}" in capsys.readouterr().out and "store" in lines[0]
    seen, log = metrics_sink()
    t0 = time.monotonic()
    with labelling(reward) as person:
        out = run_groups(RewardRunner([reward], group_size=4, timeout=60), log_metric=log)
    elapsed = time.monotonic() - t0
    assert elapsed < 10  # answered as the rankings came, not at the deadline
    # shorter is better: rank_rewards of the ranks, 1 best .. 0 worst
    assert out.per_func[:, 0].tolist() == pytest.approx([0.0, 2 / 3, 1.0, 1 / 3, 2 / 3, 0.0, 1 / 3, 1.0])
    assert seen["human/frac_ranked"] == [1.0, 1.0] and seen["human/frac_timeout"] == [0.0, 0.0]
    assert seen["human/frac_fallback"] == [0.0, 0.0] and "human/agreement_with_fallback" not in seen
    assert len(person.ranked) == 2
    with FeedbackStore(tmp_path) as store:
        assert store.pending() == [] and len(store.rankings()) == 2  # the step is over: nothing waits


def test_several_labellers_mean_rank_and_a_late_ranking_is_refused(tmp_path):
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=20, token=TOKEN, rankings_per_group=2)
    reward.start()
    people = [Labeller(base_of(reward), "short"), Labeller(base_of(reward), "long", prefer=lambda t: (-len(t), t))]
    for p in people:
        p.start()
    try:
        out = run_groups(RewardRunner([reward], group_size=4, timeout=60), GROUPS[:1])
    finally:
        for p in people:
            p.stop.set()
            p.join(5)
    # opposite rankings: every candidate's mean rank is 2.5 -> equal rewards
    assert out.per_func[:, 0].tolist() == pytest.approx([0.5] * 4)
    gid = group_id("p0", GROUPS[0][1])
    status, _, body = call(base_of(reward), "/api/rank", {"group_id": gid, "labeller": "late", "ranking": [0, 1, 2, 3]})
    assert status == 409 and "not waiting" in body["error"]
    reward.close()


def test_nobody_ranks_the_fallback_scores_at_the_deadline(tmp_path):
    @group_reward
    def longest(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    reward = HumanFeedbackReward(store=tmp_path, deadline_s=1.0, fallback=longest, token=TOKEN)
    seen, log = metrics_sink()
    t0 = time.monotonic()
    out = run_groups(RewardRunner([reward], group_size=4, timeout=30), log_metric=log)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 1.9  # the step's groups are waited on together: one deadline, not one each
    assert out.per_func[:, 0].tolist() == [float(len(c)) for _, cs in GROUPS for c in cs]
    assert seen["human/frac_timeout"] == [1.0, 1.0] and seen["human/frac_fallback"] == [1.0, 1.0]
    assert seen["human/frac_ranked"] == [0.0, 0.0]
    with FeedbackStore(tmp_path) as store:
        assert len(store.groups()) == 2 and store.pending() == []  # asked, then closed at the deadline

    zero = HumanFeedbackReward(store=tmp_path / "z", deadline_s=0.3, token=TOKEN)  # fallback "zero": None, advantage 0
    out = run_groups(RewardRunner([zero], group_size=4, timeout=30))
    assert out.per_func.isnan().all() and out.stats["rewards/human/frac_none"] == 1.0
    reward.close()
    zero.close()


def test_human_fraction_sends_a_share_chosen_by_hash(tmp_path):
    groups = [(f"prompt {k}", [f"a{k}", f"bb{k}"]) for k in range(24)]
    chosen = {group_id(p, cs) for p, cs in groups if int(group_id(p, cs)[:8], 16) / 16 ** 8 < 0.5}
    assert 4 < len(chosen) < 20

    reward = HumanFeedbackReward(store=tmp_path, deadline_s=0.3, human_fraction=0.5, fallback=lambda completions, **k:
                                 [0.25] * len(completions), token=TOKEN)
    seen, log = metrics_sink()
    out = run_groups(RewardRunner([reward], group_size=2, timeout=30), groups, log_metric=log)
    assert out.per_func[:, 0].tolist() == [0.25] * 48  # nobody ranked: the fallback everywhere
    with FeedbackStore(tmp_path) as store:
        assert {g.id for g in store.groups()} == chosen  # only the chosen groups were asked
    assert sum(seen["human/frac_human"]) == len(chosen) and sum(seen["human/frac_fallback"]) == 24

    never = HumanFeedbackReward(store=tmp_path / "n", deadline_s=30, human_fraction=0.0, fallback="format")
    t0 = time.monotonic()
    run_groups(RewardRunner([never], group_size=2, timeout=60), groups)
    assert time.monotonic() - t0 < 5 and never.store.groups() == []  # nobody asked, no waiting
    reward.close()
    never.close()


@pytest.mark.parametrize("judge_prefers, tau", [("shorter", 1.0), ("longer", -1.0)])
def test_agreement_with_the_fallback_is_logged(tmp_path, judge_prefers, tau):
    sign = -1.0 if judge_prefers == "shorter" else 1.0

    async def judge(prompts, completions, **kw):  # an async group reward, as the judges are
        return [sign * len(c) for c in completions]

    judge.scores_groups = True
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=20, fallback=judge, token=TOKEN)
    reward.start()
    seen, log = metrics_sink()
    with labelling(reward):
        out = run_groups(RewardRunner([reward], group_size=4, timeout=60), log_metric=log)
    assert seen["human/agreement_with_fallback"] == [tau, tau]
    assert out.per_func[2, 0] == 1.0  # the people's ranking is the reward, not the fallback's


def test_a_resumed_run_is_not_asked_again(tmp_path):
    with FeedbackStore(tmp_path) as store:  # what the first run stored before it was killed
        gid = store.add_group("p0", GROUPS[0][1], step=1)
        store.add_ranking(gid, "ann", [2, 3, 1, 0])
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=20, token=TOKEN)
    t0 = time.monotonic()
    out = run_groups(RewardRunner([reward], group_size=4, timeout=60), GROUPS[:1])
    assert time.monotonic() - t0 < 3
    assert out.per_func[:, 0].tolist() == pytest.approx([0.0, 1 / 3, 1.0, 2 / 3])
    assert reward.store.pending() == [] and len(reward.store.rankings()) == 1
    reward.close()


def test_the_registry_name_and_the_options(tmp_path):
    reward = resolve_reward("human", {"store": str(tmp_path), "fallback": "judge",
                                      "fallback_kwargs": {"backend": lambda messages: '{"ranking": [1, 2]}'}})
    assert reward.__name__ == "human" and type(reward).__name__ == "HumanFeedbackReward"
    assert type(reward.fallback).__name__ == "JudgeReward"
    reward.close()
    with pytest.raises(ValueError, match="give store"):
        HumanFeedbackReward()
    for bad in ({"deadline_s": 0}, {"deadline_s": float("inf")}, {"human_fraction": 1.5}, {"rankings_per_group": 0},
                {"fallback": 3}, {"fallback_kwargs": {"a": 1}}):
        with pytest.raises(ValueError):
            HumanFeedbackReward(store=tmp_path, **bad)


@pytest.mark.train
def test_two_training_steps_wait_for_the_rankings(tmp_path):
    """The tiny model trains 2 steps with `human` as its reward; a scripted labeller ranks each
    step's groups through the page while the step waits: the rankings arrive in the step."""
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer
    from tests.helpers import make_char_tokenizer, make_tiny_model

    reward = HumanFeedbackReward(store=tmp_path / "run", deadline_s=30, token=TOKEN)
    tok = make_char_tokenizer()
    data = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]})
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, num_generations=4, max_completion_length=6, use_cpu=True,
                     disable_tqdm=True, plot=False, save_strategy="no", logging_steps=1, reward_timeout=60)
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=[reward], args=cfg, processing_class=tok,
                          train_dataset=data)
    t0 = time.monotonic()
    with labelling(reward):  # the trainer's preflight started the page
        trainer.train()
    assert time.monotonic() - t0 < 30
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "human/frac_ranked" in r]
    assert len(steps) == 2
    for r in steps:  # every group of distinct completions was ranked in its step
        assert r["human/frac_ranked"] + r["human/frac_identical"] == pytest.approx(1.0)
        assert r["human/frac_timeout"] == 0.0
    with FeedbackStore(tmp_path / "run") as store:
        asked = {g.id: g.step for g in store.groups()}
        assert set(asked.values()) == {1, 2} and store.pending() == []
        assert {r.group_id for r in store.rankings()} == set(asked)  # each asked group ranked, by step


def test_without_starlette_the_error_names_the_extra(tmp_path, monkeypatch):
    from grpokit.tracking import MissingPackageError

    monkeypatch.setitem(sys.modules, "starlette.applications", None)
    with FeedbackStore(tmp_path) as store, pytest.raises(MissingPackageError, match=r"grpokit\[judges\]"):
        FeedbackServer(store)
