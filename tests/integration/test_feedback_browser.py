"""The ranking page in a real browser (issue 26): Debian's chromium, headless, driven by Selenium
against a real FeedbackServer (and, last, a HumanFeedbackReward whose step waits): ranking with
the keyboard only and with the mouse (undo included), skip and tie, a candidate holding HTML and
script shown as text, no token -> nothing usable, and a ranking given in the browser reaching the
waiting step as its rewards. Each labeller sees the candidates in an order of their own: the test
reads the shown order from the page's DOM and checks that the store holds the ranking in the
original candidate indices. Also takes the docs' screenshot (into tmp; the docs' copy is written by
scripts/screenshot_feedback_page.py, whose helpers these tests use).

Skipped where /usr/bin/chromium, /usr/bin/chromedriver or selenium is missing
(`apt-get install chromium chromium-driver`, as .ci/run does); nothing is downloaded."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("screenshot_feedback_page",
                                               ROOT / "scripts" / "screenshot_feedback_page.py")
shot = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shot)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shot.browser_missing() is not None, reason=f"no browser: {shot.browser_missing()}")]

TOKEN = "browser-test-token"
TEXTS = ["alpha: the first candidate", "bravo: the second one", "charlie: number three", "delta: the last"]


@pytest.fixture(scope="module")
def driver():
    d = shot.make_driver()
    d.set_page_load_timeout(15)
    yield d
    d.quit()


@pytest.fixture
def served(tmp_path, driver):
    from grpokit.feedback.server import FeedbackServer
    from grpokit.feedback.store import FeedbackStore

    store = FeedbackStore(tmp_path)
    server = FeedbackServer(store, token=TOKEN)
    server.start()
    yield store, server
    driver.get("about:blank")  # stop the page's polling before its server goes
    server.stop()
    store.close()


def keys(driver, *pressed):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*pressed).perform()


def shuffled_name(server, gid, m, prefix="ann"):
    """A labeller name whose shown order is not the original one (so a mapping bug would show)."""
    return next(name for name in (f"{prefix}{k}" for k in range(100))
                if server.shown_order(name, gid, m) != list(range(m)))


def open_group(driver, server, name, texts):
    """Open the page as `name` (keyboard only) and wait for the group with `texts` -> its shown order."""
    shot.start_labelling(driver, server.url, name)
    return wait_for_group(driver, texts)


def wait_for_group(driver, texts):
    return shot.wait_until(lambda: sorted(s := shot.shown_candidates(driver)) == sorted(texts) and s,
                           what=f"the group {texts[0]!r}...")


def badges(driver):
    """Each card's badge in shown order ('' where not placed yet)."""
    return driver.execute_script("return [...document.querySelectorAll('#cands .cand')].map("
                                 "(b) => (b.querySelector('.badge') || {textContent: ''}).textContent);")


def wait_for_rankings(store, gid, n=1, include_skipped=False):
    return shot.wait_until(lambda: len(r := store.rankings_for(gid, include_skipped=include_skipped)) >= n and r,
                           what="the ranking in the store")


def test_rank_with_the_keyboard_only(served, driver):
    store, server = served
    gid = store.add_group([{"role": "user", "content": "pick the best"}], TEXTS, step=3)
    name = shuffled_name(server, gid, 4)
    shown = open_group(driver, server, name, TEXTS)  # Tab to the name field, type the name, Enter: no mouse
    assert shown == [TEXTS[i] for i in server.shown_order(name, gid, 4)] != TEXTS
    assert driver.switch_to.active_element.tag_name == "body"  # the name field let go of the keys
    driver.refresh()  # the name is remembered: the page starts at once, the keys go to the ranking
    assert wait_for_group(driver, TEXTS) == shown
    assert driver.switch_to.active_element.tag_name == "body"
    assert driver.find_element("id", "name").get_attribute("value") == name
    want = [2, 0, 3, 1]  # original indices, best first
    pressed = [str(shown.index(TEXTS[i]) + 1) for i in want]
    keys(driver, pressed[0], pressed[2], "\ue003", pressed[1], "9", pressed[1])  # \ue003: Backspace
    assert sorted(badges(driver)) == ["", "", "#1", "#2"]
    keys(driver, pressed[2], pressed[3])
    assert [badges(driver)[shown.index(TEXTS[i])] for i in want] == ["#1", "#2", "#3", "#4"]
    keys(driver, "\ue007", "\ue007")  # Enter; a second one at once sends nothing more
    (ranking,) = wait_for_rankings(store, gid)
    assert ranking.labeller == name and ranking.ranking == [[2], [0], [3], [1]]
    shot.wait_until(lambda: "Nothing to rank" in driver.find_element("id", "prompt").text, what="the empty page")
    shot.wait_until(lambda: "ranked 1" in driver.find_element("id", "progress").text, what="the progress")
    assert driver.find_element("id", "msg").text == ""  # no "already answered" from a second send
    assert len(store.rankings()) == 1


