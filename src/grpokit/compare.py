"""`grpokit compare [config.yaml] [key=value ...]`: GRPO, PPO and DPO on the same task, model,
reward and sample budget, and a report of what each bought with it.

Each algorithm runs in its own process (`python -m grpokit.compare --worker ...`), one after the
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
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any

from grpokit.baselines import ALGOS, algo_classes
from grpokit.cli import DEMO_DEFAULTS, load_config_dict

# Shared by the three runs: the demo's task, model, sampling and optimizer settings (`grpokit train`
# with no arguments: the built-in arithmetic task on the shipped starter model, on CPU), with a
# held-out evaluation every 20 steps and no checkpoints.
_FROM_DEMO = ("task", "use_cpu", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
              "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "max_steps")
COMPARE_DEFAULTS: dict[str, Any] = {
    **{k: DEMO_DEFAULTS[k] for k in _FROM_DEMO if k in DEMO_DEFAULTS},
    "eval_strategy": "steps",
    "eval_steps": 20,
    "eval_on_start": True,
    "task_num_eval": 200,
    "save_strategy": "no",
    "logging_steps": 10,
    "log_completions": False,
    "disable_tqdm": True,
    "plot": False,
    "seed": 42,
}

# Each algorithm's own knobs, at TRL's defaults (GRPO's are GRPOConfig's: beta=0, one update per batch).
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "ppo": {"num_ppo_epochs": 4, "num_mini_batches": 1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
            "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
}

OPTIONS = {"algos": list(ALGOS), "seeds": [42], "output_dir": "runs/compare",
           "report_dir": "reports/compare", "torch_num_threads": 1, "isolate": True, "report_only": False}
COLORS = {"grpo": "C0", "ppo": "C1", "dpo": "C2"}
TARGET_ACCURACY = 0.9
"""The report counts the samples and training time each run needed to first reach this held-out accuracy."""


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
    machine = _machine(options)
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
            code = subprocess.run([sys.executable, "-m", "grpokit.compare", "--worker", algo, spec]).returncode
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

def _worker(algo: str, spec_path: str) -> int:
    import torch

    from grpokit.baselines import parameter_counts

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
    eval_cpu = [0.0]
    log_eval = run.log_eval

    def timed_eval(step):  # evaluation's CPU time, to leave it out of the training's
        c0 = time.process_time()
        try:
            return log_eval(step)
        finally:
            eval_cpu[0] += time.process_time() - c0

    run.log_eval = timed_eval
    cpu0 = time.process_time()
    trainer.train()
    cpu_train = time.process_time() - cpu0 - eval_cpu[0]
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
        "cpu_train_seconds": cpu_train, "cpu_eval_seconds": eval_cpu[0],
        "total_steps": run.total_steps, "torch_threads": torch.get_num_threads(),
        "completions_per_step": run.prompts_per_step * cfg.num_generations,
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


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def _series(run_dir: str) -> dict[str, dict[int, float]]:
    from grpokit.tracking import _read_series

    return _read_series(os.path.join(run_dir, "metrics.jsonl"))


def summarize_run(algo: str, cfg: dict, result: dict) -> dict[str, Any]:
    """One run's curves against samples and training time, and its numbers for the table."""
    s = _series(cfg["output_dir"])
    steps = sorted(s.get("reward", {}))
    samples = {0: 0.0, **{k: s["samples"][k] for k in steps}}
    elapsed, total = {0: 0.0}, 0.0
    for k in steps:
        total += s.get("time/step", {}).get(k, 0.0)
        elapsed[k] = total
    acc = s.get("eval/accuracy", {})
    per_step = result["completions_per_step"]
    if algo == "dpo":
        signal = sum(2 * s.get("dpo/pairs", {}).get(k, 0.0) for k in steps)
    elif algo == "grpo":
        signal = sum(per_step * (1 - s.get("frac_reward_zero_std", {}).get(k, 0.0)) for k in steps)
    else:
        signal = float(per_step * len(steps))
    acc_steps = sorted(acc)
    reached = next((k for k in acc_steps if acc[k] >= TARGET_ACCURACY), None)
    return {
        "samples_to_target": samples.get(reached) if reached is not None else None,
        "seconds_to_target": elapsed.get(reached) if reached is not None else None,
        "steps": steps, "reward": [s["reward"][k] for k in steps], "samples": [samples[k] for k in steps],
        "train_seconds": [elapsed[k] for k in steps], "acc_steps": acc_steps, "acc": [acc[k] for k in acc_steps],
        "acc_samples": [samples.get(k, math.nan) for k in acc_steps],
        "acc_seconds": [elapsed.get(k, math.nan) for k in acc_steps],
        "acc_before": acc.get(0), "acc_after": acc[acc_steps[-1]] if acc else None,
        "acc_best": max(acc.values()) if acc else None, "samples_total": samples[steps[-1]] if steps else 0,
        "signal_completions": signal, "train_seconds_total": total,
        "reward_first": _mean([s["reward"][k] for k in steps[:5]]),
        "reward_last": _mean([s["reward"][k] for k in steps[-5:]]),
    }


