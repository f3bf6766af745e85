"""Multi-turn GRPO with a tool: grpokit's GRPOTrainer vs TRL's (its `tools=` path), side by side.

    .venv/bin/python benchmarks/multiturn.py            # 2 repeats of 24 steps per framework
    .venv/bin/python benchmarks/multiturn.py --quick    # 1 repeat of 10 steps

TRL runs in benchmarks/.venv-trl (see benchmarks/grpo_step.py for its setup). Each framework runs
in its own subprocess (alternating which goes first), on the same model, data and settings:

- the built-in `multiply` task ("What is 347*86?", a `multiply(a, b)` tool) and its shipped
  starter model (src/grpokit/assets/starter-multiply: ~0.27M parameters, character tokenizer with
  Qwen's chat and tool-call format), fp32 on CPU, one thread;
- G = 8, 8 prompts per step (64 conversations), max_completion_length 96 (model and tool tokens),
  temperature 1, loss_type dapo, beta 0, lr 3e-4 constant, AdamW, gradient checkpointing off (as in
  benchmarks/grpo_step.py: a 0.27M model needs no memory saving), the dataset in its own order;
- the conversation: the model's turn, the tool's result, the model's answer (TRL: generate all,
  run the tools, generate again for the samples that called one, from the whole re-encoded
  conversation; grpokit: each sample's KV cache is kept and only the result tokens are prefilled).

Reported: seconds per step (median of the measured steps, after `--warmup`), the ratio, and
learning at an equal number of samples: the training reward per step (exact product), the
fraction of conversations that called the tool, and the held-out greedy accuracy with tools
before and after (the same check for both final models: grpokit's multi-turn evaluator).
"""

from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _workers import alternate, command_line, train_timed  # noqa: E402


def _accuracy_with_tools(model, tok, task, n: int) -> float:
    from grpokit.envs import MultiTurn
    from grpokit.evaluation import Evaluator
    from grpokit.rollout import HFEngine

    evaluator = Evaluator.build(task.eval_dataset.select(range(n)), tok, task=task, max_prompt_length=None,
                                multiturn=MultiTurn(tools=task.tools, tokenizer=tok))
    evaluator.max_tokens = evaluator.without_tools.max_tokens = 96
    return evaluator.greedy(HFEngine(model, tok))["eval/accuracy"]


def worker(framework: str, spec: dict) -> dict:
    import torch

    from grpokit.data import get_task
    from grpokit.data.tool_tasks import multiply_reward, used_tool
    from grpokit.models import load_model, load_tokenizer, starter_model_path

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    path = starter_model_path("multiply")
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    tok = load_tokenizer(path)
    task = get_task("multiply", seed=42, num_eval=spec["eval_n"])
    per_step = spec["prompts"]
    total = spec["warmup"] + spec["steps"]
    ds = task.train_dataset.select(range(total * per_step))
    record: list[dict] = []

    def exact_product(prompts, completions, answer, **kwargs):
        rewards = multiply_reward(prompts, completions, answer=answer)
        record.append({"reward": sum(rewards) / len(rewards),
                       "tool_use": sum(map(used_tool, completions)) / len(completions)})
        return rewards

    acc_before = _accuracy_with_tools(model, tok, task, spec["eval_n"])
    draft = {"config": {"draft_tokens": spec["draft_tokens"]}} if spec.get("draft_tokens") else {}
    trainer, seconds = train_timed(framework, model, exact_product, ds, tok, prompts=per_step,
                                   max_completion_length=96, learning_rate=spec["lr"], max_steps=total,
                                   seed=0, prefix="mt_bench", tools=task.tools, **draft)
    acc_after = _accuracy_with_tools(trainer.model, tok, task, spec["eval_n"])
    import importlib.metadata as md

    return {"framework": framework, "seconds": seconds, "record": record, "acc_before": acc_before,
            "acc_after": acc_after, "version": md.version("trl" if framework == "trl" else "grpokit")}


def main():
    args = command_line(__doc__, worker)
    if args is None:  # this process was a worker
        return
    spec = {"threads": args.threads, "prompts": 8, "warmup": 2, "steps": args.steps or (10 if args.quick else 24),
            "lr": 3e-4, "eval_n": 100}
    repeats = args.repeats or (1 if args.quick else 2)
    results = alternate(__file__, repeats, lambda r: spec, args.baseline_src,
                        grpokit_only={"draft_tokens": args.draft_tokens} if args.draft_tokens else None)
    print(f"\nmulti-turn GRPO, task multiply (starter-multiply), G=8 x {spec['prompts']} prompts, "
          f"{spec['steps']} measured steps after {spec['warmup']}, {args.threads} thread(s), {repeats} repeat(s), "
          f"grpokit draft_tokens={args.draft_tokens}; "
          + (f"grpokit {results['grpokit'][0]['version']}, TRL {results['trl'][0]['version']}" if "trl" in results
             else f"against the grpokit of {args.baseline_src}"))
    med = {}
    for fw, runs in results.items():
        secs = [s for run in runs for s in run["seconds"][spec["warmup"]:]]
        med[fw] = statistics.median(secs)
        rewards = [statistics.mean(x["reward"] for x in run["record"][spec["warmup"]:]) for run in runs]
        first = [statistics.mean(x["reward"] for x in run["record"][:3]) for run in runs]
        last = [statistics.mean(x["reward"] for x in run["record"][-3:]) for run in runs]
        tools = [statistics.mean(x["tool_use"] for x in run["record"][-3:]) for run in runs]
        print(f"  {fw:8s} {med[fw]:6.3f} s/step   train reward first 3 steps {statistics.mean(first):.3f} -> last 3 "
              f"{statistics.mean(last):.3f} (mean {statistics.mean(rewards):.3f}); tool use in the last 3 steps "
              f"{statistics.mean(tools):.0%}; held-out greedy accuracy with tools "
              f"{statistics.mean(r['acc_before'] for r in runs):.1%} -> "
              f"{statistics.mean(r['acc_after'] for r in runs):.1%}")
    other = "trl" if "trl" in med else "baseline"
    print(f"  grpokit / {'TRL' if other == 'trl' else 'baseline'} steps per second: {med[other] / med['grpokit']:.2f}x")


if __name__ == "__main__":
    main()
