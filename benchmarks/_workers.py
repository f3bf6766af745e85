"""Running a benchmark's two frameworks side by side: each in its own subprocess (grpokit in this
interpreter, TRL in benchmarks/.venv-trl), alternating which goes first from repeat to repeat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRL_PYTHON = os.path.join(HERE, ".venv-trl", "bin", "python")


def run_worker(script: str, framework: str, spec: dict) -> dict:
    """`python script --worker framework --spec JSON` in the framework's interpreter; its last
    stdout line (JSON) is the result."""
    python = sys.executable if framework == "grpokit" else TRL_PYTHON
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.path.join(ROOT, "src")}
    out = subprocess.run([python, script, "--worker", framework, "--spec", json.dumps(spec)], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(script: str, repeats: int, spec_for: Callable[[int], dict]) -> dict[str, list[dict]]:
    """`repeats` runs of both frameworks (repeat r with spec_for(r)), grpokit first in even
    repeats and TRL first in odd ones; {framework: [result per repeat]}."""
    if not os.path.exists(TRL_PYTHON):
        sys.exit(f"TRL's venv is missing ({TRL_PYTHON}); see benchmarks/grpo_step.py for how to make it.")
    results: dict[str, list[dict]] = {"grpokit": [], "trl": []}
    for r in range(repeats):
        for fw in (("grpokit", "trl") if r % 2 == 0 else ("trl", "grpokit")):
            t0 = time.perf_counter()
            results[fw].append(run_worker(script, fw, spec_for(r)))
            print(f"  repeat {r + 1}: {fw} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return results


def command_line(doc: str, worker: Callable[[str, dict], dict]):
    """The benchmarks' shared options (--quick, --repeats, --steps, --threads). Run as a worker
    (--worker F --spec JSON), it prints worker(F, spec) as JSON and returns None; else the options."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["grpokit", "trl"])
    ap.add_argument("--spec")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return None
    return args
