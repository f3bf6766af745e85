"""What every group judge shares: a backend, the group's distinct candidates, asking with a cache,
retries and a deadline, the failure policy, the per-step metrics and the reliability gate.

A judge is a group reward (`scores_groups = True`): the runner calls it once per prompt with that
prompt's G completions. Identical completions are judged once and share the result. A group the
judge could not rank (its requests failed after the retries, or within the deadline) or ranked
inconsistently (agreement across shown orders below `min_agreement`) gets None for every
completion: its advantage is 0, it is counted (`<name>/frac_failed`, `<name>/frac_low_agreement`)
and, with `on_failure="raise"`, a failure stops the run instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.rewards.judges.backends import make_backend
from grpokit.rewards.judges.parse import BadAnswer
from grpokit.rewards.judges.ranking import kendall_tau, ranks_from_order
from grpokit.rewards.text import content_text, completion_text, is_conversational

__all__ = ["GroupJudge", "Judgement", "JudgeFailed"]

logger = logging.getLogger("grpokit.rewards.judges")
Messages = list[dict[str, Any]]


class JudgeFailed(RuntimeError):
    """A group could not be judged (with on_failure='raise')."""


@dataclass
class Judgement:
    """One group's verdict, over its distinct candidates."""

    rewards: list[float] | None          # None: not usable (failed, or agreement below the threshold)
    ranks: list[float] | None            # mean rank of each candidate (1 = best), when the judge answered
    status: str = "ok"                   # ok | identical | failed | low_agreement
    agreement: float = float("nan")      # listwise: mean Kendall tau across shown orders; pairwise: order consistency
    calls: int = 0                       # requests sent (retries included)
    retries: int = 0
    cache_hits: int = 0
    reason: str = ""


