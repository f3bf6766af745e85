"""The report of `grpokit compare`: each run's curves and costs, the mean over seeds, two plots
(curves.png, cost.png) and README.md with the tables and every setting (see grpokit.compare.run)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import time
from typing import Any

COLORS = {"grpo": "C0", "ppo": "C1", "dpo": "C2"}
TARGET_ACCURACY = 0.9

def _series(run_dir: str) -> dict[str, dict[int, float]]:
    from grpokit.tracking import read_series

    return read_series(os.path.join(run_dir, "metrics.jsonl"))


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
    agg: dict[str, Any] = {key: _mean_curve([r[key] for r in runs]) for key in
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
    from grpokit.tracking import moving_average

    return moving_average(values, window)


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


def machine_info(options) -> dict:
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
    from grpokit.compare.settings import ALGO_DEFAULTS

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

