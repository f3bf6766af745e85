"""Build the starter model shipped in src/grpokit/assets/starter from nothing (fixed seeds).

    python scripts/make_starter_model.py [configs/starter_sft.yaml] [key=value ...]

Runs grpokit.sft.run_sft on the YAML config (a character tokenizer, a tiny Llama initialised from
its config, a two-stage SFT on the arithmetic task), prints the held-out greedy accuracy and pass@8
and the size of the files written.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import yaml

from grpokit.sft import SFTConfig, run_sft

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    config_path = Path(argv[0]).resolve() if argv and "=" not in argv[0] else ROOT / "configs" / "starter_sft.yaml"
    values = yaml.safe_load(config_path.read_text())
    for item in (a for a in argv if "=" in a):
        key, value = item.split("=", 1)
        values[key] = yaml.safe_load(value)
    os.chdir(ROOT)  # output_dir is relative to the repository root
    start = time.perf_counter()
    metrics = run_sft(SFTConfig.from_dict(values))
    elapsed = time.perf_counter() - start
    out = Path(values["output_dir"])
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"\nstarter model: {metrics['num_params']:,} parameters in {out}")
    for name, size in sizes.items():
        print(f"  {name:28s} {size / 1024:8.1f} KiB")
    print(f"  total {sum(sizes.values()) / 2**20:.2f} MiB; SFT wall time {elapsed:.0f}s")
    for prefix, label in (("stage1/", "after stage 1 (correct teacher)"), ("", "final (after the sloppy stage)")):
        if f"{prefix}eval_greedy_accuracy" in metrics:
            print(
                f"held-out {label}: greedy accuracy {metrics[prefix + 'eval_greedy_accuracy']:.1%}, "
                f"pass@8 {metrics[prefix + 'eval_pass@8']:.1%}, "
                f"sample accuracy {metrics[prefix + 'eval_sample_accuracy']:.1%}"
            )
    if values.get("task") in ("multiply", "guess"):
        report_tool_task(values["task"], out)
    return 0


def report_tool_task(task_name: str, path: Path, n: int = 200) -> None:
    """A tool task's starter: held-out greedy accuracy with the tools (whole conversations, grpokit's
    engine), pass@8 at temperature 1, and greedy accuracy with no tool offered."""
    import torch

    from grpokit.data import get_task
    from grpokit.envs import MultiTurn
    from grpokit.evaluation import Evaluator
    from grpokit.models import load_model, load_tokenizer
    from grpokit.rollout import HFEngine

    torch.set_num_threads(1)
    model = load_model(str(path), dtype=torch.float32, device=torch.device("cpu"))
    tok = load_tokenizer(str(path))
    task = get_task(task_name, seed=42, num_eval=n if task_name == "multiply" else 70)
    multiturn = MultiTurn(tools=task.tools, environment_factory=task.environment_factory, tokenizer=tok)
    evaluator = Evaluator.build(task.eval_dataset, tok, task=task, multiturn=multiturn)
    evaluator.max_tokens = task.max_completion_length
    if evaluator.without_tools is not None:
        evaluator.without_tools.max_tokens = task.max_completion_length
    engine = HFEngine(model, tok)
    greedy = evaluator.greedy(engine)
    sampled = evaluator.pass_at(engine, n=8, ks=(1, 8))
    without = (f"; greedy without tools {greedy['eval/accuracy_without_tools']:.1%}"
               if "eval/accuracy_without_tools" in greedy else "")
    print(f"held-out ({task_name}, seed 42, {len(evaluator.rows)} problems): greedy accuracy with tools "
          f"{greedy['eval/accuracy']:.1%} (mean length {greedy['eval/mean_length']:.1f} model tokens), "
          f"pass@8 {sampled['eval/pass@8']:.1%}, sample accuracy {sampled['eval/sample_accuracy']:.1%}{without}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
