"""The asynchronous pipeline's arithmetic (grpokit.pipeline.schedule) and its weight probe's
verdict (grpokit.pipeline.weights.compare), by hand."""

import pytest
import torch

from grpokit.pipeline import Limits, ProbeReport, Request, compare, needed_version


@pytest.mark.parametrize("step,staleness,every,version", [
    (0, 1, 1, 0), (1, 1, 1, 0), (5, 1, 1, 4),          # one step ahead: batch b sampled with version b-1
    (4, 1, 1, 3), (6, 1, 1, 5),                        # k=2 (num_iterations=2): batch b at step 2b, version 2b-1
    (6, 3, 2, 4), (5, 3, 2, 2), (3, 3, 2, 0),          # on the sync grid: 3 would be off it, so 4
    (7, 0, 1, 7),                                      # max_staleness=0: the synchronous run
])
def test_needed_version_by_hand(step, staleness, every, version):
    got = needed_version(step, staleness, every)
    assert got == version
    assert 0 <= step - got <= staleness or step - got == step  # within the bound (or the start)


def test_needed_version_never_exceeds_the_bound_on_the_grid():
    for every in (1, 2, 3, 4):
        for staleness in range(every - 1, every + 4):
            for step in range(40):
                v = needed_version(step, staleness, every)
                assert v % every == 0 and v <= step and step - v <= max(staleness, 0) + (0 if step > staleness else step)


def test_limits_defer_by_version_queue_and_inflight():
    lim = Limits(max_staleness=1, queue_maxsize=16, max_inflight=8)
    assert lim.may_request(request_step=3, version=2, samples=8, queued=0, inflight=0)
    assert not lim.may_request(request_step=4, version=2, samples=8, queued=0, inflight=0)  # weights not yet due
    assert not lim.may_request(request_step=3, version=2, samples=8, queued=9, inflight=0)  # 17 > 16 queued
    assert not lim.may_request(request_step=3, version=2, samples=8, queued=8, inflight=1)  # 9 > 8 in flight
    assert Limits(max_staleness=1).may_request(request_step=3, version=2, samples=8, queued=1000, inflight=1000)


def test_a_request_round_trips_through_a_dict():
    r = Request(index=3, rows=(5, 1), seed=42, version=2, step=3, samples=8)
    assert Request.from_dict(r.to_dict()) == r


def test_compare_names_the_parameters_and_the_gap():
    sums = {"a.weight": (1.0, 2.0), "b.weight": (3.0, 4.0)}
    same = ProbeReport(version=5, logps=torch.tensor([-1.0, -2.0]), checksums=dict(sums))
    assert compare(same, ProbeReport(5, torch.tensor([-1.0, -2.0 + 1e-5]), dict(sums)), tolerance=1e-3) is None
    off = ProbeReport(5, torch.tensor([-1.0, -2.5]), {**sums, "b.weight": (3.5, 4.0)})
    msg = compare(same, off, tolerance=1e-3)
    assert msg is not None and "step 5" in msg and "up to 0.5" in msg and "b.weight (sum 3" in msg
    assert "a.weight" not in msg and "(1 of 2)" in msg
    # the same parameters, different log-probs: the engine runs them differently
    msg = compare(same, ProbeReport(5, torch.tensor([-1.0, -2.5]), dict(sums)), tolerance=1e-3)
    assert msg is not None and "every trained parameter has the trainer's values" in msg