class GroupJudge:
    """Base of the judge rewards; see the module docstring. Options shared by every judge:

    model, base_url, backend: the judge (see `judges.backends.make_backend`); other keyword
        arguments go to the backend (api_key, max_concurrency, requests_per_second, timeout,
        temperature, max_tokens, json_mode, device, dtype, max_new_tokens, ...).
    system, template, criteria: the judge's prompt (each judge documents its placeholders).
    seed: the shown orders are drawn from (seed, prompt, candidates): the same group is shown the
        same way on every rank and after a resume.
    max_retries: extra tries of a request whose answer failed or could not be read;
    deadline_s: seconds for a whole group (all its requests and retries); keep it under the
        trainer's reward_timeout.
    on_failure: "skip" (the group gets None: advantage 0, counted) or "raise" (stop the run).
    min_agreement: a group whose agreement is below it gets None (counted); None: never.
    lenient: also read plain-text answers (numbers in order, a bare A/B) when there is no JSON.
    cache_size: answers kept, keyed on (judge, request); 0 turns the cache off.
    calibration, min_calibration_tau: the reliability gate (see `preflight`).
    """

    __name__: str               # the name its rewards and metrics are logged under
    scores_groups = True        # a group reward: the runner passes one prompt's G completions
    use_process_pool = False    # one backend (a model, a client) in this process

    def __init__(self, model: Any = None, base_url: str | None = None, backend: Any = None,
                 system: str | None = None, template: str | None = None, criteria: str | None = None,
                 seed: int = 0, max_retries: int = 2, deadline_s: float = 20.0, on_failure: str = "skip",
                 min_agreement: float | None = 0.0, lenient: bool = True, cache_size: int = 100_000,
                 calibration: str | Sequence[dict] | None = None, min_calibration_tau: float = 0.3,
                 **backend_options):
        if on_failure not in ("skip", "raise"):
            raise ValueError(f"judge: on_failure={on_failure!r}; use 'skip' (advantage 0) or 'raise'")
        if max_retries < 0 or not deadline_s > 0:
            raise ValueError(f"judge: max_retries must be >= 0 and deadline_s > 0, got {max_retries}, {deadline_s}")
        if min_agreement is not None and not -1.0 <= min_agreement <= 1.0:
            raise ValueError(f"judge: min_agreement is a Kendall tau in [-1, 1] (or None), got {min_agreement}")
        self.backend = make_backend(backend, model=model, base_url=base_url, **backend_options)
        self.system = self.default_system if system is None else system
        self.template = self.default_template if template is None else template
        self.criteria = criteria or "helpfulness, correctness and clarity"
        self.seed, self.max_retries, self.deadline_s = int(seed), int(max_retries), float(deadline_s)
        self.on_failure, self.min_agreement, self.lenient = on_failure, min_agreement, lenient
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, str] = OrderedDict()
        self.calibration, self.min_calibration_tau = calibration, float(min_calibration_tau)
        self._check_template()

    # ---- what a judge defines ----
    default_system = ""
    default_template = ""
    placeholders: tuple[str, ...] = ()

    async def judge(self, prompt: Any, texts: list[str]) -> Judgement:
        """Judge distinct candidate texts of one prompt."""
        raise NotImplementedError

    # ---- helpers for judges ----
    def _check_template(self) -> None:
        import string

        used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        unknown = used - set(self.placeholders)
        if unknown:
            raise ValueError(f"judge: the template uses {sorted(unknown)}; it may use {list(self.placeholders)}")

    @staticmethod
    def prompt_text(prompt: Any) -> str:
        """A prompt as the judge reads it: the text, or a conversation as 'role: content' lines
        (a single user message: its content)."""
        if is_conversational(prompt):
            if len(prompt) == 1 and prompt[0].get("role") == "user":
                return content_text(prompt[0].get("content"))
            return "\n".join(f"{m.get('role')}: {content_text(m.get('content'))}" for m in prompt)
        return "" if prompt is None else str(prompt)

    def messages(self, **fields) -> Messages:
        user = self.template.format(criteria=self.criteria, **fields)
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            [{"role": "user", "content": user}]

    def rng_for(self, prompt: Any, texts: Sequence[str]) -> random.Random:
        digest = hashlib.sha256(json.dumps([self.seed, self.prompt_text(prompt), list(texts)]).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _key(self, request: Messages) -> str:
        return hashlib.sha256(json.dumps([self.backend.name, request], sort_keys=True).encode()).hexdigest()

    async def ask(self, requests: list[Messages], parsers: list[Callable[[str], Any]],
                  verdict: Judgement) -> tuple[list[Any], list[str]]:
        """Each request's parsed answer (None where it failed) and its last error; the cache, the
        retries and the group's deadline applied; counts added to `verdict`."""
        results: list[Any] = [None] * len(requests)
        errors = [""] * len(requests)
        keys = [self._key(r) for r in requests]
        pending = []
        for i, key in enumerate(keys):
            if key in self._cache:
                results[i] = parsers[i](self._cache[key])
                self._cache.move_to_end(key)
                verdict.cache_hits += 1
            else:
                pending.append(i)
        deadline = time.monotonic() + self.deadline_s
        for attempt in range(self.max_retries + 1):
            if not pending:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                answers = await asyncio.wait_for(self.backend.complete_many([requests[i] for i in pending]), remaining)
            except asyncio.TimeoutError:
                for i in pending:
                    errors[i] = f"no answer within the group's deadline of {self.deadline_s:g} s (deadline_s)"
                verdict.calls += len(pending)
                break
            verdict.calls += len(pending)
            verdict.retries += len(pending) if attempt else 0
            still = []
            for i, answer in zip(pending, answers):
                if isinstance(answer, BaseException):
                    errors[i] = f"{type(answer).__name__}: {answer}"
                    still.append(i)
                    continue
                try:
                    results[i] = parsers[i](answer)
                except BadAnswer as e:
                    errors[i] = f"unreadable answer: {e}"
                    still.append(i)
                    continue
                if self.cache_size:
                    self._cache[keys[i]] = answer
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            pending = still
        for i in pending:
            errors[i] = errors[i] or f"no answer within the group's deadline of {self.deadline_s:g} s (deadline_s)"
        return results, errors

    # ---- the reward ----
    async def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None, log_metric=None,
                       **columns) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        distinct = list(dict.fromkeys(texts))
        t0 = time.perf_counter()
        verdict = await self.judge(prompts[0] if len(prompts) else None, distinct)
        self._log(verdict, log_metric, time.perf_counter() - t0)
        if verdict.rewards is None:
            if verdict.status == "failed":
                if self.on_failure == "raise":
                    raise JudgeFailed(f"{self.__name__}: a group could not be judged: {verdict.reason}; set "
                                      f"on_failure='skip' to give such groups advantage 0 and go on")
                logger.warning("%s: a group could not be judged (%s); its %d completions get None (advantage 0)",
                               self.__name__, verdict.reason, len(texts))
            return [None] * len(texts)
        by_text = dict(zip(distinct, verdict.rewards))
        return [by_text[t] for t in texts]

    def _log(self, verdict: Judgement, log_metric: Callable | None, seconds: float) -> None:
        if log_metric is None:
            return
        name = self.__name__
        log_metric(f"{name}/calls", verdict.calls)
        log_metric(f"{name}/retries", verdict.retries)
        log_metric(f"{name}/cache_hits", verdict.cache_hits)
        log_metric(f"{name}/seconds", seconds)
        log_metric(f"{name}/frac_failed", float(verdict.status == "failed"))
        log_metric(f"{name}/frac_low_agreement", float(verdict.status == "low_agreement"))
        log_metric(f"{name}/frac_identical", float(verdict.status == "identical"))
        if not math.isnan(verdict.agreement):
            log_metric(f"{name}/agreement", verdict.agreement)

    def rank_group(self, prompt: Any, texts: Sequence[str]) -> Judgement:
        """Judge one group from synchronous code (the gate, benchmarks, a notebook)."""
        return asyncio.run(self.judge(prompt, list(texts)))

    # ---- the reliability gate ----
    def preflight(self) -> list[str]:
        """Before step 1, with `calibration` (a JSONL path or a list of {"prompt", "candidates",
        optional "ranking": candidate indices best first}): rank each calibration group and
        compare with the known order (Kendall tau), or, without one, with the judge's own other
        shown orders (the agreement). Refuses to start when the mean is below
        `min_calibration_tau` or nothing could be judged; returns the summary line otherwise."""
        if self.calibration is None:
            return []
        items = _load_calibration(self.calibration)
        taus, failed, known = [], 0, 0
        for k, item in enumerate(items):
            texts = [completion_text(c) for c in item["candidates"]]
            if len(set(texts)) != len(texts) or len(texts) < 2:
                raise ValueError(f"{self.__name__} calibration item {k}: give at least 2 distinct candidates")
            verdict = self.rank_group(item.get("prompt"), texts)
            if verdict.ranks is None:
                failed += 1
                continue
            if item.get("ranking") is not None:
                known += 1
                taus.append(kendall_tau(verdict.ranks, ranks_from_order(list(item["ranking"]), len(texts))))
            elif not math.isnan(verdict.agreement):
                taus.append(verdict.agreement)
        against = ("the known orders" if known == len(taus) else "its own other shown orders" if not known
                   else "the known orders (or its own other shown orders)")
        mean = sum(taus) / len(taus) if taus else float("nan")
        line = (f"{self.__name__} calibration: {len(items)} groups, Kendall tau with {against}: mean {mean:.2f}"
                + (f", min {min(taus):.2f}" if taus else "") + f"; {failed} not judged")
        if not taus or mean < self.min_calibration_tau:
            raise ValueError(f"{line}: below min_calibration_tau={self.min_calibration_tau:g}; the judge is not "
                             f"reliable enough for this task (try a stronger judge model, another template or "
                             f"criteria, or lower min_calibration_tau)")
        return [line]


def _load_calibration(source: str | Sequence[dict]) -> list[dict]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"judge calibration: {str(path)!r} is not a file (a JSONL of {{prompt, candidates, "
                             f"ranking}} rows)")
        items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        items = list(source)
    for k, item in enumerate(items):
        if not isinstance(item, dict) or "candidates" not in item:
            raise ValueError(f"judge calibration item {k}: expected {{'prompt', 'candidates', 'ranking'?}}, "
                             f"got {item!r}")
    if not items:
        raise ValueError("judge calibration: the set is empty")
    return items