def test_rank_with_the_mouse_and_undo(served, driver):
    store, server = served
    gid = store.add_group("a text prompt", TEXTS, step=5)
    name = shuffled_name(server, gid, 4, "bob")
    driver.get(server.url)
    driver.find_element("id", "name").send_keys(name)
    driver.find_element("id", "start").click()
    shown = wait_for_group(driver, TEXTS)

    def click(i):  # the cards are drawn again after each pick: find them each time
        driver.find_elements("css selector", "#cands .cand")[shown.index(TEXTS[i])].click()

    click(3)
    click(1)
    assert sorted(badges(driver)) == ["", "", "#1", "#2"]
    driver.find_element("id", "undo").click()
    assert sorted(badges(driver)) == ["", "", "", "#1"]
    click(3)  # placed already: nothing happens
    click(0)
    click(2)
    driver.find_element("id", "submit").click()  # one left: it goes last
    (ranking,) = wait_for_rankings(store, gid)
    assert ranking.labeller == name and ranking.ranking == [[3], [0], [2], [1]]
    shot.wait_until(lambda: "Nothing to rank" in driver.find_element("id", "prompt").text, what="the empty page")


def hold(driver, key, repeats):
    """A key held down: one keydown, then `repeats` auto-repeated ones (as the keyboard sends them), then keyup."""
    event = {"key": key, "text": key, "code": f"Key{key.upper()}", "windowsVirtualKeyCode": ord(key.upper())}
    driver.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": "keyDown", **event})
    for _ in range(repeats):
        time.sleep(0.05)
        driver.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": "keyDown", "autoRepeat": True, **event})
    up = {k: v for k, v in event.items() if k != "text"}
    driver.execute_cdp_cmd("Input.dispatchKeyEvent", {"type": "keyUp", **up})


def test_skip_and_tie_with_keys_and_buttons(served, driver):
    store, server = served
    groups = [[f"{t} (group {k})" for t in TEXTS] for k in range(4)]
    gids = [store.add_group(f"prompt {k}", texts, step=7) for k, texts in enumerate(groups)]
    shot.start_labelling(driver, server.url, "cy")
    wait_for_group(driver, groups[0])
    hold(driver, "s", repeats=6)                          # S: skip; held down, it skips one group, not seven
    shown = wait_for_group(driver, groups[1])
    time.sleep(0.2)
    assert shot.shown_candidates(driver) == shown and driver.find_element("id", "msg").text == ""
    keys(driver, str(shown.index(groups[1][1]) + 1), "t")  # 1 best, T: the rest tied
    assert sorted(badges(driver)) == ["#1"] + ["#2 (tie)"] * 3
    keys(driver, "\ue007")
    shown = wait_for_group(driver, groups[2])
    driver.find_elements("css selector", "#cands .cand")[shown.index(groups[2][2])].click()
    driver.find_elements("css selector", "#cands .cand")[shown.index(groups[2][0])].click()
    driver.find_element("id", "tie").click()              # the Rest tied button
    driver.find_element("id", "submit").click()
    wait_for_group(driver, groups[3])
    driver.find_element("id", "skip").click()             # the Skip button
    shot.wait_until(lambda: "Nothing to rank" in driver.find_element("id", "prompt").text, what="the empty page")
    got = [wait_for_rankings(store, gid, include_skipped=True)[0] for gid in gids]
    assert [(r.labeller, r.skipped) for r in got] == [("cy", True), ("cy", False), ("cy", False), ("cy", True)]
    tied = lambda ranking: [sorted(t) for t in ranking]  # noqa: E731 - a tie's members come in shown order
    assert tied(got[1].ranking) == [[1], [0, 2, 3]] and tied(got[2].ranking) == [[2], [0], [1, 3]]
    assert store.progress("cy") == {"waiting": 4, "ranked": 2, "rankings": 2, "step": 7, "yours": 4}


def test_html_and_script_in_a_candidate_are_shown_as_text(served, driver):
    store, server = served
    evil = ["<script>window.__pwned=1</script>", "<b>bold</b>", '<img src=x onerror="window.__pwned=3">', "plain"]
    prompt = [{"role": "system", "content": "<i>be brief</i><script>window.__pwned=2</script>"},
              {"role": "user", "content": "<b>which</b> is best?"}]
    store.add_group(prompt, evil, step=1)
    open_group(driver, server, "dee", evil)
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    for tag in ("script", "b", "i", "img"):  # no element came from the data (the page's own script is in <body>)
        assert driver.find_elements("css selector", f"#cands {tag}, #prompt {tag}") == [], tag
    cards = driver.find_element("id", "cands").text
    assert "<script>window.__pwned=1</script>" in cards and "<b>bold</b>" in cards  # visible, literally
    assert '<img src=x onerror="window.__pwned=3">' in cards
    turns = driver.find_element("id", "prompt").text
    assert "<i>be brief</i><script>window.__pwned=2</script>" in turns and "<b>which</b> is best?" in turns
    time.sleep(0.2)  # an onerror would have fired by now
    assert driver.execute_script("return typeof window.__pwned") == "undefined"


