"""The feedback store: groups waiting for people and the rankings they gave, in one SQLite file
(`<output_dir>/feedback.sqlite`) in WAL mode, every ranking committed as it arrives.

Tables:

* `groups`: id (a stable hash of the prompt and the candidates, `group_id`), the prompt as JSON,
  the candidate texts as JSON, the step that asked, the time it was first stored, and whether it
  is *waiting* (a step is waiting for its rankings; only a waiting group can be ranked).
* `rankings`: the group, the labeller, the ranking (candidate indices best first, as *tie
  groups*: `[[2], [0, 1]]` is 2 best, 0 and 1 tied behind it), a skipped flag, the time.

Each ranking is one INSERT in autocommit mode with `synchronous=FULL`: when `add_ranking` returns,
the row is in the WAL file on disk, so a SIGKILL of the run loses none (tested). Two people
ranking the same group are both kept; a group stored again (a resumed run regenerating the same
completions) keeps its rankings, so it is not asked again.

Export (`export`): TRL's preference format (`prompt`/`chosen`/`rejected`, one row per pair a
ranking implies) and the full rankings, as JSONL.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FeedbackStore", "Group", "Ranking", "group_id", "normalize_ranking", "ranks_of", "implied_pairs",
           "BadRanking", "NotWaiting", "UnknownGroup", "STORE_FILE"]

STORE_FILE = "feedback.sqlite"
PAIRS = ("all", "best")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,
    candidates TEXT NOT NULL,
    step INTEGER,
    created REAL NOT NULL,
    waiting INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS rankings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id TEXT NOT NULL REFERENCES groups(id),
    labeller TEXT NOT NULL,
    ranking TEXT,
    skipped INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS rankings_by_group ON rankings(group_id);
"""


class BadRanking(ValueError):
    """A ranking that does not place each candidate exactly once (HTTP 400)."""


class NotWaiting(ValueError):
    """A ranking for a group that no step is waiting for, or a second one by the same person (HTTP 409)."""


class UnknownGroup(KeyError):
    """No group with this id (HTTP 404)."""


@dataclass(frozen=True)
class Group:
    id: str
    prompt: Any                  # as the trainer gave it: a string or a list of chat messages
    candidates: list[str]        # the distinct completion texts
    step: int | None
    created: float
    waiting: bool


@dataclass(frozen=True)
class Ranking:
    group_id: str
    labeller: str
    ranking: list[list[int]]     # tie groups of candidate indices, best first; [] when skipped
    skipped: bool
    time: float


def _json(obj: Any) -> str:
    """JSON of a prompt or candidates; what JSON cannot hold (an image) is kept as its type name."""
    return json.dumps(obj, ensure_ascii=False, default=lambda o: f"<{type(o).__name__}>")


def group_id(prompt: Any, candidates: Sequence[str]) -> str:
    """A stable id of a group: sha256 of the prompt and the candidate texts, in order (32 hex)."""
    return hashlib.sha256(_json([prompt, list(candidates)]).encode()).hexdigest()[:32]


def normalize_ranking(raw: Any, m: int) -> list[list[int]]:
    """A ranking as given (a list whose items are an index or a list of tied indices, best first)
    -> tie groups; every index 0..m-1 exactly once, else BadRanking naming what is wrong.
    [2, [0, 1]] -> [[2], [0, 1]]."""
    if not isinstance(raw, (list, tuple)):
        raise BadRanking(f"a ranking is a list of candidate positions best first, got {raw!r}")
    groups: list[list[int]] = []
    for item in raw:
        members = list(item) if isinstance(item, (list, tuple)) else [item]
        if not members or not all(isinstance(i, int) and not isinstance(i, bool) for i in members):
            raise BadRanking(f"a ranking's items are positions or non-empty lists of tied positions, got {item!r}")
        groups.append([int(i) for i in members])
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(m)):
        raise BadRanking(f"the ranking must place each of the {m} candidates (0..{m - 1}) exactly once, "
                         f"got {list(raw)!r}")
    return groups


def ranks_of(ranking: Sequence[Sequence[int]], m: int) -> list[float]:
    """Tie groups -> each candidate's rank (1 = best), a tie sharing the mean of its places.
    [[2], [0, 1]] -> [2.5, 2.5, 1.0]."""
    ranks = [0.0] * m
    place = 0
    for tied in ranking:
        shared = place + (len(tied) + 1) / 2
        for i in tied:
            ranks[i] = shared
        place += len(tied)
    return ranks


