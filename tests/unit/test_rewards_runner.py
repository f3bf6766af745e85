"""RewardRunner: None/NaN, error and timeout policies, async, weights, the process pool,
signature checks, stats and describe_rewards. Literal inputs, numbers worked out in comments."""

import asyncio
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from grpokit.rewards import RewardError, RewardRunner, RewardTimeout, describe_rewards, load_reward_funcs

import pool_reward_funcs as pf

P = ["p0", "p0", "p1", "p1"]
C = ["a", "bb", "ccc", "dddd"]


# module-level functions: picklable, so they can run in the process pool
def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def half_none(prompts, completions, **kw):
    return [None if i % 2 else 1.0 for i in range(len(completions))]


def slow_on_ccc(prompts, completions, **kw):
    if "ccc" in completions:
        time.sleep(60)
    return [0.5] * len(completions)


def spin_on_ccc(prompts, completions, **kw):  # pure-Python busy loop: stopped by the async exception
    while "ccc" in completions:
        pass
    return [0.5] * len(completions)


def boom(prompts, completions, **kw):
    raise ZeroDivisionError("bad row")


def uses_answer(prompts, completions, answer):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def test_none_is_nan_and_total_is_weighted_nansum():
    # length: 1,2,3,4; half_none: 1,None,1,None; weights 2 and 10
    # total = 2*len + 10*half -> 12, 4, 16, 8
    runner = RewardRunner([length_reward, half_none], weights=[2.0, 10.0])
    out = runner(P, C)
    assert out.names == ["length_reward", "half_none"]
    assert out.per_func.dtype == torch.float32 and out.per_func.shape == (4, 2)
    assert torch.isnan(out.per_func[1, 1]) and out.per_func[0, 1] == 1.0
    assert out.total.tolist() == [12.0, 4.0, 16.0, 8.0]
    # nan-aware stats: half_none mean over the two applicable rows = 1.0; std of one value... two values (1,1) = 0
    assert out.stats["rewards/half_none/mean"] == 1.0 and out.stats["rewards/half_none/std"] == 0.0
    assert out.stats["rewards/half_none/frac_none"] == 0.5
    # length std, Bessel: values 1..4, mean 2.5, sum sq dev 5, / 3 -> sqrt(5/3)
    assert math.isclose(out.stats["rewards/length_reward/std"], math.sqrt(5 / 3), rel_tol=1e-6)
    assert out.stats["rewards/errors"] == 0 and out.stats["rewards/timeouts"] == 0


def test_total_is_nan_only_where_every_function_is_none():
    def all_none(prompts, completions, **kw):
        return [None] * len(completions)

    out = RewardRunner([all_none, half_none])(P, C)
    assert torch.isnan(out.total[1]) and torch.isnan(out.total[3])
    assert out.total[0] == 1.0 and out.stats["rewards/frac_all_none"] == 0.5


@pytest.mark.parametrize("bad, message", [
    (lambda prompts, completions, **k: [1.0] * 3, "returned 3 values for 4 completions"),
    (lambda prompts, completions, **k: [1.0, "x", 1.0, 1.0], r"'x' \(str\) at row 1"),
    (lambda prompts, completions, **k: 1.0, "returned float"),
])
def test_contract_violations_raise_naming_function_and_row(bad, message):
    bad.__name__ = "bad_reward"
    for on_error in ("raise", "none", "zero"):  # never silenced
        with pytest.raises(ValueError, match=message) as e:
            RewardRunner([bad], on_error=on_error)(P, C)
        assert "bad_reward" in str(e.value)


def test_nan_and_inf_are_errors_by_default_and_follow_the_policy():
    def nan_at_2(prompts, completions, **kw):
        return [1.0, 1.0, float("nan"), float("inf")]

    with pytest.raises(ValueError, match=r"'nan_at_2' returned non-finite values at rows \[2, 3\]"):
        RewardRunner([nan_at_2])(P, C)
    out = RewardRunner([nan_at_2], on_error="zero")(P, C)
    assert out.per_func[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0] and out.stats["rewards/errors"] == 2


def test_exception_policy():
    with pytest.raises(RewardError, match="'boom' raised ZeroDivisionError: bad row") as e:
        RewardRunner([boom, length_reward])(P, C)
    assert isinstance(e.value.__cause__, ZeroDivisionError)
    out = RewardRunner([boom, length_reward], on_error="none")(P, C)
    assert torch.isnan(out.per_func[:, 0]).all() and out.total.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert out.stats["rewards/errors"] == 4 and out.stats["rewards/boom/errors"] == 4
    assert out.errors[0]["function"] == "boom" and out.errors[0]["kind"] == "error"
    out = RewardRunner([boom], on_error="zero")(P, C)
    assert out.per_func[:, 0].tolist() == [0.0] * 4


