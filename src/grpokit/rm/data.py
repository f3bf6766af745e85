"""Preference pairs for a reward model: from a feedback store or a TRL preference dataset, split by
prompt into training and held-out pairs.

* A feedback store (a run folder with `feedback.sqlite`, or the .sqlite file): every pair a
  ranking implies (`FeedbackStore.preference_rows`: the better candidate over each worse one; a
  tie gives no pair), each labeller's ranking counted, skips left out.
* A TRL preference dataset (`load_dataset_spec`: a JSONL / JSON / Parquet file, a folder of them,
  a saved dataset, a hub id) with `chosen` and `rejected`, and `prompt` (explicit prompt) or not
  (implicit prompt: the common beginning of chosen and rejected, as TRL's `extract_prompt`);
  plain strings or conversations (lists of messages), as TRL's RewardTrainer takes them; an
  optional `margin` column (TRL's: the loss asks r_chosen - r_rejected to exceed it).

The held-out split is deterministic: a prompt is held out when a stable hash of it (sha256 of its
JSON) falls below `eval_fraction`, so the pairs of one prompt (several groups, several labellers)
stay on one side and the same data always splits the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.feedback.store import STORE_FILE, FeedbackStore
from grpokit.rewards.text import is_conversational

__all__ = ["PreferenceData", "PreferencePair", "extract_prompt", "find_store", "is_heldout", "load_preference_pairs",
           "prompt_key", "split_pairs"]

STORE_SUFFIXES = (".sqlite", ".sqlite3", ".db")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: `chosen` is better than `rejected` after `prompt`."""

    prompt: Any          # a string, a list of messages, or None (the whole conversation is in chosen / rejected)
    chosen: Any          # a string or a list of messages
    rejected: Any
    margin: float | None = None


@dataclass
class PreferenceData:
    pairs: list[PreferencePair]
    source: str          # the store's path or the dataset's name
    kind: str            # "store" or "dataset"
    summary: str         # where the pairs come from, in words