def test_an_image_in_the_prompt_is_shown(served, driver):
    """A prompt's image (a PNG data URI, as the human reward stores it) is drawn under the page's
    policy (img-src data:), at its size, in its turn."""
    from PIL import Image

    from grpokit.feedback.reward import with_images

    store, server = served
    texts = ["a red square", "a blue circle"]
    prompt = with_images([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                         [Image.new("RGB", (120, 80), "red")])
    store.add_group(prompt, texts, step=1)
    open_group(driver, server, "eve", texts)
    size = shot.wait_until(lambda: driver.execute_script(
        "const i = document.querySelector('#prompt .turn img.shot');"
        "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null;"), what="the image")
    assert size == [120, 80] and "What is it?" in driver.find_element("id", "prompt").text


def test_without_the_token_the_page_shows_nothing_usable(served, driver):
    store, server = served
    store.add_group("p", TEXTS, step=1)
    base = f"http://127.0.0.1:{server.port}"
    status = "return performance.getEntriesByType('navigation')[0].responseStatus"
    for url in (f"{base}/", f"{base}/?token=wrong", f"{base}/?token={TOKEN[:-1]}", f"{base}/api/next?labeller=x"):
        driver.get(url)
        assert driver.execute_script(status) == 403, url
        assert "forbidden" in driver.find_element("tag name", "body").text
        assert driver.find_elements("css selector", "#name, #cands, #start, button, script") == []
    driver.get(server.url)  # the printed URL works
    assert driver.execute_script(status) == 200 and driver.find_elements("id", "name")


def test_a_ranking_in_the_browser_reaches_the_waiting_step(tmp_path, driver):
    from grpokit.feedback.reward import HumanFeedbackReward
    from grpokit.feedback.store import group_id
    from grpokit.rewards import RewardRunner

    groups = [("Which answer is kindest?", ["no.", "Sure, happy to help!", "ok", "Let me see."]),
              ("Say hello to Maya.", ["Hello Maya!", "hi", "Hello.", "Greetings, Maya, how are you?"])]
    want = {0: [1, 3, 2, 0], 1: [0, 3, 2, 1]}  # per group: original indices best first
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=30, token=TOKEN)
    reward.start()
    shot.start_labelling(driver, reward.server.url, "eve")  # the page is open before the step asks
    shot.wait_until(lambda: "Nothing to rank" in driver.find_element("id", "prompt").text, what="the empty page")
    result: dict = {}

    def step():
        try:
            result["out"] = RewardRunner([reward], group_size=4, timeout=60)(
                [p for p, cands in groups for _ in cands], [c for _, cands in groups for c in cands])
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    waiting = threading.Thread(target=step, daemon=True)
    t0 = time.monotonic()
    waiting.start()
    try:
        for _ in groups:  # in the order the page gives them (it polls every 2 s while empty)
            shown = shot.wait_until(lambda: len(s := shot.shown_candidates(driver)) == 4 and s, what="a group")
            k = next(k for k, (_, cands) in enumerate(groups) if sorted(cands) == sorted(shown))
            keys(driver, *(str(shown.index(groups[k][1][i]) + 1) for i in want[k]), "\ue007")
            shot.wait_until(lambda was=shown: shot.shown_candidates(driver) != was, what="the next group")
        waiting.join(20)
    finally:
        driver.get("about:blank")
        reward.close()
    assert not waiting.is_alive() and "error" not in result, result.get("error")
    assert time.monotonic() - t0 < 15  # answered when ranked, not at the 30 s deadline
    expected = [0.0] * 8
    for k, order in want.items():
        for place, i in enumerate(order):  # 1 for the best .. 0 for the worst
            expected[4 * k + i] = (3 - place) / 3
    assert result["out"].per_func[:, 0].tolist() == pytest.approx(expected)
    from grpokit.feedback.store import FeedbackStore

    with FeedbackStore(tmp_path) as store:
        for k, (prompt, cands) in enumerate(groups):
            (r,) = store.rankings_for(group_id(prompt, cands))
            assert r.labeller == "eve" and r.ranking == [[i] for i in want[k]]
        assert store.pending() == []  # the step is over


def test_screenshot_of_a_realistic_group(tmp_path, driver):
    out = shot.take_screenshot(driver, tmp_path / "human_feedback_page.png", tmp_path / "store")
    # candidates of different lengths side by side, each read from its top (a button centres its content)
    cards = "return [...document.querySelectorAll('#cands .cand')]"
    tops = driver.execute_script(cards + ".map((b) => b.querySelector('.key').getBoundingClientRect().top"
                                         " - b.getBoundingClientRect().top);")
    heights = driver.execute_script(cards + ".map((b) => b.offsetHeight);")
    assert len(set(heights)) == 1 and max(tops) - min(tops) < 1, (tops, heights)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    width = int.from_bytes(data[16:20], "big")
    assert width == 1280
