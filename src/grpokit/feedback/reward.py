"""`HumanFeedbackReward` (registry name `human`): people rank each group on the feedback page while
the step waits, up to a deadline; a fallback scores what they did not rank.

A group reward (`scores_groups = True`, `async __call__`): the runner calls it once per prompt
with that prompt's G completions, all the step's groups concurrently on one event loop. Each call:

1. takes the group's distinct completion texts (identical completions are shown once and share
   the result; a group of one distinct text gets equal rewards at once);
2. decides by the group's hash whether people rank it (`human_fraction`: the same group is always
   decided the same way) and, if so, stores it as waiting (`FeedbackStore.add_group`);
3. waits until it has `rankings_per_group` rankings or the step's deadline passes (`deadline_s`
   from the step's first group: the step's groups are waited on together, never longer);
4. rewards from the rankings: `rank_rewards` of each candidate's mean rank over the labellers
   (ties share their places): 1 for the best, 0 for the worst;
5. a group not chosen for people, or not ranked in time, gets the fallback's scores (a reward or a
   judge, or `"zero"`: None for every completion, i.e. advantage 0). With `compare_fallback`
   (default) the fallback also scores the groups people rank, concurrently with the wait, and the
   Kendall tau between the people's ranks and the fallback's is logged.

When the step's last group is done its groups stop waiting (a ranking sent later is refused with
409). Groups a crashed run left waiting are closed at start; a group stored again with its
rankings (a resumed run regenerating the same completions) is answered from them at once.

Logged per step (means over the step's groups, through `log_metric`): `human/frac_human` (sent to
people), `human/frac_ranked` (ranked by them in time), `human/frac_fallback` (scored by the
fallback), `human/frac_timeout` (sent to people, not ranked by the deadline), `human/frac_identical`,
`human/rankings` and `human/wait_s` (per group sent to people), `human/agreement_with_fallback`
(per group ranked by people and scored by the fallback).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import threading
import time
import webbrowser
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpokit.feedback.server import FeedbackServer
from grpokit.feedback.store import FeedbackStore, Ranking, group_id, ranks_of
from grpokit.rewards.calls import is_async_callable
from grpokit.rewards.judges.ranking import kendall_tau, rank_rewards, ranks_from_scores
from grpokit.rewards.registry import resolve_reward
from grpokit.rewards.text import completion_text

__all__ = ["HumanFeedbackReward", "with_images"]

IMAGE_SIDE = 384  # an image is shown (and stored) at most this many pixels on its longer side


def _data_uri(image: Any) -> str | None:
    """A PIL image (or a data:image/ URI) as a PNG data URI, scaled down to IMAGE_SIDE; None for
    anything else (a path or URL is not fetched by the page)."""
    if isinstance(image, str):
        return image if image.startswith("data:image/") else None
    if not hasattr(image, "save"):
        return None
    import base64
    import io

    shown = image.copy()
    shown.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
    if shown.mode not in ("RGB", "RGBA", "L"):
        shown = shown.convert("RGB")
    buffer = io.BytesIO()
    shown.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def with_images(prompt: Any, images: Any) -> Any:
    """The prompt as the page shows it: each image part of a conversation ({"type": "image"}, TRL's
    placeholder, filled from the row's `images` in order, or one holding its image) becomes
    {"type": "image", "url": "data:image/png;base64,..."}; a text prompt with images gets them
    before its text. Without images the prompt is returned as it is."""
    row_images = list(images) if isinstance(images, (list, tuple)) else [] if images is None else [images]
    conversation = isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt)
    has_parts = conversation and any(isinstance(m.get("content"), list) and any(
        isinstance(p, dict) and p.get("type") == "image" for p in m["content"]) for m in prompt)
    if not row_images and not has_parts:
        return prompt
    pending = iter(row_images)
    if not conversation:
        parts = [{"type": "image", "url": uri} for uri in map(_data_uri, row_images) if uri]
        return [{"role": "user", "content": parts + [{"type": "text", "text": "" if prompt is None else str(prompt)}]}]
    shown = []
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    source = part.get("image", part.get("url"))
                    uri = _data_uri(source if source is not None else next(pending, None))
                    parts.append({"type": "image", "url": uri} if uri else {"type": "text", "text": "[image]"})
                else:
                    parts.append(part)
            message = {**message, "content": parts}
        shown.append(message)
    return shown

logger = logging.getLogger("grpokit.feedback")


@dataclass
class _Batch:
    """The groups of one runner call (one step), which share a deadline."""

    loop: asyncio.AbstractEventLoop
    step: int
    deadline: float
    ids: set[str] = field(default_factory=set)
    active: int = 0
    asked: int = 0
    ranked: int = 0


class HumanFeedbackReward:
    """People rank each group on a web page while the step waits (see the module docstring).

    store: the run folder (its `feedback.sqlite`), a .sqlite file, or a FeedbackStore; required,
        so that the rankings live with the run (`grpokit feedback export RUN_DIR`).
    deadline_s: seconds a step waits for its groups' rankings, from its first group; keep it (plus
        the fallback's own time) under the trainer's `reward_timeout`.
    human_fraction: 0..1, the share of groups sent to people, chosen by the group's hash; the
        fallback scores the rest.
    fallback: "zero" (None: advantage 0), a reward callable (a judge from `grpokit.rewards.judges`,
        any group or per-completion reward, sync or async), or a registry name / "module:function"
        path resolved with `fallback_kwargs`.
    rankings_per_group: rankings a group waits for (more labellers may still rank it while its
        step waits; every ranking is kept and the mean rank over them is used).
    compare_fallback: also score the groups people rank with the fallback, for
        `human/agreement_with_fallback` (and so that a group not ranked in time has its fallback
        score ready).
    host, port, token: where the page is served (127.0.0.1; port 0: a free one) and its token
        (default: random). open_browser: open the URL in a browser where there is one.
    """

    __name__ = "human"
    scores_groups = True        # a group reward: the runner passes one prompt's G completions
    use_process_pool = False    # one server and one store, in this process

    def __init__(self, store: str | Path | FeedbackStore | None = None, deadline_s: float = 30.0,
                 human_fraction: float = 1.0, fallback: str | Callable | None = "zero",
                 fallback_kwargs: dict | None = None, rankings_per_group: int = 1, compare_fallback: bool = True,
                 host: str = "127.0.0.1", port: int = 0, token: str | None = None, open_browser: bool = False,
                 poll_s: float = 0.05):
        if store is None:
            raise ValueError("human: give store: the run folder (output_dir; the rankings go to its feedback.sqlite) "
                             "or a .sqlite path, e.g. reward_kwargs: {human: {store: runs/my_run}}")
        if not (isinstance(deadline_s, (int, float)) and math.isfinite(deadline_s) and deadline_s > 0):
            raise ValueError(f"human: deadline_s must be a finite number of seconds > 0, got {deadline_s!r} "
                             "(a step never waits forever)")
        if not 0.0 <= float(human_fraction) <= 1.0:
            raise ValueError(f"human: human_fraction is a share of the groups in [0, 1], got {human_fraction!r}")
        if int(rankings_per_group) < 1:
            raise ValueError(f"human: rankings_per_group must be >= 1, got {rankings_per_group!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("human: the feedback page runs in a single training process for now; train on one rank")
        self._owns_store = not isinstance(store, FeedbackStore)
        self.store = store if isinstance(store, FeedbackStore) else FeedbackStore(store)
        self.deadline_s, self.human_fraction = float(deadline_s), float(human_fraction)
        self.rankings_per_group, self.compare_fallback = int(rankings_per_group), bool(compare_fallback)
        self.host, self.port, self.token, self.open_browser = host, int(port), token, bool(open_browser)
        self.poll_s = float(poll_s)
        self.fallback_spec = fallback
        self.fallback = _resolve_fallback(fallback, fallback_kwargs)
        self.server: FeedbackServer | None = None
        self._lock = threading.Lock()
        self._batches: dict[int, _Batch] = {}
        self._calls = 0

    # ---- the page ----
    def start(self) -> str:
        """Start the page (once) and print its URL -> the URL with the token."""
        with self._lock:
            if self.server is None:
                closed = self.store.close_groups()  # what a previous process left waiting belongs to no step now
                if closed:
                    logger.info("human: %d group(s) left waiting by an earlier run closed", closed)
                server = FeedbackServer(self.store, self.host, self.port, self.token)
                url = server.start()
                self.server = server
                print(f"human feedback: rank the groups at {url}\n  (rankings kept in {self.store.path})",
                      flush=True)
                if self.open_browser:
                    try:
                        webbrowser.open(url)
                    except Exception:  # noqa: BLE001 - no browser here: the printed URL is enough
                        pass
            return self.server.url

    def preflight(self) -> list[str]:
        """Before step 1 (RewardRunner.preflight): start the page -> a summary line."""
        self.start()
        progress = self.store.progress()
        fb = self.fallback_spec if isinstance(self.fallback_spec, str) or self.fallback_spec is None \
            else getattr(self.fallback_spec, "__name__", type(self.fallback_spec).__name__)
        return [f"{self.__name__}: ranking page started (URL above), store {self.store.path} "
                f"({progress['ranked']} groups ranked before); deadline {self.deadline_s:g} s per step, "
                f"human_fraction {self.human_fraction:g}, fallback {fb}"]

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self._owns_store:
            self.store.close()

    # ---- the reward ----
    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None, trainer_state=None,
                       log_metric=None, **columns) -> list[float | None]:
        self.start()
        log = log_metric if callable(log_metric) else (lambda name, value: None)
        name = self.__name__
        texts = [completion_text(c) for c in completions]
        distinct = list(dict.fromkeys(texts))
        prompt = prompts[0] if len(prompts) else None
        images = columns.get("images", columns.get("image"))
        prompt = with_images(prompt, images[0] if images else None)  # shown on the page, kept in the store
        if len(distinct) < 2:
            for key in ("human", "ranked", "fallback", "timeout"):
                log(f"{name}/frac_{key}", 0.0)
            log(f"{name}/frac_identical", 1.0)
            return [0.5] * len(texts)
        log(f"{name}/frac_identical", 0.0)
        gid = group_id(prompt, distinct)
        human = int(gid[:8], 16) / 16 ** 8 < self.human_fraction
        call = {"prompts": list(prompts), "completions": list(completions), "completion_ids": completion_ids,
                "trainer_state": trainer_state, "log_metric": log_metric, **columns}
        task = None
        if self.fallback is not None and (not human or self.compare_fallback):
            task = asyncio.ensure_future(self._score_fallback(call))
        log(f"{name}/frac_human", float(human))
        if not human:
            log(f"{name}/frac_ranked", 0.0)
            log(f"{name}/frac_timeout", 0.0)
            log(f"{name}/frac_fallback", 1.0)
            return await task if task is not None else [None] * len(texts)

        batch = self._batch(trainer_state)
        batch.ids.add(gid)
        batch.active += 1
        batch.asked += 1
        t0 = time.monotonic()
        try:
            self.store.add_group(prompt, distinct, batch.step)
            rankings = await self._wait(gid, batch.deadline)
        finally:
            batch.active -= 1
            if batch.active == 0:
                self._finish(batch)
        log(f"{name}/wait_s", time.monotonic() - t0)
        log(f"{name}/rankings", float(len(rankings)))
        log(f"{name}/frac_ranked", float(bool(rankings)))
        log(f"{name}/frac_timeout", float(not rankings))
        log(f"{name}/frac_fallback", float(not rankings))
        if not rankings:
            if self.fallback is None:
                return [None] * len(texts)
            if task is None:
                task = asyncio.ensure_future(self._score_fallback(call))
            return await task
        batch.ranked += 1
        m = len(distinct)
        mean_ranks = [sum(ranks_of(r.ranking, m)[i] for r in rankings) / len(rankings) for i in range(m)]
        by_text = dict(zip(distinct, rank_rewards(mean_ranks)))
        if task is not None:
            try:
                scored = await task
            except Exception as e:  # noqa: BLE001 - only the agreement is lost; people ranked this group
                logger.warning("human: the fallback failed on a group people ranked (%s: %s); no agreement for it",
                               type(e).__name__, e)
            else:
                first = {t: v for t, v in reversed(list(zip(texts, scored)))}
                values = [first.get(t) for t in distinct]
                if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    log(f"{name}/agreement_with_fallback",
                        kendall_tau(mean_ranks, ranks_from_scores([float(v) for v in values])))  # type: ignore[arg-type]
        return [by_text[t] for t in texts]

    def _batch(self, trainer_state: Any) -> _Batch:
        """The current runner call's batch (one per event loop), made by its first group."""
        loop = asyncio.get_running_loop()
        with self._lock:
            batch = self._batches.get(id(loop))
            if batch is None or batch.loop is not loop:
                for key in [k for k, b in self._batches.items() if b.loop.is_closed()]:
                    del self._batches[key]
                self._calls += 1
                step = getattr(trainer_state, "global_step", None)
                step = int(step) + 1 if isinstance(step, int) else self._calls
                batch = self._batches[id(loop)] = _Batch(loop, step, time.monotonic() + self.deadline_s)
            return batch

    async def _wait(self, gid: str, deadline: float) -> list[Ranking]:
        """This group's rankings once it has rankings_per_group of them, or at the deadline."""
        seen = -1
        while True:
            if self.store.version != seen:
                seen = self.store.version
                got = self.store.rankings_for(gid)
                if len(got) >= self.rankings_per_group:
                    return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.store.rankings_for(gid)
            await asyncio.sleep(min(self.poll_s, remaining))

    def _finish(self, batch: _Batch) -> None:
        """The step's last waiting group is done: its groups stop waiting."""
        self.store.close_groups(batch.ids)
        batch.ids.clear()
        logger.info("human: step %d: %d of %d group(s) sent to people ranked in time", batch.step, batch.ranked,
                    batch.asked)

    async def _score_fallback(self, call: dict) -> list[float | None]:
        fn = self.fallback
        assert fn is not None
        kwargs = _accepted(fn, call)
        if is_async_callable(fn):
            out = await fn(**kwargs)
        else:  # in a thread, so that the step's other groups go on waiting; a partial of an async function
            out = await asyncio.to_thread(fn, **kwargs)  # returns its coroutine, awaited here
            if inspect.isawaitable(out):
                out = await out
        values = list(out)
        if len(values) != len(call["completions"]):
            raise ValueError(f"human: the fallback returned {len(values)} values for {len(call['completions'])} "
                             "completions")
        return values


def _resolve_fallback(spec: str | Callable | None, kwargs: dict | None) -> Callable | None:
    if spec is None or spec == "zero":
        if kwargs:
            raise ValueError("human: fallback_kwargs given without a fallback reward")
        return None
    if isinstance(spec, str) or callable(spec):
        return resolve_reward(spec, kwargs) if (isinstance(spec, str) or kwargs) else spec
    raise ValueError(f"human: fallback is 'zero', a reward callable, or a registry name / 'module:function', "
                     f"got {spec!r}")


def _accepted(fn: Callable, call: dict) -> dict:
    """The arguments of `call` that `fn` takes (all of them with **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return call
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return call
    names = {p.name for p in params}
    return {k: v for k, v in call.items() if k in names}