def find_store(source: str | Path) -> Path | None:
    """The feedback store `source` names (a .sqlite / .sqlite3 / .db file, or a folder holding
    feedback.sqlite), else None."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in STORE_SUFFIXES:
        return path
    if path.is_dir() and (path / STORE_FILE).is_file():
        return path / STORE_FILE
    return None


def load_preference_pairs(source: Any, pairs: str = "all", split: str = "train") -> PreferenceData:
    """Preference pairs from a feedback store or a TRL preference dataset (see the module docstring).
    ValueError / FileNotFoundError in one line for what cannot be read: no such file, a missing
    column, no pair at all."""
    if source is None or source == "":
        raise ValueError("give the data: a feedback store (a run folder or its feedback.sqlite) or a TRL preference "
                         "dataset (JSONL / JSON / Parquet with chosen and rejected)")
    if isinstance(source, (str, Path)):
        store = find_store(source)
        if store is not None:
            return _from_store(store, pairs)
        path = Path(source).expanduser()
        if path.suffix in STORE_SUFFIXES:
            raise FileNotFoundError(f"no feedback store at {source}")
        if path.is_dir() and not any(path.iterdir()):
            raise FileNotFoundError(f"{source} is an empty folder: neither a run folder with {STORE_FILE} nor a "
                                    "preference dataset")
    return _from_dataset(source, split)


def _from_store(path: Path, pairs: str) -> PreferenceData:
    with FeedbackStore(path) as store:
        rankings = store.rankings(include_skipped=True)
        rows = list(store.preference_rows(pairs))
    given = [r for r in rankings if not r.skipped]
    out = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    if not out:
        raise ValueError(f"the feedback store {path} holds no preference pair: {len(given)} ranking(s) "
                         f"({len(rankings) - len(given)} skip(s)); a ranking of tied candidates gives none")
    labellers = len({r.labeller for r in given})
    groups = len({r.group_id for r in given})
    summary = (f"{len(given)} rankings of {groups} groups by {labellers} labeller{'s' * (labellers != 1)} "
               f"in {path} (pairs={pairs})")
    return PreferenceData(out, str(path), "store", summary)


def _from_dataset(source: Any, split: str) -> PreferenceData:
    from grpokit.data.loading import load_dataset_spec

    name = str(source) if isinstance(source, (str, Path)) else "the dataset"
    if isinstance(source, (str, Path)) and not Path(source).expanduser().exists():
        text = str(source)
        if text.startswith(("/", ".", "~")) or Path(text).suffix or text.count("/") != 1:  # not a hub id org/name
            raise FileNotFoundError(f"no feedback store or preference dataset at {text} (give a run folder with "
                                    f"{STORE_FILE}, a .sqlite file, or a JSONL / JSON / Parquet file or folder)")
    import datasets

    quiet = datasets.is_progress_bar_enabled()
    if quiet:  # reading a small file: no bar (and an error stays one line)
        datasets.disable_progress_bars()
    try:
        dataset = load_dataset_spec(source, split=split)
    finally:
        if quiet:
            datasets.enable_progress_bars()
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: no {' and no '.join(repr(c) for c in missing)} column (columns: "
                         f"{', '.join(dataset.column_names)}); a preference dataset has chosen and rejected, and "
                         "optionally prompt (TRL's format)")
    explicit = "prompt" in dataset.column_names
    has_margin = "margin" in dataset.column_names
    out: list[PreferencePair] = []
    same = 0
    for i, row in enumerate(dataset):
        chosen, rejected = row["chosen"], row["rejected"]
        for column, value in (("chosen", chosen), ("rejected", rejected)):
            if not (isinstance(value, str) or is_conversational(value)):
                raise ValueError(f"{name}: row {i}: {column} must be a string or a list of messages "
                                 f"(role, content), got {type(value).__name__}")
        prompt = row["prompt"] if explicit else None
        if not explicit:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if chosen == rejected:
            same += 1  # no preference to learn
            continue
        margin = None
        if has_margin and row["margin"] is not None:
            margin = float(row["margin"])
            if not math.isfinite(margin):
                raise ValueError(f"{name}: row {i}: margin must be a finite number, got {row['margin']!r}")
        out.append(PreferencePair(prompt, chosen, rejected, margin))
    if not out:
        raise ValueError(f"{name}: no preference pair ({len(dataset)} rows" +
                         (f", {same} with chosen identical to rejected)" if same else ")"))
    summary = f"{len(dataset)} rows of {name}" + (f" ({same} with chosen = rejected left out)" if same else "")
    return PreferenceData(out, str(name), "dataset", summary)


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """An implicit prompt (TRL's `extract_prompt`): (the common beginning, chosen's rest, rejected's
    rest). Conversations share their first messages; strings their first characters, the prompt
    ending at a space (not in the middle of a word). No common beginning: prompt None."""
    n = min(len(chosen), len(rejected))
    k = 0
    while k < n and chosen[k] == rejected[k]:
        k += 1
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            return None, chosen, rejected
        k = chosen.rfind(" ", 0, k) + 1  # back to just after the last space of the common part (0: none)
        prompt: Any = chosen[:k]
    elif isinstance(chosen, str) or isinstance(rejected, str):
        return None, chosen, rejected
    else:
        k = min(k, n - 1) if n else 0  # each side keeps at least its last message
        prompt = list(chosen[:k])
    if not prompt:
        return None, chosen, rejected
    return prompt, chosen[k:], rejected[k:]


def prompt_key(pair: PreferencePair) -> str:
    """What the held-out split hashes: the prompt (as JSON when it is a conversation); without a
    prompt, the two completions in a fixed order."""
    if pair.prompt is not None:
        return pair.prompt if isinstance(pair.prompt, str) else _json(pair.prompt)
    return _json(sorted([_json(pair.chosen), _json(pair.rejected)]))


def is_heldout(key: str, eval_fraction: float) -> bool:
    """Whether a prompt (its `prompt_key`) is held out: the first 32 bits of its sha256 below the fraction."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 16 ** 8 < eval_fraction


def split_pairs(pairs: Sequence[PreferencePair], eval_fraction: float) -> tuple[list[PreferencePair],
                                                                               list[PreferencePair]]:
    """(training pairs, held-out pairs), by prompt (`is_heldout`), each in the order given."""
    train: list[PreferencePair] = []
    heldout: list[PreferencePair] = []
    for pair in pairs:
        (heldout if is_heldout(prompt_key(pair), eval_fraction) else train).append(pair)
    return train, heldout


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
