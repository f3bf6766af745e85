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

Options besides the config fields: `algos` (default [grpo, ppo, dpo]), `output_dir` (runs go to
output_dir/<algo>), `report_dir`, `torch_num_threads` (default 1: on a small CPU shared with other
jobs, two threads per process made these small models up to 20x slower), `isolate` (default true;
false runs the algorithms in this process, faster to start but peak memory is then the
largest so far, not each run's own: the report says so).
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
# held-out evaluation every 10 steps and no checkpoints.
_FROM_DEMO = ("task", "use_cpu", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
              "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "max_steps")
COMPARE_DEFAULTS: dict[str, Any] = {
    **{k: DEMO_DEFAULTS[k] for k in _FROM_DEMO if k in DEMO_DEFAULTS},
    "eval_strategy": "steps",
    "eval_steps": 10,
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

OPTIONS = {"algos": list(ALGOS), "output_dir": "runs/compare", "report_dir": "reports/compare",
           "torch_num_threads": 1, "isolate": True}
COLORS = {"grpo": "C0", "ppo": "C1", "dpo": "C2"}


def plan(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Split the command line / YAML into options and one full config dict per algorithm; every
    config is built (validated) here, before anything runs."""
    raw = dict(raw)
    options = {k: raw.pop(k, v) for k, v in OPTIONS.items()}
    per_algo = {a: raw.pop(a) or {} for a in ALGOS if a in raw}
    algos = options["algos"] if isinstance(options["algos"], list) else [options["algos"]]
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise ValueError(f"compare: algos={algos}: choose among {', '.join(ALGOS)}.")
    configs = {}
    for algo in algos:
        cfg = {**COMPARE_DEFAULTS, **raw, **ALGO_DEFAULTS[algo], **per_algo.get(algo, {}),
               "output_dir": os.path.join(options["output_dir"], algo), "run_name": algo}
        config_cls, _ = algo_classes(algo)
        config_cls(**cfg)  # errors now, naming the field, before the first run starts
        configs[algo] = cfg
    options["algos"] = algos
    return options, configs


def run_compare(argv: list[str]) -> int:
    options, configs = plan(load_config_dict(argv))
    started = time.time()
    machine = _machine(options)
    results = {}
    for algo, cfg in configs.items():
        out = cfg["output_dir"]
        if os.path.isdir(out):
            ours = any(os.path.exists(os.path.join(out, f)) for f in ("metrics.jsonl", "compare_config.json"))
            if not ours and os.listdir(out):
                raise ValueError(f"compare: {out} exists and is not a grpokit run folder; choose another output_dir.")
            shutil.rmtree(out)  # metrics.jsonl is appended to: a rerun starts from an empty folder
        os.makedirs(out, exist_ok=True)
        spec = os.path.join(out, "compare_config.json")
        with open(spec, "w") as f:
            json.dump({"config": cfg, "torch_num_threads": options["torch_num_threads"]}, f, indent=1)
        print(f"\n=== compare: {algo} -> {out}", flush=True)
        if options["isolate"]:
            code = subprocess.run([sys.executable, "-m", "grpokit.compare", "--worker", algo, spec]).returncode
        else:
            code = _worker(algo, spec)
        if code != 0:
            print(f"compare: the {algo} run failed (exit {code}); see the output above.", file=sys.stderr)
            return code
        with open(os.path.join(out, "compare_result.json")) as f:
            results[algo] = json.load(f)
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
    updates = {"grpo": getattr(cfg, "num_iterations", 1), "dpo": 1,
               "ppo": getattr(cfg, "num_ppo_epochs", 1) * getattr(cfg, "num_mini_batches", 1)}[algo]
    result = {
        "algo": algo, "params": params, "state_mb": _state_mb(run, extra),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_after_setup_gb": rss_ready,
        "peak_cuda_gb": torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else None,
        "wall_seconds": wall, "setup_seconds": built, "optimizer_steps_per_step": updates,
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


def summarize(configs: dict, results: dict) -> dict[str, dict[str, Any]]:
    """Per algorithm: the curves against samples and training time, and the table's numbers."""
    out = {}
    for algo, cfg in configs.items():
        s = _series(cfg["output_dir"])
        steps = sorted(s.get("reward", {}))
        samples = {0: 0.0, **{k: s["samples"][k] for k in steps}}
        elapsed, total = {0: 0.0}, 0.0
        for k in steps:
            total += s.get("time/step", {}).get(k, 0.0)
            elapsed[k] = total
        acc = s.get("eval/accuracy", {})
        per_step = results[algo]["completions_per_step"]
        if algo == "dpo":
            signal = sum(2 * s.get("dpo/pairs", {}).get(k, 0.0) for k in steps)
        elif algo == "grpo":
            signal = sum(per_step * (1 - s.get("frac_reward_zero_std", {}).get(k, 0.0)) for k in steps)
        else:
            signal = float(per_step * len(steps))
        out[algo] = {
            "steps": steps, "reward": [s["reward"][k] for k in steps], "samples": [samples[k] for k in steps],
            "train_seconds": [elapsed[k] for k in steps],
            "acc_steps": sorted(acc), "acc": [acc[k] for k in sorted(acc)],
            "acc_samples": [samples.get(k, math.nan) for k in sorted(acc)],
            "acc_seconds": [elapsed.get(k, math.nan) for k in sorted(acc)],
            "acc_before": acc.get(0), "acc_after": acc[max(acc)] if acc else None, "acc_best": max(acc.values()) if acc else None,
            "samples_total": samples[steps[-1]] if steps else 0, "signal_completions": signal,
            "train_seconds_total": total, "reward_first": _mean(s["reward"], steps[:5]),
            "reward_last": _mean(s["reward"], steps[-5:]),
        }
    return out


def _mean(values: dict, keys) -> float:
    keys = list(keys)
    return sum(values[k] for k in keys) / len(keys) if keys else math.nan


def _moving(values: list[float], window: int = 5) -> list[float]:
    from grpokit.tracking import _moving_average

    return _moving_average(values, window)


def plot_curves(summary: dict, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    for algo, s in summary.items():
        c = COLORS.get(algo, None)
        for col, (x_key, xa_key, label) in enumerate((("samples", "acc_samples", "sampled completions"),
                                                      ("train_seconds", "acc_seconds", "training wall time (s)"))):
            ax = axes[0, col]
            ax.plot(s[x_key], s["reward"], color=c, alpha=0.25, linewidth=1)
            ax.plot(s[x_key], _moving(s["reward"]), color=c, linewidth=2, label=f"{algo.upper()}")
            ax.set_xlabel(label)
            ax.set_ylabel("training reward (mean of the step's samples)")
            ax = axes[1, col]
            ax.plot(s[xa_key], s["acc"], "o-", color=c, label=algo.upper())
            ax.set_xlabel(label)
            ax.set_ylabel("held-out greedy accuracy")
            ax.set_ylim(-0.02, 1.02)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0, 0].set_title("reward against samples (faint: per step; bold: 5-step moving average)")
    axes[0, 1].set_title("reward against training time (excludes evaluation)")
    axes[1, 0].set_title("held-out accuracy against samples")
    axes[1, 1].set_title("held-out accuracy against training time")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, format="png")
    return path


def plot_costs(summary: dict, results: dict, path: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    algos = list(summary)
    labels = [a.upper() for a in algos]
    colors = [COLORS.get(a, "C3") for a in algos]
    fig = Figure(figsize=(15, 3.6), layout="constrained")
    axes = fig.subplots(1, 5)
    bars = [
        ("training wall time (s)", [summary[a]["train_seconds_total"] for a in algos]),
        ("training CPU time (s)", [results[a]["cpu_train_seconds"] for a in algos]),
        ("peak RSS of the process (GB)", [results[a]["peak_rss_gb"] for a in algos]),
        ("weights + grads + AdamW state (MB)", [results[a]["state_mb"] for a in algos]),
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
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_report(configs: dict, results: dict, options: dict, machine: dict, argv: list[str]) -> str:
    report_dir = options["report_dir"]
    os.makedirs(report_dir, exist_ok=True)
    summary = summarize(configs, results)
    plot_curves(summary, os.path.join(report_dir, "curves.png"))
    plot_costs(summary, results, os.path.join(report_dir, "cost.png"))
    with open(os.path.join(report_dir, "summary.json"), "w") as f:
        json.dump({"machine": machine, "results": results,
                   "summary": {a: {k: v for k, v in s.items() if not isinstance(v, list)} for a, s in summary.items()}},
                  f, indent=1)
    first = next(iter(configs.values()))
    command = "grpokit compare" + ("".join(" " + shlex.quote(a) for a in argv) if argv else "")
    model = first.get("model_name_or_path") or "the shipped starter model (grpokit.models.starter_model_path())"
    lines = [
        "# GRPO vs PPO vs DPO on the same task and sample budget",
        "",
        f"Reproduce with `{command}` (written by it; {machine['total_minutes']:.1f} minutes on this machine). "
        "What the figures say is discussed in [docs/compare.md](../../docs/compare.md).",
        "",
        "## Budget and settings",
        "",
        f"- task: `{first.get('task')}` (built-in; {first.get('task_num_eval')} held-out prompts, greedy decoding "
        "for accuracy), reward: the task's reward functions (exact answer 1.0 + integer-only format 0.1)",
        f"- model: {model}; full fine-tune; {results[next(iter(results))]['params']['params/policy_total']:,} parameters",
        f"- every algorithm: {first['max_steps']} steps x {first['per_device_train_batch_size'] * first['gradient_accumulation_steps']}"
        f" sampled completions ({first['per_device_train_batch_size'] * first['gradient_accumulation_steps'] // first['num_generations']}"
        f" prompts x {first['num_generations']}) = {first['max_steps'] * first['per_device_train_batch_size'] * first['gradient_accumulation_steps']:,}"
        f" completions, temperature {first['temperature']}, at most {first['max_completion_length']} tokens; "
        f"AdamW lr {first['learning_rate']} ({first['lr_scheduler_type']}), seed {first['seed']}; held-out accuracy "
        f"every {first['eval_steps']} steps",
        f"- GRPO: GRPOConfig defaults (loss_type dapo, epsilon 0.2, beta 0: no reference, one update per batch)",
        "- PPO: " + ", ".join(f"{k}={v}" for k, v in configs.get("ppo", {}).items() if k in ALGO_DEFAULTS["ppo"])
        + "; value head = Linear(hidden, 1) on the policy's last hidden state",
        "- DPO: online, each group's best vs worst completion (groups without a reward spread skipped); "
        + ", ".join(f"{k}={v}" for k, v in configs.get("dpo", {}).items() if k in ALGO_DEFAULTS["dpo"]),
        f"- machine: {machine['platform']}, {machine['cpus']} CPU cores, torch {machine['torch']} "
        f"({results[next(iter(results))]['torch_threads']} threads), load average {machine['load_average_at_start']:.1f} at start "
        "(shared machine: wall times carry that noise), "
        + ("each algorithm in its own process, " if machine["isolated"] else
           "all algorithms in one process (peak RSS is the largest so far, not each run's own), ")
        + 
        f"{machine['date']}" + (f", GPU {machine['cuda']}" if machine["cuda"] else ""),
        "",
        "## Results",
        "",
        "| | held-out accuracy: start -> end (best) | reward: first 5 -> last 5 steps | sampled completions "
        "| completions with a gradient | optimizer steps | training time (CPU time) | total time | peak RSS | weights+grads+AdamW "
        "| trained params (policy + extra) | reference params |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algo, s in summary.items():
        r = results[algo]
        p = r["params"]
        lines.append(
            f"| {algo.upper()} | {_pct(s['acc_before'])} -> {_pct(s['acc_after'])} ({_pct(s['acc_best'])}) "
            f"| {s['reward_first']:.3f} -> {s['reward_last']:.3f} | {s['samples_total']:,.0f} "
            f"| {s['signal_completions']:,.0f} | {r['total_steps'] * r['optimizer_steps_per_step']} "
            f"| {s['train_seconds_total']:.0f} s ({r['cpu_train_seconds']:.0f} s) | {r['wall_seconds']:.0f} s "
            f"| {r['peak_rss_gb'] * 1024:.0f} MB "
            f"| {r['state_mb']:.1f} MB | {p['params/policy_trainable']:,} + {p['params/extra_trainable']:,} "
            f"| {p['params/reference']:,} |")
    lines += [
        "",
        "Training time sums the steps' wall time (sampling, rewards, forward/backward, optimizer) and leaves out "
        "evaluation; in brackets the process's CPU time over the same work, which other jobs on a shared machine "
        "disturb far less than wall time; total time is the whole process (loading, evaluations, saving). "
        "\"Completions with a gradient\": GRPO's "
        "samples in groups whose rewards differ (an all-equal group has advantage 0), DPO's two per usable group, "
        "all of PPO's (its value baseline makes every advantage non-zero).",
        "",
        "![reward and held-out accuracy against samples and training time](curves.png)",
        "",
        "![cost: training time, memory, data use](cost.png)",
        "",
        "<details><summary>Every setting of each run</summary>",
        "",
    ]
    for algo, cfg in configs.items():
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