def test_timeout_in_process_works_off_the_main_thread():
    result = {}

    def work():  # the runner itself runs in a non-main thread: no signals involved
        t0 = time.monotonic()
        out = RewardRunner([slow_on_ccc, length_reward], timeout=0.3, on_error="none")(P, C)
        result["out"], result["secs"] = out, time.monotonic() - t0

    t = threading.Thread(target=work)
    t.start()
    t.join(10)
    out = result["out"]
    assert result["secs"] < 3
    assert torch.isnan(out.per_func[:, 0]).all() and out.stats["rewards/timeouts"] == 4
    with pytest.raises(RewardTimeout, match="'slow_on_ccc' did not finish within 0.3 s"):
        RewardRunner([slow_on_ccc], timeout=0.3)(P, C)


def test_timeout_stops_a_busy_python_loop_in_process():
    before = threading.active_count()
    out = RewardRunner([spin_on_ccc], timeout=0.2, on_error="zero")(P, C)
    assert out.stats["rewards/timeouts"] == 4
    deadline = time.monotonic() + 3
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before  # the abandoned thread was stopped, not left spinning


def test_main_thread_runs_inline_and_the_alarm_interrupts_a_sleep():
    seen = []

    def where(prompts, completions, **kw):
        seen.append(threading.current_thread() is threading.main_thread())
        return [1.0] * len(completions)

    t0 = time.monotonic()
    out = RewardRunner([where, slow_on_ccc], timeout=0.3, on_error="none")(P, C)
    assert seen == [True]  # inline: no watchdog thread (1.4 ms per call on a busy CPU)
    assert time.monotonic() - t0 < 3 and out.stats["rewards/slow_on_ccc/timeouts"] == 4
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timer is disarmed after
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL  # and the handler given back


def test_an_armed_interval_timer_is_left_alone_and_the_thread_path_is_used():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append(True))
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        seen = []

        def where(prompts, completions, **kw):
            seen.append(threading.current_thread() is threading.main_thread())
            return [1.0] * len(completions)

        RewardRunner([where], timeout=1.0)(P, C)
        assert seen == [False]
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < remaining <= 5.0  # the user's timer still runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_async_functions_run_concurrently():
    async def slow_async_a(prompts, completions, **kw):
        await asyncio.sleep(0.4)
        return [1.0] * len(completions)

    async def slow_async_b(prompts, completions, **kw):
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    t0 = time.monotonic()
    out = RewardRunner([slow_async_a, slow_async_b, length_reward])(P, C)
    assert time.monotonic() - t0 < 0.75  # 0.4 + 0.4 if they ran one after the other
    assert out.total.tolist() == [4.0, 5.0, 6.0, 7.0]


def test_async_timeout_and_error():
    async def hangs(prompts, completions, **kw):
        await asyncio.sleep(30)

    async def fails(prompts, completions, **kw):
        raise KeyError("k")

    out = RewardRunner([hangs, fails], timeout=0.2, on_error="none")(P, C)
    assert out.stats["rewards/hangs/timeouts"] == 4 and out.stats["rewards/fails/errors"] == 4
    with pytest.raises(RewardTimeout):
        RewardRunner([hangs], timeout=0.2)(P, C)


def test_signature_check_names_function_and_missing_column():
    runner = RewardRunner([uses_answer])
    with pytest.raises(ValueError, match=r"'uses_answer' needs the argument 'answer'.*no column 'answer'"):
        runner.check_signature(columns={"prompt", "solution"})
    runner.check_signature(columns={"prompt", "answer", "extra"})  # extra columns are not passed
    out = runner(P, C, columns={"answer": ["a", "x", "ccc", "y"], "extra": [0] * 4})
    assert out.per_func[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_signature_check_positional_only_and_builtin_check_columns():
    def pos_only(prompts, completions, /):
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match="'pos_only': parameter 'prompts' is positional-only"):
        RewardRunner([pos_only]).check_signature({"prompt"})
    acc = RewardRunner(load_reward_funcs(["accuracy"]))
    with pytest.raises(ValueError, match="'accuracy': needs the gold answer in a column named 'answer' or 'solution'"):
        acc.check_signature({"prompt", "question"})


def test_columns_are_checked_for_length():
    with pytest.raises(ValueError, match="column 'answer' has 2 values for 4 completions"):
        RewardRunner([length_reward])(P, C, columns={"answer": [1, 2]})


def test_duplicate_names_are_made_unique():
    out = RewardRunner([length_reward, length_reward])(P, C)
    assert out.names == ["length_reward", "length_reward_2"]
    assert "rewards/length_reward_2/mean" in out.stats