def _mean(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else math.nan


def _mean_curve(curves: list[list[float]]) -> list[float]:
    """Pointwise mean of equally long curves (the runs of one algorithm share their steps)."""
    n = min(len(c) for c in curves) if curves else 0
    return [_mean([c[i] for c in curves]) for i in range(n)]


def aggregate(runs: list[dict[str, Any]], results: list[dict]) -> dict[str, Any]:
    """One algorithm over its seeds: mean curves, and mean (and per-seed) numbers."""
    agg = {key: _mean_curve([r[key] for r in runs]) for key in
           ("reward", "samples", "train_seconds", "acc", "acc_samples", "acc_seconds")}
    for key in ("acc_before", "acc_after", "acc_best", "samples_total", "signal_completions",
                "train_seconds_total", "reward_first", "reward_last"):
        agg[key] = _mean([r[key] for r in runs])
    for key in ("samples_to_target", "seconds_to_target"):  # None when a run never got there
        values = [r[key] for r in runs]
        agg[key] = _mean(values) if all(v is not None for v in values) else None
    agg["acc_after_each"] = [r["acc_after"] for r in runs]
    agg["acc_before_each"] = [r["acc_before"] for r in runs]
    for key in ("cpu_train_seconds", "wall_seconds", "state_mb"):
        agg[key] = _mean([x[key] for x in results])
    agg["peak_rss_gb"] = max(x["peak_rss_gb"] for x in results)
    agg["runs"] = runs
    return agg


def _moving(values: list[float], window: int = 5) -> list[float]:
    from grpokit.tracking import _moving_average

    return _moving_average(values, window)


def plot_curves(summary: dict, path: str) -> str:
    """Reward (top) and held-out accuracy (bottom) against samples (left) and training time (right):
    each seed faint, the mean over seeds bold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    many = any(len(agg["runs"]) > 1 for agg in summary.values())
    for algo, agg in summary.items():
        c = COLORS.get(algo)
        label = algo.upper() + (f" (mean of {len(agg['runs'])} seeds)" if len(agg["runs"]) > 1 else "")
        for col, (x_key, xa_key, xlabel) in enumerate((("samples", "acc_samples", "sampled completions"),
                                                       ("train_seconds", "acc_seconds", "training wall time (s)"))):
            for run in agg["runs"] if len(agg["runs"]) > 1 else []:
                axes[0, col].plot(run[x_key], _moving(run["reward"]), color=c, alpha=0.25, linewidth=1)
                axes[1, col].plot(run[xa_key], run["acc"], color=c, alpha=0.25, linewidth=1)
            axes[0, col].plot(agg[x_key], _moving(agg["reward"]), color=c, linewidth=2.2, label=label)
            axes[1, col].plot(agg[xa_key], agg["acc"], "o-", color=c, linewidth=2.2, label=label)
            axes[0, col].set_xlabel(xlabel)
            axes[1, col].set_xlabel(xlabel)
    for ax in axes[0]:
        ax.set_ylabel("training reward (5-step moving average)")
    for ax in axes[1]:
        ax.set_ylabel("held-out greedy accuracy")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0, 0].set_title("training reward against samples" + (" (faint: each seed)" if many else ""))
    axes[0, 1].set_title("training reward against training time (evaluation left out)")
    axes[1, 0].set_title("held-out greedy accuracy against samples")
    axes[1, 1].set_title("held-out greedy accuracy against training time")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def plot_costs(summary: dict, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    algos = list(summary)
    labels = [a.upper() for a in algos]
    colors = [COLORS.get(a, "C3") for a in algos]
    fig = Figure(figsize=(15, 3.6), layout="constrained")
    axes = fig.subplots(1, 5)
    bars = [
        ("training wall time (s, mean)", [summary[a]["train_seconds_total"] for a in algos]),
        ("training CPU time (s, mean)", [summary[a]["cpu_train_seconds"] for a in algos]),
        ("peak RSS of a run's process (GB)", [summary[a]["peak_rss_gb"] for a in algos]),
        ("weights + grads + AdamW state (MB)", [summary[a]["state_mb"] for a in algos]),
        ("completions that carried a gradient", [summary[a]["signal_completions"] for a in algos]),
    ]
    for ax, (title, values) in zip(axes, bars):
        ax.bar(labels, values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:,.3g}" if v < 1000 else f"{v:,.0f}", ha="center", va="bottom", fontsize="small")
        ax.set_title(title, fontsize="medium")
        ax.grid(True, axis="y", alpha=0.3)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def _machine(options) -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _model_description(cfg: dict) -> str:
    path = cfg.get("model_name_or_path")
    if path:
        return f"`{path}`"
    try:
        from grpokit.models import starter_model_path

        import hashlib

        weights = os.path.join(starter_model_path(), "model.safetensors")
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:12]
        return f"the shipped starter model (model.safetensors sha256 {digest}...)"
    except (OSError, FileNotFoundError):
        return "the shipped starter model"


def write_report(configs: dict, results: dict, options: dict, machine: dict, argv: list[str]) -> str:
    report_dir = options["report_dir"]
    os.makedirs(report_dir, exist_ok=True)
    summary = {}
    for algo in options["algos"]:
        keys = [(algo, seed) for seed in options["seeds"]]
        summary[algo] = aggregate([summarize_run(algo, configs[k], results[k]) for k in keys],
                                  [results[k] for k in keys])
    plot_curves(summary, os.path.join(report_dir, "curves.png"))
    plot_costs(summary, os.path.join(report_dir, "cost.png"))
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump({"machine": machine, "options": options,
                   "results": {f"{a}/seed{s}": r for (a, s), r in results.items()},
                   "summary": {a: {k: v for k, v in agg.items() if not isinstance(v, list) or k.endswith("_each")}
                               for a, agg in summary.items()}}, f, indent=1)
    first = configs[(options["algos"][0], options["seeds"][0])]
    by_algo = {a: configs[(a, options["seeds"][0])] for a in options["algos"]}
    any_result = results[(options["algos"][0], options["seeds"][0])]
    per_step = first["per_device_train_batch_size"] * first["gradient_accumulation_steps"]
    seeds = options["seeds"]
    command = "grpokit compare" + "".join(" " + shlex.quote(a) for a in argv)
    lines = [
        "# GRPO vs PPO vs DPO on the same task and sample budget",
        "",
        f"Reproduce with `{command}` (this page and its figures are written by it; "
        f"{machine['total_minutes']:.1f} minutes on this machine). What the figures say is discussed in "
        f"[docs/compare.md]({os.path.relpath('docs/compare.md', report_dir)}).",
        "",
        "## Budget and settings",
        "",
        f"- task: `{first.get('task')}` (built-in), {first.get('task_num_eval')} held-out prompts graded by greedy "
        "decoding; reward: the task's reward functions (exact answer 1.0, integer-only format 0.1)",
        f"- model: {_model_description(first)}; full fine-tune of {any_result['params']['params/policy_total']:,} "
        "parameters",
        f"- every algorithm and seed: batches of {per_step} sampled completions "
        f"({per_step // first['num_generations']} prompts x {first['num_generations']}), "
        + ", ".join(f"{a.upper()} {agg['samples_total']:,.0f}" for a, agg in summary.items())
        + f" completions in all, at temperature {first['temperature']}, at most "
        f"{first['max_completion_length']} tokens; AdamW lr {first['learning_rate']} ({first['lr_scheduler_type']}); "
        f"held-out accuracy every {first['eval_steps']} steps; "
        + (f"seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}")
        + " (the seed sets data order, sampling and the held-out split; every run starts from the same model)",
        "- GRPO: GRPOConfig defaults (loss_type dapo, epsilon 0.2, group-scaled advantages, beta 0: no reference, "
        "one update per batch)" + "".join(f", {k}={v}" for k, v in options["overrides"].get("grpo", {}).items()),
        "- PPO: " + ", ".join(f"{k}={v}" for k, v in by_algo.get("ppo", {}).items()
                              if k in ALGO_DEFAULTS["ppo"] or k in options["overrides"].get("ppo", {}))
        + " (TRL's defaults); critic = Linear(hidden, 1) value head on the policy's last hidden state",
        "- DPO: online, each group's best vs worst completion (groups without a reward spread give no pair); "
        + ", ".join(f"{k}={v}" for k, v in by_algo.get("dpo", {}).items()
                    if k in ALGO_DEFAULTS["dpo"] or k in options["overrides"].get("dpo", {})),
        f"- machine: {machine['platform']}, {machine['cpus']} CPU cores, torch {machine['torch']} "
        f"({any_result['torch_threads']} thread(s) per run), load average {machine['load_average_at_start']:.1f} "
        "at start (a machine shared with other jobs: wall times carry that noise), "
        + ("each run in its own process" if machine["isolated"] else
           "all runs in one process (peak RSS is then the largest so far, not each run's own)")
        + f", {machine['date']}" + (f", GPU {machine['cuda']}" if machine["cuda"] else ""),
        "",
        "## Results",
        "",
        (f"Means over {len(seeds)} seeds; each seed's final accuracy in square brackets." if len(seeds) > 1 else
         f"One run per algorithm (seed {seeds[0]}); `grpokit compare seeds=[42,43,44]` gives the spread over "
         "seeds (docs/compare.md shows it)."),
        "",
        "| | held-out accuracy: start -> end" + (" [each seed]" if len(seeds) > 1 else "") + " (best) "
        f"| to {TARGET_ACCURACY:.0%} held-out: samples (training time) | reward: first 5 -> last 5 steps "
        "| sampled completions | completions with a gradient | optimizer steps | training time (CPU time) "
        "| total time | peak RSS | weights+grads+AdamW | trained params (policy + extra) | reference params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, agg in summary.items():
        r = results[(algo, seeds[0])]
        p = r["params"]
        each = f" [{', '.join(_pct(x) for x in agg['acc_after_each'])}]" if len(seeds) > 1 else ""
        target = (f"{agg['samples_to_target']:,.0f} ({agg['seconds_to_target']:.0f} s)"
                  if agg["samples_to_target"] is not None else "not reached" + (" by every seed" if len(seeds) > 1 else ""))
        lines.append(
            f"| {algo.upper()} | {_pct(agg['acc_before'])} -> {_pct(agg['acc_after'])}{each} "
            f"({_pct(agg['acc_best'])}) | {target} | {agg['reward_first']:.3f} -> {agg['reward_last']:.3f} "
            f"| {agg['samples_total']:,.0f} | {agg['signal_completions']:,.0f} "
            f"| {r['optimizer_steps']} "
            f"| {agg['train_seconds_total']:.0f} s ({agg['cpu_train_seconds']:.0f} s) | {agg['wall_seconds']:.0f} s "
            f"| {agg['peak_rss_gb'] * 1024:.0f} MB | {agg['state_mb']:.1f} MB "
            f"| {p['params/policy_trainable']:,} + {p['params/extra_trainable']:,} | {p['params/reference']:,} |")
    lines += [
        "",
        "\"best\": the best evaluation of the run (mean over seeds). Training time sums the steps' wall time "
        "(sampling, rewards, forward/backward, optimizer) and leaves out evaluation; in brackets the process's CPU "
        "time over the same work, which other jobs on a shared machine disturb far less than wall time; total time "
        "is the whole process (loading, evaluations, saving). \"Completions with a gradient\": GRPO's samples in "
        "groups whose rewards differ (an all-equal group has advantage 0), DPO's two per usable group, all of "
        "PPO's (its value baseline makes every advantage non-zero).",
        "",
        "![reward and held-out accuracy against samples and training time](curves.png)",
        "",
        "![cost: training time, memory, data use](cost.png)",
        "",
        "<details><summary>Every setting of each run (seed " + str(seeds[0]) + "; the others differ only in seed "
        "and output_dir)</summary>",
        "",
    ]
    for algo, cfg in by_algo.items():
        lines += [f"**{algo.upper()}**", "", "```json", json.dumps(cfg, indent=1, default=str), "```", ""]
    lines += ["</details>", ""]
    path = os.path.join(report_dir, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2], sys.argv[3]))
    sys.exit(run_compare(sys.argv[1:]))
