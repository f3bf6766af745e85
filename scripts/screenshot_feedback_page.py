"""Screenshot of the human-feedback ranking page (docs/images/human_feedback_page.png), taken in
Debian's headless chromium through Selenium, against a real FeedbackServer over a throw-away store
holding a realistic group (a conversational prompt, G=4 candidates of a few lines), two candidates
already picked with the keyboard.

    .venv/bin/python scripts/screenshot_feedback_page.py [OUT.png]

Needs `apt-get install chromium chromium-driver` and `pip install selenium` (the `dev` extra).
Nothing is downloaded: the driver is /usr/bin/chromedriver and the browser /usr/bin/chromium
(Selenium Manager is kept offline). tests/integration/test_feedback_browser.py uses the helpers
here (`browser_missing`, `make_driver`, `take_screenshot`) and takes the same screenshot into its
tmp folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DOCS_PNG = ROOT / "docs" / "images" / "human_feedback_page.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage")

DEMO_PROMPT = [
    {"role": "system", "content": "You are a friendly assistant for a cycling shop. Answer briefly and use the "
                                  "customer's name."},
    {"role": "user", "content": "Hi, I'm Maya. My chain keeps slipping when I climb hills. Do I need a new bike?"},
]
DEMO_CANDIDATES = [
    "Hi Maya! No need for a new bike. A chain that slips on climbs is usually worn, or the gear "
    "cable needs adjusting. Bring it in and we'll check it in ten minutes.",
    "Chains slip for many reasons: wear, stretched cables, bent hangers, dirty drivetrains. Consider "
    "all of these before buying anything.",
    "Probably not, Maya! Check three things first:\n1. Is the chain worn (a chain checker tells you)?\n"
    "2. Does it slip in one gear only? Then adjust the cable.\n3. Is the cassette old? Replace it with the chain.",
    "Yes, a new bike would fix it. We have several models on sale this week, starting at 499 euros. "
    "Would you like to book a test ride?",
]


def browser_missing() -> str | None:
    """Why the browser cannot run here (None: it can): chromium, its driver or selenium missing."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver; "
                "nothing is downloaded at test time)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def make_driver(width: int = 1280, height: int = 900) -> Any:
    """Headless chromium under /usr/bin/chromedriver; Selenium Manager never looks for (or fetches) a driver."""
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS + (f"--window-size={width},{height}", "--lang=en-US", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "the page") -> Any:
    """Poll `check` until it returns something truthy -> that value; TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:g} s for {what}")
        time.sleep(0.03)


def shown_candidates(driver: Any) -> list[str]:
    """The candidates' texts in the order the page shows them (each card: badge, key, then the text node)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#cands .cand')].map((b) => b.lastChild.textContent);")


def start_labelling(driver: Any, url: str, name: str) -> None:
    """Open the page and give a name with the keyboard only (Tab to the name field, type, Enter)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    driver.get(url)
    wait_until(lambda: driver.execute_script("return document.readyState") == "complete", what="the page to load")
    ActionChains(driver).send_keys(Keys.TAB).perform()
    wait_until(lambda: driver.execute_script("return document.activeElement && document.activeElement.id") == "name",
               what="Tab to reach the name field first")
    ActionChains(driver).send_keys(name, Keys.ENTER).perform()


def take_screenshot(driver: Any, out: str | Path, store_dir: str | Path) -> Path:
    """The page with DEMO_PROMPT / DEMO_CANDIDATES waiting (and three more groups behind it), the two
    best picked with the keys -> the PNG written to `out`."""
    from selenium.webdriver.common.action_chains import ActionChains

    from grpokit.feedback.server import FeedbackServer
    from grpokit.feedback.store import FeedbackStore

    out = Path(out)
    store = FeedbackStore(store_dir)
    server = FeedbackServer(store)
    try:
        store.add_group(DEMO_PROMPT, DEMO_CANDIDATES, step=37)
        for k in range(3):
            store.add_group([{"role": "user", "content": f"question {k}"}], [f"answer {k}.{i}" for i in range(4)],
                            step=37)
        start_labelling(driver, server.start(), "maya-labeller")
        shown = wait_until(lambda: len(shown_candidates(driver)) == 4 and shown_candidates(driver),
                           what="the group's candidates")
        best = [shown.index(DEMO_CANDIDATES[0]), shown.index(DEMO_CANDIDATES[2])]
        ActionChains(driver).send_keys(*(str(p + 1) for p in best)).perform()
        wait_until(lambda: len(driver.find_elements("css selector", "#cands .badge")) == 2, what="two picks")
        wait_until(lambda: "waiting 4" in driver.find_element("id", "progress").text, what="the progress line")
        height, chrome = driver.execute_script("return [Math.ceil(document.body.getBoundingClientRect().bottom), "
                                               "window.outerHeight - window.innerHeight]")
        driver.set_window_size(1280, int(height) + int(chrome) + 16)  # the whole page, little below it
        out.parent.mkdir(parents=True, exist_ok=True)
        if not driver.save_screenshot(str(out)):
            raise OSError(f"chromium could not write {out}")
        return out
    finally:
        server.stop()
        store.close()


def main(argv: list[str]) -> int:
    why = browser_missing()
    if why:
        print(f"cannot take the screenshot: {why}", file=sys.stderr)
        return 1
    out = Path(argv[0]) if argv else DOCS_PNG
    driver = make_driver()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            take_screenshot(driver, out, tmp)
    finally:
        driver.quit()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main(sys.argv[1:]))
