"""Images in the prompts of the feedback page: the row's images (TRL's `images` column filling the
{"type": "image"} placeholders, or images held by the parts) reach the page as PNG data URIs,
scaled down, and nothing but data:image/ URIs is ever handed to it as an image source."""

import asyncio
import base64
import io
import json
import threading
import time
import urllib.request

from PIL import Image

from grpokit.feedback import HumanFeedbackReward
from grpokit.feedback.reward import IMAGE_SIDE, with_images
from grpokit.feedback.server import prompt_turns

TOKEN = "img-token"


def decode(uri):
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_placeholders_are_filled_from_the_row_in_order():
    red, blue = Image.new("RGB", (1000, 500), "red"), Image.new("RGB", (20, 30), "blue")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
              {"role": "assistant", "content": "ok"}]
    shown = with_images(prompt, [red, blue])
    first, text, second = shown[0]["content"]
    assert decode(first["url"]).getpixel((0, 0)) == (255, 0, 0) and decode(first["url"]).size == (IMAGE_SIDE, 192)
    assert decode(second["url"]).size == (20, 30) and text == {"type": "text", "text": "and"}
    assert shown[1] == prompt[1] and prompt[0]["content"][0] == {"type": "image"}  # the input is not changed
    inline = with_images([{"role": "user", "content": [{"type": "image", "image": blue}]}], None)
    assert decode(inline[0]["content"][0]["url"]).size == (20, 30)
    assert with_images("plain", None) == "plain" and with_images(prompt[1:], None) == prompt[1:]
    as_text = with_images("what colour?", [red])
    assert as_text[0]["content"][-1] == {"type": "text", "text": "what colour?"}
    # a path or URL is never handed to the page
    remote = with_images([{"role": "user", "content": [{"type": "image", "url": "http://x/y.png"}]}], None)
    assert remote[0]["content"] == [{"type": "text", "text": "[image]"}]
    turns = prompt_turns([{"role": "user", "content": [{"type": "image", "url": "javascript:alert(1)"},
                                                       {"type": "text", "text": "hi"}]}])
    assert turns == [{"role": "user", "content": "[image]hi", "images": []}]


def _get(base, path):
    request = urllib.request.Request(base + path, headers={"X-Feedback-Token": TOKEN})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def test_a_group_with_an_image_reaches_the_page_and_is_ranked(tmp_path):
    """Through the reward as the trainer calls it (the `images` column, one list per completion):
    the page's API gives the turn its image, and the ranking made there comes back as rewards."""
    reward = HumanFeedbackReward(store=tmp_path, deadline_s=20, token=TOKEN)
    reward.preflight()
    base = f"http://127.0.0.1:{reward.server.port}"
    seen = {}

    def labeller():
        while "group" not in seen:
            group = _get(base, "/api/next?labeller=eye")["group"]
            if group is None:
                time.sleep(0.02)
                continue
            seen["group"] = group
            cands = group["candidates"]
            order = sorted(range(len(cands)), key=lambda p: cands[p] != "red")  # "red" is right
            body = json.dumps({"group_id": group["id"], "labeller": "eye", "ranking": order}).encode()
            request = urllib.request.Request(base + "/api/rank", data=body, method="POST", headers={
                "X-Feedback-Token": TOKEN, "Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).read()

    thread = threading.Thread(target=labeller, daemon=True)
    thread.start()
    image = Image.new("RGB", (64, 64), "red")
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]
    out = asyncio.run(reward([prompt] * 3, ["blue", "red", "green"], images=[[image]] * 3))
    thread.join(5)
    (turn,) = seen["group"]["prompt"]
    assert turn["content"] == "Which colour?" and decode(turn["images"][0]).getpixel((0, 0)) == (255, 0, 0)
    assert out[1] == 1.0 and out[0] < 1.0 and out[2] < 1.0
    reward.close()