def test_process_pool_matches_serial_and_uses_other_processes():
    with RewardRunner([pf.length_reward, pf.pid_reward, pf.none_if_even], num_workers=2, chunk_size=1) as pooled:
        out = pooled(P, C)
    serial = RewardRunner([pf.length_reward, pf.none_if_even])(P, C)
    assert torch.equal(out.per_func[:, [0, 2]].nan_to_num(-7), serial.per_func.nan_to_num(-7))
    pids = set(out.per_func[:, 1].tolist())
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_process_pool_timeout_kills_only_the_late_chunk_and_recovers():
    with RewardRunner([pf.slow_on_ccc], num_workers=2, chunk_size=1, timeout=1.0, on_error="none") as runner:
        t0 = time.monotonic()
        out = runner(P, C)
        assert time.monotonic() - t0 < 10
        assert out.per_func[:, 0].nan_to_num(-1).tolist() == [0.5, 0.5, -1, 0.5]
        assert out.stats["rewards/timeouts"] == 1
        out = runner(P[:2], C[:2])  # the killed worker was replaced
        assert out.per_func[:, 0].tolist() == [0.5, 0.5]


def test_process_pool_worker_death_is_an_error_not_a_hang():
    with RewardRunner([pf.die_on_ccc], num_workers=1, chunk_size=2, on_error="zero") as runner:
        out = runner(P, C)
    # chunks [a, bb] and [ccc, dddd]: the second worker call died
    assert out.per_func[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert "WorkerDied" in out.errors[0]["message"]


def test_unpicklable_function_falls_back_to_this_process(caplog):
    local = lambda prompts, completions, **kw: [float(os.getpid())] * len(completions)  # noqa: E731
    with RewardRunner([local], num_workers=2) as runner:
        assert runner(P, C).per_func[0, 0] == os.getpid()
    assert "cannot be sent to a worker process" in caplog.text


def test_group_size_keeps_groups_in_one_chunk():
    runner = RewardRunner([pf.length_reward], num_workers=2, chunk_size=3, group_size=2)
    assert runner._chunks(8) == [(0, 4), (4, 8)]


def test_describe_rewards_shows_values_none_and_errors():
    runner = RewardRunner([length_reward, half_none, boom], weights=[1.0, 1.0, 0.5])
    text = describe_rewards(runner, P, C, {"answer": ["x", "y", "z", "w"]})
    lines = text.splitlines()
    assert lines[0].split() == ["#", "prompt", "completion", "answer", "length_reward", "half_none", "boom", "total"]
    assert lines[2].split() == ["0", "p0", "a", "x", "1", "1", "error", "2"]
    assert lines[3].split() == ["1", "p0", "bb", "y", "2", "None", "error", "2"]
    assert "ZeroDivisionError" in text


def test_pool_never_reruns_an_unguarded_main_script(tmp_path):
    # TRL-style scripts often have no `if __name__ == "__main__":` guard; multiprocessing's
    # spawn/forkserver would re-run them in every worker. Our workers are fresh interpreters.
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from grpokit.rewards.pool import PoolTask, WorkerPool, payload_for\n"
        "import pool_reward_funcs as pf\n"
        "print('script body ran', flush=True)\n"
        "def in_main(prompts, completions, **kw):\n"
        "    return [0.0]\n"
        "pool = WorkerPool(1)\n"
        "kw = {'prompts': ['p'], 'completions': ['c']}\n"
        "(res,) = pool.run([PoolTask('k', payload_for(pf.pid_reward), kw, 30.0)])\n"
        "pool.close()\n"
        "print(res.status, res.value[0] != os.getpid(), payload_for(in_main))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the body ran once; the module's function ran in a worker; one from __main__ cannot be sent
    # (RewardRunner then runs it in this process: test_unpicklable_function_falls_back_to_this_process)
    assert done.stdout.splitlines() == ["script body ran", "ok True None"]


@pytest.mark.parametrize("values", [[1.0, float("nan"), 3.0, 6.0], [2.0], [float("nan")] * 3, [],
                                    [0.5, -1.25, 7.0, float("nan"), 2.0, 2.0]])
def test_reward_stats_equal_torch_nan_reductions(values):
    from grpokit.rewards.runner import _nan_stats

    mean, std, frac = _nan_stats(values)
    x = torch.tensor(values, dtype=torch.float64)
    kept = x[~torch.isnan(x)]
    # e.g. [1, nan, 3, 6]: mean 10/3, std sqrt(((1-10/3)^2 + (3-10/3)^2 + (6-10/3)^2) / 2) = 2.5166, 1/4 NaN
    assert math.isclose(mean, kept.mean().item(), rel_tol=1e-12) if kept.numel() else math.isnan(mean)
    assert math.isclose(std, kept.std().item(), rel_tol=1e-12) if kept.numel() > 1 else math.isnan(std)
    assert frac == (float(torch.isnan(x).double().mean()) if values else 0.0)