def implied_pairs(ranking: Sequence[Sequence[int]], pairs: str = "all") -> list[tuple[int, int]]:
    """(better, worse) candidate pairs a ranking implies; tied candidates give none.
    "all": every candidate against each one ranked below it (the K(K-1)/2 pairs of a strict order);
    "best": only the top tie group against each worse candidate.
    [[2], [0, 1]] -> [(2, 0), (2, 1)] either way; [[0], [1], [2]]: all -> (0,1), (0,2), (1,2)."""
    if pairs not in PAIRS:
        raise ValueError(f"pairs={pairs!r}: use 'all' or 'best'")
    out = []
    for k, better in enumerate(ranking[:1] if pairs == "best" else ranking):
        for worse_group in ranking[k + 1:]:
            out += [(b, w) for b in better for w in worse_group]
    return out


class FeedbackStore:
    """The SQLite store (see the module docstring). `path`: a .sqlite (.sqlite3, .db) file, or a run
    folder (its `feedback.sqlite`). Safe to share between threads (one connection behind a lock); each
    write is committed when the call returns. `version` counts the rankings added through this
    object, so a waiter can tell cheaply that something arrived."""

    def __init__(self, path: str | Path):
        path = Path(path).expanduser()
        if path.is_dir() or path.suffix not in (".sqlite", ".sqlite3", ".db"):
            path = path / STORE_FILE  # a run folder
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(f"feedback store {path}: SQLite refused WAL mode (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)
        self.version = 0

    @property
    def journal_mode(self) -> str:
        with self._lock:
            return str(self._db.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    # ---- groups ----
    def add_group(self, prompt: Any, candidates: Sequence[str], step: int | None = None) -> str:
        """Store a group (or find it again: same prompt and candidates, same id) and mark it
        waiting -> its id. A group stored before keeps its step, time and rankings."""
        candidates = [str(c) for c in candidates]
        gid = group_id(prompt, candidates)
        with self._lock:
            self._db.execute("INSERT INTO groups (id, prompt, candidates, step, created, waiting) "
                             "VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT(id) DO UPDATE SET waiting = 1",
                             (gid, _json(prompt), _json(candidates), step, time.time()))
        return gid

    def close_groups(self, ids: Iterable[str] | None = None) -> int:
        """No longer waiting: these groups (None: every waiting one, e.g. those a crashed run left) -> how many."""
        with self._lock:
            if ids is None:
                return self._db.execute("UPDATE groups SET waiting = 0 WHERE waiting = 1").rowcount
            ids = list(ids)
            if not ids:
                return 0
            marks = ",".join("?" * len(ids))
            return self._db.execute(f"UPDATE groups SET waiting = 0 WHERE id IN ({marks})", ids).rowcount

    def group(self, gid: str) -> Group | None:
        with self._lock:
            row = self._db.execute("SELECT id, prompt, candidates, step, created, waiting FROM groups WHERE id = ?",
                                   (gid,)).fetchone()
        return _group(row) if row else None

    def groups(self) -> list[Group]:
        with self._lock:
            rows = self._db.execute("SELECT id, prompt, candidates, step, created, waiting FROM groups "
                                    "ORDER BY created, rowid").fetchall()
        return [_group(r) for r in rows]

    def pending(self, labeller: str | None = None) -> list[Group]:
        """The waiting groups, those with the fewest rankings first, then the oldest; for a
        labeller, only those they have neither ranked nor skipped."""
        query = ("SELECT g.id, g.prompt, g.candidates, g.step, g.created, g.waiting FROM groups g "
                 "WHERE g.waiting = 1")
        args: list[Any] = []
        if labeller is not None:
            query += " AND NOT EXISTS (SELECT 1 FROM rankings r WHERE r.group_id = g.id AND r.labeller = ?)"
            args.append(labeller)
        query += (" ORDER BY (SELECT COUNT(*) FROM rankings r WHERE r.group_id = g.id AND r.skipped = 0), "
                  "g.created, g.rowid")
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [_group(r) for r in rows]

    # ---- rankings ----
    def add_ranking(self, gid: str, labeller: str, ranking: Any = None, skipped: bool = False,
                    require_waiting: bool = True) -> list[list[int]]:
        """Record one person's ranking of a group (candidate indices best first, ties as lists), or
        their skip; committed before returning -> the ranking as tie groups. Raises UnknownGroup,
        NotWaiting (the group is not waiting, or this labeller already answered it) or BadRanking."""
        labeller = str(labeller).strip()
        if not labeller:
            raise BadRanking("a ranking needs the labeller's name")
        with self._lock:
            group = self.group(gid)
            if group is None:
                raise UnknownGroup(gid)
            if require_waiting and not group.waiting:
                raise NotWaiting(f"group {gid} is not waiting for a ranking (its step is over)")
            if self._db.execute("SELECT 1 FROM rankings WHERE group_id = ? AND labeller = ?",
                                (gid, labeller)).fetchone():
                raise NotWaiting(f"{labeller!r} already answered group {gid}")
            tie_groups = [] if skipped else normalize_ranking(ranking, len(group.candidates))
            self._db.execute("INSERT INTO rankings (group_id, labeller, ranking, skipped, created) "
                             "VALUES (?, ?, ?, ?, ?)",
                             (gid, labeller, json.dumps(tie_groups), int(bool(skipped)), time.time()))
            self.version += 1
        return tie_groups

    def rankings_for(self, gid: str, include_skipped: bool = False) -> list[Ranking]:
        """A group's rankings, oldest first (skips left out unless asked)."""
        with self._lock:
            rows = self._db.execute("SELECT group_id, labeller, ranking, skipped, created FROM rankings "
                                    "WHERE group_id = ? ORDER BY id", (gid,)).fetchall()
        out = [_ranking(r) for r in rows]
        return out if include_skipped else [r for r in out if not r.skipped]

    def rankings(self, include_skipped: bool = True) -> list[Ranking]:
        with self._lock:
            rows = self._db.execute("SELECT group_id, labeller, ranking, skipped, created FROM rankings "
                                    "ORDER BY id").fetchall()
        out = [_ranking(r) for r in rows]
        return out if include_skipped else [r for r in out if not r.skipped]

    def progress(self, labeller: str | None = None) -> dict[str, Any]:
        """Groups waiting, groups ranked (at least one ranking), rankings, the latest step; with a
        labeller, also how many they answered (`yours`)."""
        with self._lock:
            waiting = self._db.execute("SELECT COUNT(*) FROM groups WHERE waiting = 1").fetchone()[0]
            ranked = self._db.execute("SELECT COUNT(DISTINCT group_id) FROM rankings WHERE skipped = 0").fetchone()[0]
            count = self._db.execute("SELECT COUNT(*) FROM rankings WHERE skipped = 0").fetchone()[0]
            step = self._db.execute("SELECT MAX(step) FROM groups").fetchone()[0]
            out = {"waiting": int(waiting), "ranked": int(ranked), "rankings": int(count), "step": step}
            if labeller is not None:
                out["yours"] = int(self._db.execute("SELECT COUNT(*) FROM rankings WHERE labeller = ?",
                                                    (labeller,)).fetchone()[0])
        return out

    # ---- export ----
    def preference_rows(self, pairs: str = "all") -> Iterator[dict[str, Any]]:
        """TRL's preference format: {"prompt", "chosen", "rejected"} per pair a ranking implies
        (`implied_pairs`); a conversational prompt (a list of messages) gets chosen/rejected as
        one assistant message each (TRL's conversational form), a text prompt plain strings."""
        groups = {g.id: g for g in self.groups()}
        for r in self.rankings(include_skipped=False):
            g = groups[r.group_id]
            chat = isinstance(g.prompt, list)
            for better, worse in implied_pairs(r.ranking, pairs):
                chosen, rejected = g.candidates[better], g.candidates[worse]
                if chat:
                    yield {"prompt": g.prompt, "chosen": [{"role": "assistant", "content": chosen}],
                           "rejected": [{"role": "assistant", "content": rejected}]}
                else:
                    yield {"prompt": g.prompt, "chosen": chosen, "rejected": rejected}

    def ranking_rows(self) -> Iterator[dict[str, Any]]:
        """Every ranking (skips included) with its group: group_id, step, prompt, candidates,
        labeller, ranking (tie groups of candidate indices, best first), skipped, time."""
        groups = {g.id: g for g in self.groups()}
        for r in self.rankings(include_skipped=True):
            g = groups[r.group_id]
            yield {"group_id": g.id, "step": g.step, "prompt": g.prompt, "candidates": g.candidates,
                   "labeller": r.labeller, "ranking": r.ranking, "skipped": r.skipped, "time": r.time}

    def export(self, out_dir: str | Path, pairs: str = "all") -> dict[str, Any]:
        """Write `preferences.jsonl` (TRL's prompt/chosen/rejected) and `rankings.jsonl` into
        `out_dir` -> {"preferences": path, "pairs": rows, "rankings": path, "rows": rows}."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        for name, rows in (("preferences", self.preference_rows(pairs)), ("rankings", self.ranking_rows())):
            path = out / f"{name}.jsonl"
            n = 0
            with path.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    n += 1
            written[name] = (path, n)
        return {"preferences": str(written["preferences"][0]), "pairs": written["preferences"][1],
                "rankings": str(written["rankings"][0]), "rows": written["rankings"][1]}

    # ---- lifetime ----
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _group(row: tuple) -> Group:
    return Group(row[0], json.loads(row[1]), json.loads(row[2]), row[3], row[4], bool(row[5]))


def _ranking(row: tuple) -> Ranking:
    return Ranking(row[0], row[1], json.loads(row[2]) if row[2] else [], bool(row[3]), row[4])
