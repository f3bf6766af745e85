"""GRPO on images: grpokit's GRPOTrainer vs TRL's (its vision-language path), side by side.

    .venv/bin/python benchmarks/vision_step.py            # 3 repeats (seeds 0-2) of 120 measured steps each
    .venv/bin/python benchmarks/vision_step.py --quick    # 1 repeat of 15 steps

TRL runs in benchmarks/.venv-trl (see benchmarks/grpo_step.py for its setup). Each framework runs
in its own subprocess (alternating which goes first), on the same model, data and settings:

- the built-in `colors` task (56-px drawn pictures, "What colour is the shape?", one colour word)
  and its shipped starter model (src/grpokit/assets/starter-colors: a ~0.26M-parameter
  Qwen2-VL-shaped model, 4 image tokens a picture) with its processor, passed to both trainers as
  `processing_class` (built by grpokit.data.vision.load_processor: transformers needs torchvision
  for the Qwen2-VL processor's video part, which neither run uses); fp32 on CPU, one thread;
- G = 8, 16 prompts per step (128 completions), max_completion_length 8, temperature 1, loss_type
  dapo, beta 0, lr 1e-3 constant, AdamW, full fine-tuning (vision tower included, as TRL does by
  default), gradient checkpointing off, the dataset in its own order; repeat r samples with seed r
  (both frameworks), so the repeats are three learning runs each.

Reported: seconds per step (median of the measured steps, after `--warmup`), the ratio, the peak
resident memory of each worker, and learning at an equal number of samples: the training reward
per step and the held-out greedy accuracy before and after (200 pictures of the eval split, the
same check for both final models: grpokit's evaluator).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _workers import alternate, command_line, train_timed  # noqa: E402


def _held_out_accuracy(model, processor, task) -> float:
    from grpokit.evaluation import Evaluator
    from grpokit.rollout import HFEngine

    evaluator = Evaluator.build(task.eval_dataset, processor.tokenizer, task=task, processor=processor)
    evaluator.max_tokens = 8
    return evaluator.greedy(HFEngine(model, processor.tokenizer))["eval/accuracy"]


def worker(framework: str, spec: dict) -> dict:
    import torch

    from grpokit.data import get_task
    from grpokit.data.vision import load_processor
    from grpokit.data.vision_tasks import color_reward
    from grpokit.models import load_model, starter_model_path

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    path = starter_model_path("colors")
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    processor = load_processor(path)
    task = get_task("colors", seed=42, num_eval=spec["eval_n"])
    per_step = spec["prompts"]
    total = spec["warmup"] + spec["steps"]
    ds = task.train_dataset.select(range(total * per_step))
    record: list[dict] = []

    def colour(prompts, completions, answer, **kwargs):
        rewards = color_reward(prompts, completions, answer=answer)
        empty = sum(not c[0]["content"].strip() for c in completions) / len(completions)
        record.append({"reward": sum(rewards) / len(rewards), "empty": empty})
        return rewards

    acc_before = _held_out_accuracy(model, processor, task)
    trainer, seconds = train_timed(framework, model, colour, ds, processor, prompts=per_step,
                                   max_completion_length=8, learning_rate=spec["lr"], max_steps=total,
                                   seed=spec["seed"], prefix="vl_bench")
    acc_after = _held_out_accuracy(trainer.model, processor, task)
    import importlib.metadata as md

    return {"framework": framework, "seconds": seconds, "record": record, "acc_before": acc_before,
            "acc_after": acc_after, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "version": md.version("trl" if framework == "trl" else "grpokit")}


def main():
    args = command_line(__doc__, worker)
    if args is None:  # this process was a worker
        return
    spec = {"threads": args.threads, "prompts": 16, "warmup": 3, "steps": args.steps or (15 if args.quick else 120),
            "lr": 1e-3, "eval_n": 200}
    repeats = args.repeats or (1 if args.quick else 3)
    # repeat r samples with seed r, in both frameworks
    results = alternate(__file__, repeats, lambda r: {**spec, "seed": r}, args.baseline_src)
    print(f"\nvision-language GRPO, task colors (starter-colors), G=8 x {spec['prompts']} prompts, "
          f"{spec['steps']} measured steps after {spec['warmup']}, {args.threads} thread(s), {repeats} repeat(s); "
          + (f"grpokit {results['grpokit'][0]['version']}, TRL {results['trl'][0]['version']}" if "trl" in results
             else f"against the grpokit of {args.baseline_src}"))
    med = {}
    for fw, runs in results.items():
        secs = [s for run in runs for s in run["seconds"][spec["warmup"]:]]
        med[fw] = statistics.median(secs)
        first = [statistics.mean(x["reward"] for x in run["record"][:5]) for run in runs]
        last = [statistics.mean(x["reward"] for x in run["record"][-5:]) for run in runs]
        empty = [statistics.mean(x["empty"] for x in run["record"][-5:]) for run in runs]
        per_repeat = ", ".join(f"{r['acc_after']:.1%}" for r in runs)
        print(f"  {fw:8s} {med[fw]:6.3f} s/step   peak RSS {max(r['peak_rss_mb'] for r in runs):6.0f} MB   "
              f"train reward first 5 steps {statistics.mean(first):.3f} -> last 5 {statistics.mean(last):.3f} "
              f"(empty answers in the last 5: {statistics.mean(empty):.0%}); held-out greedy accuracy "
              f"{statistics.mean(r['acc_before'] for r in runs):.1%} -> {statistics.mean(r['acc_after'] for r in runs):.1%} "
              f"(per repeat: {per_repeat})")
    other = "trl" if "trl" in med else "baseline"
    print(f"  grpokit / {'TRL' if other == 'trl' else 'baseline'} steps per second: {med[other] / med['grpokit']:.2f}x")


if __name__ == "__main__":
    main()
