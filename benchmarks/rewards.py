"""Rewards per second, side by side, in one run:

  1. `accuracy` (math-verify): in this process vs a process pool of --workers workers.
     Every timed run gets fresh completions (the parse/verify caches would otherwise make repeats
     free); the pool is timed cold (workers start) and warm.
  2. `code` in the local sandbox: one sandbox at a time vs --concurrency at a time.

    python benchmarks/rewards.py [--n-math 512] [--workers N] [--n-code 32] [--concurrency N]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

from grpokit.rewards import RewardRunner
from grpokit.rewards.math import AccuracyReward


def math_batch(n: int, seed: int, group: int = 8) -> tuple[list, list, list]:
    """n completions, `group` per problem; golds and answers in several notations, ~half right."""
    rng = random.Random(seed)
    prompts, completions, golds = [], [], []
    for p in range(n // group):
        a, b = rng.randint(1, 97), rng.randint(2, 89)
        kind = p % 5
        if kind == 0:
            gold, right, wrong = f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}", f"\\frac{{{a + 1}}}{{{b}}}"
        elif kind == 1:
            gold, right, wrong = f"{a / 4}", f"\\frac{{{a}}}{{4}}", f"{a / 4 + 1}"
        elif kind == 2:
            gold, right, wrong = f"\\{{{a},{b}\\}}", f"\\{{{b},{a}\\}}", f"\\{{{a},{b + 1}\\}}"
        elif kind == 3:
            gold, right, wrong = f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}", f"x^2+{a}x+{a * a}"
        else:
            gold, right, wrong = f"{a * b}", f"{a * b}.0", f"{a * b + 1}"
        for _ in range(group):
            pred = right if rng.random() < 0.5 else wrong
            prompts.append(f"problem {p}")
            completions.append(f"Let me think step by step about {a} and {b}. ... So the answer is \\boxed{{{pred}}}.")
            golds.append(gold)
    return prompts, completions, golds


def rate(runner: RewardRunner, batch) -> tuple[float, float]:
    prompts, completions, golds = batch
    t0 = time.perf_counter()
    out = runner(prompts, completions, columns={"answer": golds})
    secs = time.perf_counter() - t0
    return len(completions) / secs, float(out.per_func.nanmean())


def bench_math(n: int, workers: int) -> None:
    acc = AccuracyReward()
    serial = RewardRunner([acc], timeout=120)
    rate(serial, math_batch(64, seed=-1))  # import math-verify and sympy once
    r_serial, mean_s = rate(serial, math_batch(n, seed=1))
    with RewardRunner([acc], timeout=120, num_workers=workers) as pooled:
        r_cold, _ = rate(pooled, math_batch(n, seed=2))
        r_warm, mean_p = rate(pooled, math_batch(n, seed=3))
    print(f"accuracy (math-verify), N={n} completions, mean reward {mean_s:.2f} / {mean_p:.2f}")
    print(f"  {'in process':<28}{r_serial:10.1f} rewards/s")
    print(f"  {f'pool, {workers} workers, cold':<28}{r_cold:10.1f} rewards/s   (includes starting the workers)")
    print(f"  {f'pool, {workers} workers, warm':<28}{r_warm:10.1f} rewards/s   x{r_warm / r_serial:.2f} vs in process")


def code_batch(n: int) -> tuple[list, list]:
    sols = ["def add(a, b):\n    return a + b",                       # right
            "def add(a, b):\n    return a - b",                       # wrong
            "def add(a, b):\n    total = 0\n    for _ in range(200000):\n        total += 1\n    return a + b",
            "import math\ndef add(a, b):\n    return math.fsum([a, b])"]
    tests = ["assert add(1, 2) == 3", "assert add(-5, 5) == 0", "assert add(10, 32) == 42"]
    completions = [f"```python\n{sols[i % len(sols)]}\n```" for i in range(n)]
    return completions, [tests] * n


def bench_code(n: int, concurrency: list[int]) -> None:
    from grpokit.rewards.code import CodeReward
    from grpokit.rewards.sandbox import SandboxUnavailable

    try:
        reward = CodeReward(timeout=5.0, max_concurrency=1)
    except SandboxUnavailable as e:
        print(f"code sandbox: unavailable here ({e})")
        return
    completions, tests = code_batch(n)
    print(f"code (local sandbox, 3 assert tests each), N={n} completions")
    base = None
    for c in concurrency:
        reward.max_concurrency = c
        t0 = time.perf_counter()
        out = reward(None, completions, tests=tests)
        r = n / (time.perf_counter() - t0)
        base = base or r
        print(f"  {f'{c} sandbox(es) at a time':<28}{r:10.1f} rewards/s   x{r / base:.2f}   mean reward "
              f"{sum(out) / len(out):.2f}")


def main(argv=None) -> int:
    cpus = os.cpu_count() or 1
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-math", type=int, default=512)
    ap.add_argument("--workers", type=int, default=cpus)
    ap.add_argument("--n-code", type=int, default=32)
    ap.add_argument("--concurrency", type=int, nargs="+", default=sorted({1, cpus, 2 * cpus}))
    ap.add_argument("--skip-code", action="store_true")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {cpus} CPUs, load average {load:.1f}, python {sys.version.split()[0]}")
    bench_math(args.n_math, args.workers)
    if not args.skip_code:
        bench_code(args.n_code, args.concurrency)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
