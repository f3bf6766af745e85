"""The feedback store (issue 26): SQLite in WAL mode in the run folder, every ranking committed at
once (a SIGKILLed writer loses none), two people's rankings of one group both kept, resume, and the
export to TRL's preference format worked by hand; `grpokit feedback export`."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from grpokit.cli import main
from grpokit.feedback.store import (BadRanking, FeedbackStore, NotWaiting, UnknownGroup, group_id, implied_pairs,
                                    normalize_ranking, ranks_of)


def test_the_store_is_a_wal_sqlite_file_in_the_run_folder(tmp_path):
    with FeedbackStore(tmp_path / "run") as store:
        assert store.path == tmp_path / "run" / "feedback.sqlite" and store.path.is_file()
        assert store.journal_mode == "wal"
    with FeedbackStore(tmp_path / "other.sqlite") as store:
        assert store.path == tmp_path / "other.sqlite"


def test_ranking_arithmetic_by_hand():
    assert normalize_ranking([2, [0, 1]], 3) == [[2], [0, 1]]
    assert ranks_of([[2], [0, 1]], 3) == [2.5, 2.5, 1.0]
    assert ranks_of([[1], [0], [3, 2]], 4) == [2.0, 1.0, 3.5, 3.5]
    assert implied_pairs([[2], [0, 1]]) == [(2, 0), (2, 1)] == implied_pairs([[2], [0, 1]], "best")
    assert implied_pairs([[0], [1], [2]]) == [(0, 1), (0, 2), (1, 2)]
    assert implied_pairs([[0], [1], [2]], "best") == [(0, 1), (0, 2)]
    assert implied_pairs([[0, 1, 2]]) == []
    for bad in ([0, 1], [0, 1, 1], [0, 1, 3], [[0, 1], []], [0, True, 2], "012", [[0], 1.0, 2]):
        with pytest.raises(BadRanking):
            normalize_ranking(bad, 3)


def test_two_labellers_are_both_kept_and_the_rules_hold(tmp_path):
    store = FeedbackStore(tmp_path)
    gid = store.add_group("p", ["a", "b", "c"], step=3)
    assert gid == group_id("p", ["a", "b", "c"]) and len(gid) == 32
    assert store.add_ranking(gid, "ann", [2, [0, 1]]) == [[2], [0, 1]]
    store.add_ranking(gid, "bob", [[0], [1], [2]])
    assert [(r.labeller, r.ranking) for r in store.rankings_for(gid)] == [("ann", [[2], [0, 1]]),
                                                                          ("bob", [[0], [1], [2]])]
    with pytest.raises(NotWaiting, match="already answered"):
        store.add_ranking(gid, "ann", [0, 1, 2])
    with pytest.raises(BadRanking, match="each of the 3 candidates"):
        store.add_ranking(gid, "cy", [0, 1])
    with pytest.raises(UnknownGroup):
        store.add_ranking("nope", "cy", [0, 1, 2])
    store.add_ranking(gid, "cy", skipped=True)
    assert len(store.rankings_for(gid)) == 2 and len(store.rankings_for(gid, include_skipped=True)) == 3
    assert store.progress("ann") == {"waiting": 1, "ranked": 1, "rankings": 2, "step": 3, "yours": 1}
    assert store.version == 3
    assert store.close_groups([gid]) == 1
    with pytest.raises(NotWaiting, match="not waiting"):
        store.add_ranking(gid, "dee", [0, 1, 2])
    assert store.pending() == []


def test_pending_puts_unranked_groups_first_and_leaves_out_what_a_labeller_answered(tmp_path):
    store = FeedbackStore(tmp_path)
    first = store.add_group("p1", ["a", "b"], step=1)
    second = store.add_group("p2", ["a", "b"], step=1)
    assert [g.id for g in store.pending()] == [first, second]
    store.add_ranking(first, "ann", [0, 1])
    assert [g.id for g in store.pending()] == [second, first]  # fewest rankings first
    assert [g.id for g in store.pending("ann")] == [second]
    store.add_ranking(second, "ann", skipped=True)
    assert store.pending("ann") == [] and [g.id for g in store.pending("bob")] == [second, first]  # a skip is no ranking


def test_reopening_finds_everything_and_a_group_stored_again_keeps_its_rankings(tmp_path):
    prompt = [{"role": "user", "content": "hi"}]
    with FeedbackStore(tmp_path) as store:
        gid = store.add_group(prompt, ["x", "y"], step=1)
        store.add_ranking(gid, "ann", [1, 0])
        store.close_groups()
    with FeedbackStore(tmp_path) as store:
        g = store.group(gid)
        assert g is not None and g.prompt == prompt and g.candidates == ["x", "y"] and not g.waiting
        assert store.add_group(prompt, ["x", "y"], step=7) == gid  # a resumed run regenerates the group
        g = store.group(gid)
        assert g.waiting and g.step == 1 and [r.ranking for r in store.rankings_for(gid)] == [[[1], [0]]]


def test_export_rows_worked_by_hand(tmp_path):
    """A ranking of 3 with a tie: "c" best, "a" and "b" tied behind it -> c>a, c>b; a second
    labeller: a and b tied first, c last -> a>c, b>c; a conversational group's pair is in TRL's
    conversational form; a skip gives no pair but a rankings row."""
    store = FeedbackStore(tmp_path)
    gid = store.add_group("p", ["a", "b", "c"], step=1)
    store.add_ranking(gid, "ann", [2, [0, 1]])
    store.add_ranking(gid, "bob", [[0, 1], 2])
    store.add_ranking(gid, "cy", skipped=True)
    chat = [{"role": "user", "content": "q"}]
    other = store.add_group(chat, ["long answer", "short"], step=2)
    store.add_ranking(other, "ann", [1, 0])
    assert list(store.preference_rows()) == [
        {"prompt": "p", "chosen": "c", "rejected": "a"},
        {"prompt": "p", "chosen": "c", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "c"},
        {"prompt": "p", "chosen": "b", "rejected": "c"},
        {"prompt": chat, "chosen": [{"role": "assistant", "content": "short"}],
         "rejected": [{"role": "assistant", "content": "long answer"}]}]
    out = store.export(tmp_path / "out")
    assert (out["pairs"], out["rows"]) == (5, 4)
    prefs = [json.loads(x) for x in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    assert prefs == list(store.preference_rows())
    ranks = [json.loads(x) for x in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()]
    assert [(r["labeller"], r["ranking"], r["skipped"], r["step"]) for r in ranks] == [
        ("ann", [[2], [0, 1]], False, 1), ("bob", [[0, 1], [2]], False, 1), ("cy", [], True, 1),
        ("ann", [[1], [0]], False, 2)]
    assert ranks[0]["prompt"] == "p" and ranks[0]["candidates"] == ["a", "b", "c"] and ranks[0]["group_id"] == gid


CHILD = textwrap.dedent("""
    import sys
    from grpokit.feedback.store import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    gid = store.add_group("p", ["a", "b", "c"], step=1)
    for i in range(100000):
        store.add_ranking(gid, f"l{i}", [i % 3, (i + 1) % 3, (i + 2) % 3])
        print(i, flush=True)  # after the commit: the parent counts only what was acknowledged
