"""Running a benchmark's two frameworks side by side: each in its own subprocess (grpokit in this
interpreter, TRL in benchmarks/.venv-trl), alternating which goes first from repeat to repeat.
With `--baseline-src TREE` the other side is another grpokit tree (a `git worktree` of an earlier
commit) running its own copy of the benchmark's worker: a change measured before and after."""

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


def run_worker(script: str, framework: str, spec: dict, baseline_src: str | None = None) -> dict:
    """`python script --worker framework --spec JSON` in the framework's interpreter; its last
    stdout line (JSON) is the result. framework "baseline": grpokit's worker of the tree
    `baseline_src` (its own script, its own sources)."""
    python = TRL_PYTHON if framework == "trl" else sys.executable
    root = os.path.abspath(baseline_src) if framework == "baseline" and baseline_src else ROOT
    if framework == "baseline":
        script, framework = os.path.join(root, "benchmarks", os.path.basename(script)), "grpokit"
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.path.join(root, "src")}
    out = subprocess.run([python, script, "--worker", framework, "--spec", json.dumps(spec)], env=env,
                         capture_output=True, text=True, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"{framework} worker failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternate(script: str, repeats: int, spec_for: Callable[[int], dict],
              baseline_src: str | None = None, grpokit_only: dict | None = None) -> dict[str, list[dict]]:
    """`repeats` runs of both sides (repeat r with spec_for(r), plus `grpokit_only` on this tree's
    grpokit side), grpokit first in even repeats and the other first in odd ones; {side: [result per
    repeat]}. The other side is TRL, or the grpokit tree `baseline_src` ("baseline")."""
    other = "baseline" if baseline_src else "trl"
    if other == "trl" and not os.path.exists(TRL_PYTHON):
        sys.exit(f"TRL's venv is missing ({TRL_PYTHON}); see benchmarks/grpo_step.py for how to make it.")
    results: dict[str, list[dict]] = {"grpokit": [], other: []}
    for r in range(repeats):
        for fw in (("grpokit", other) if r % 2 == 0 else (other, "grpokit")):
            t0 = time.perf_counter()
            spec = dict(spec_for(r), **(grpokit_only or {})) if fw == "grpokit" else spec_for(r)
            results[fw].append(run_worker(script, fw, spec, baseline_src))
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
    ap.add_argument("--baseline-src", default=None,
                    help="compare with the grpokit of this tree (a git worktree of an earlier commit) instead of TRL")
    ap.add_argument("--draft-tokens", type=int, default=0,
                    help="this tree's grpokit with draft_tokens=N (n-gram drafts checked in the decode step)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, json.loads(args.spec))))
        return None
    return args


def train_timed(framework: str, model, reward, train_dataset, processing_class, *, prompts: int,
                max_completion_length: int, learning_rate: float, max_steps: int, seed: int, prefix: str,
                config: dict | None = None, **trainer_kwargs) -> tuple[object, list[float]]:
    """Train `model` with `framework`'s GRPOTrainer (grpokit's, or TRL's in its venv) under the
    benchmarks' shared settings: G = 8 x `prompts` a step, temperature 1 without top-k/top-p, dapo,
    beta 0, constant lr, fused AdamW, clipping at 1, no gradient checkpointing, the dataset in its
    own order, nothing logged or saved; `config`: more grpokit GRPOConfig fields. Returns the trainer
    and the seconds of each step."""
    from transformers import TrainerCallback

    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())

    import tempfile

    common = dict(per_device_train_batch_size=prompts * 8, gradient_accumulation_steps=1, num_generations=8,
                  max_completion_length=max_completion_length, temperature=1.0, top_p=1.0, top_k=0,
                  loss_type="dapo", beta=0.0, learning_rate=learning_rate, lr_scheduler_type="constant",
                  max_steps=max_steps, seed=seed, use_cpu=True, bf16=False, gradient_checkpointing=False,
                  optim="adamw_torch_fused", num_iterations=1, scale_rewards="group", epsilon=0.2, max_grad_norm=1.0,
                  weight_decay=0.0, logging_steps=10_000, save_strategy="no", disable_tqdm=True, log_completions=False,
                  output_dir=tempfile.mkdtemp(prefix=f"{prefix}_{framework}_"), shuffle_dataset=False,
                  report_to="none")
    if framework == "grpokit":
        from grpokit import GRPOConfig, GRPOTrainer

        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=GRPOConfig(**common, plot=False, **(config or {})),
                              train_dataset=train_dataset, processing_class=processing_class, callbacks=[Marks()],
                              **trainer_kwargs)
    else:
        import trl

        trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward],
                                  args=trl.GRPOConfig(**common, dataloader_num_workers=0), train_dataset=train_dataset,
                                  processing_class=processing_class, callbacks=[Marks()], **trainer_kwargs)
    start = time.perf_counter()
    trainer.train()
    return trainer, [b - a for a, b in zip([start] + marks[:-1], marks)]
