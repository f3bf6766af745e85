"""`grpokit compare [config.yaml] [key=value ...]`: GRPO, PPO and DPO on the same task, model,
reward and sample budget, and a report of what each bought with it.

Each algorithm runs in its own process (`python -m grpokit.compare.run --worker ...`), one after the
other, so that peak memory is each run's own and no run's timing overlaps another's. Every run
uses the same shared settings (model, task, reward, sampled completions per step, steps, learning
rate and schedule, sampling temperature, evaluation); only the algorithm's own knobs differ
(`ALGO_DEFAULTS`, overridable per algorithm under a `grpo:`, `ppo:` or `dpo:` key). The report
(`report_dir`, default reports/compare) holds README.md and two PNGs:

- curves.png: training reward and held-out greedy accuracy against sampled completions and
  against training wall time;
- cost.png: training wall time, peak memory, and the parameters each algorithm trains or keeps.

Each algorithm runs once per seed (the seed sets data order and sampling; the starting model is
the same). The default is one seed, which keeps the whole comparison to a few minutes on a 2-core
CPU; with `seeds=[42,43,44]` the report gives the mean over seeds with each seed's curve and
final accuracy (docs/compare.md shows both).

Options besides the config fields: `algos` (default [grpo, ppo, dpo]), `seeds` (default [42];
`seed=7` means seeds=[7]), `output_dir` (runs go to output_dir/<algo>/seed<n>),
`report_dir`, `torch_num_threads` (default 1: on a small CPU shared with other jobs, two threads
per process made these small models up to 20x slower), `isolate` (default true; false runs the
algorithms in this process, faster to start but peak memory is then the largest so far, not each
run's own: the report says so), `report_only` (default false; true redraws the report from the
runs already in output_dir, e.g. after changing the plots).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

from grpokit.baselines import ALGOS, algo_classes
from grpokit.compare.report import machine_info, write_report
from grpokit.compare.settings import ALGO_DEFAULTS, COMPARE_DEFAULTS, OPTIONS
from grpokit.config_file import load_config_dict

def plan(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple[str, int], dict[str, Any]]]:
    """Split the command line / YAML into options and one full config per (algorithm, seed), in the
    order they run (seed by seed, the algorithms in turn, so slow drifts of a shared machine's load
    fall on every algorithm alike). Every config is built (validated) here, before anything runs."""
    raw = dict(raw)
    if "seed" in raw and "seeds" not in raw:
        raw["seeds"] = [raw.pop("seed")]
    options = {k: raw.pop(k, v) for k, v in OPTIONS.items()}
    per_algo = {a: raw.pop(a) or {} for a in ALGOS if a in raw}
    algos = options["algos"] if isinstance(options["algos"], list) else [options["algos"]]
    seeds = options["seeds"] if isinstance(options["seeds"], list) else [options["seeds"]]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise ValueError(f"compare: algos={algos}: choose among {', '.join(ALGOS)}.")
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(x, int) for x in seeds):
        raise ValueError(f"compare: seeds={seeds}: give distinct integers, e.g. seeds=[42,43,44].")
    configs = {}
    for seed in seeds:
        for algo in algos:
            cfg = {**COMPARE_DEFAULTS, **raw, **ALGO_DEFAULTS[algo], **per_algo.get(algo, {}), "seed": seed,
                   "output_dir": os.path.join(options["output_dir"], algo, f"seed{seed}"),
                   "run_name": f"{algo}-seed{seed}"}
            config_cls, _ = algo_classes(algo)
            config_cls(**cfg)  # errors now, naming the field, before the first run starts
            configs[(algo, seed)] = cfg
    options["algos"], options["seeds"], options["overrides"] = algos, seeds, per_algo
    return options, configs


def run_compare(argv: list[str]) -> int:
    options, configs = plan(load_config_dict(argv))
    started = time.time()
    machine = machine_info(options)
    results = {}
    for (algo, seed), cfg in configs.items():
        out = cfg["output_dir"]
        if options["report_only"]:  # the runs are there already: redraw the report from them
            with open(os.path.join(out, "compare_result.json")) as f:
                results[(algo, seed)] = json.load(f)
            continue
        if os.path.isdir(out):
            ours = any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "compare_config.json"))
            if not ours and os.listdir(out):
                raise ValueError(f"compare: {out} exists and is not a grpokit run folder; choose another output_dir.")
            shutil.rmtree(out)  # metrics.jsonl is appended to: a rerun starts from an empty folder
        os.makedirs(out, exist_ok=True)
        spec = os.path.join(out, "compare_config.json")
        with open(spec, "w") as f:
            json.dump({"config": cfg, "torch_num_threads": options["torch_num_threads"]}, f, indent=1)
        print(f"\n=== compare: {algo}, seed {seed} -> {out}", flush=True)
        if options["isolate"]:
            code = subprocess.run([sys.executable, "-m", "grpokit.compare.run", "--worker", algo, spec]).returncode
        else:
            code = _worker(algo, spec)
        if code != 0:
            print(f"compare: the {algo} run (seed {seed}) failed (exit {code}); see the output above.", file=sys.stderr)
            return code
        with open(os.path.join(out, "compare_result.json")) as f:
            results[(algo, seed)] = json.load(f)
    if options["report_only"]:
        with open(os.path.join(options["report_dir"], "summary.json")) as f:
            machine = json.load(f)["machine"]   # the machine and time of the runs, not of this redraw
        argv = [a for a in argv if not a.startswith(("report_only", "--report_only"))]
    else:
        machine["total_minutes"] = (time.time() - started) / 60
        machine["isolated"] = bool(options["isolate"])
    report = write_report(configs, results, options, machine, argv)
    print(f"\ncompare: report written to {report}")
    return 0


# --------------------------------------------------------------------------------------------
# One run (in its own process)
# --------------------------------------------------------------------------------------------

def _eval_clock():
    """A callback that adds up evaluation's CPU time, to leave it out of the training's: from the
    event before an evaluation (train begin, step end, log) to its on_evaluate."""
    from transformers import TrainerCallback

    class EvalClock(TrainerCallback):
        seconds, mark = 0.0, time.process_time()

        def _mark(self, *args, **kwargs):
            self.mark = time.process_time()

        on_train_begin = on_step_end = on_log = _mark

        def on_evaluate(self, *args, **kwargs):
            self.seconds += time.process_time() - self.mark

    return EvalClock()


def _worker(algo: str, spec_path: str) -> int:
    import torch

    from grpokit.baselines.common import parameter_counts

    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("torch_num_threads"):
        torch.set_num_threads(int(spec["torch_num_threads"]))
    config_cls, trainer_cls = algo_classes(algo)
    t0 = time.perf_counter()
    trainer = trainer_cls(args=config_cls(**spec["config"]))
    run = trainer.parts
    extra = [trainer.value_head] if hasattr(trainer, "value_head") else []
    params = parameter_counts(run, extra)
    rss_ready = _current_rss_gb()
    built = time.perf_counter() - t0
    clock = _eval_clock()
    trainer.add_callback(clock)
    cpu0 = time.process_time()
    trainer.train()
    cpu_train = time.process_time() - cpu0 - clock.seconds
    wall = time.perf_counter() - t0
    cfg = trainer.args
    # GRPO's steps are optimizer steps (num_iterations of them per generated batch); a PPO or DPO
    # step is one batch, with num_ppo_epochs x num_mini_batches (PPO) or 1 (DPO) optimizer steps
    updates = {"grpo": 1, "dpo": 1, "ppo": getattr(cfg, "num_ppo_epochs", 1) * getattr(cfg, "num_mini_batches", 1)}[algo]
    result = {
        "algo": algo, "params": params, "state_mb": _state_mb(run, extra),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_after_setup_gb": rss_ready,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None,
        "wall_seconds": wall, "setup_seconds": built, "optimizer_steps_per_step": updates,
        "optimizer_steps": run.total_steps * updates,
        "cpu_train_seconds": cpu_train, "cpu_eval_seconds": clock.seconds,
        "total_steps": run.total_steps, "torch_threads": torch.get_num_threads(),
        "completions_per_step": run.order.prompts_per_step * cfg.num_generations,
    }
    with open(os.path.join(cfg.output_dir, "compare_result.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _current_rss_gb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return None


def _state_mb(run, extra_modules) -> float:
    """Weights (policy, value head, reference) + gradients and AdamW's two moments of what trains."""
    def size(params, trainable_only=False):
        return sum(p.numel() * p.element_size() for p in params if p.requires_grad or not trainable_only)

    weights = size(run.model.parameters()) + sum(size(m.parameters()) for m in extra_modules)
    if run.ref_model is not None:
        weights += size(run.ref_model.parameters())
    trained = size(run.model.parameters(), True) + sum(size(m.parameters()) for m in extra_modules)
    return (weights + 3 * trained) / 2**20


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit(run_compare(sys.argv[1:]))