""")


def test_rankings_survive_a_sigkill_of_the_writer(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    acknowledged = []
    try:
        for line in child.stdout:
            acknowledged.append(int(line))
            if len(acknowledged) == 50:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert child.returncode == -signal.SIGKILL and len(acknowledged) == 50
    with FeedbackStore(tmp_path) as store:
        gid = group_id("p", ["a", "b", "c"])
        kept = {r.labeller: r.ranking for r in store.rankings_for(gid)}
        assert {f"l{i}" for i in acknowledged} <= set(kept)  # none acknowledged is lost
        assert kept["l4"] == [[1], [2], [0]]
        assert store.group(gid).waiting  # the killed run left it waiting; the next run's reward closes it


def test_the_export_command(tmp_path, capsys):
    store = FeedbackStore(tmp_path / "run")
    gid = store.add_group("p", ["a", "b", "c"], step=1)
    store.add_ranking(gid, "ann", [[0], [1], [2]])
    store.close()
    assert main(["feedback", "export", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert "3 preference pairs" in capsys.readouterr().out
    assert len((tmp_path / "exp" / "preferences.jsonl").read_text().splitlines()) == 3
    assert len((tmp_path / "exp" / "rankings.jsonl").read_text().splitlines()) == 1
    assert main(["feedback", "export", str(tmp_path / "run"), "--pairs", "best"]) == 0  # default --out: RUN_DIR
    assert len((tmp_path / "run" / "preferences.jsonl").read_text().splitlines()) == 2
    assert main(["feedback", "--help"]) == 0 and "preferences.jsonl" in capsys.readouterr().out
    assert main(["feedback", "export", str(tmp_path / "nothing")]) == 2
    assert "no feedback store" in capsys.readouterr().err
    assert main(["feedback", "import", str(tmp_path / "run")]) == 2
