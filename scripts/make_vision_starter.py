"""Build the starter model of the `colors` vision task (src/grpokit/assets/starter-colors) from nothing.

    python scripts/make_vision_starter.py [key=value ...]      e.g. steps=50 output_dir=/tmp/starter-colors

A tiny Qwen2-VL-shaped model (grpokit.models.new_vision_model: a 4-layer language model of width 64,
a 2-layer vision tower of width 32, 3-D M-RoPE) with the chat tokenizer and Qwen2-VL's image
processor at 56 px (16 patches, 4 image tokens after the 2x2 merge), initialised with a fixed
seed, then fine-tuned (teacher forcing on the answer tokens, through grpokit's own training forward)
on the built-in `colors` task with a colour-blind teacher (reference_swap_rate=0.5: half of its
answers name the partner colour, red <-> yellow, blue <-> green): the model learns the answer's form
(one colour word, then the end of the turn) and which pair the colour is in, and is right about half
the time. GRPO (`grpokit train task=colors`) then teaches it to tell the pair apart.
Prints the held-out greedy accuracy, the fraction of answers that are a colour word, and the files.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {
    "output_dir": "src/grpokit/assets/starter-colors",
    "seed": 0,
    "hidden_size": 64,
    "layers": 4,
    "vision_hidden_size": 32,
    "vision_layers": 2,
    "steps": 300,
    "batch_size": 32,
    "learning_rate": 3e-3,
    "warmup": 15,
    "num_train": 2000,
    "num_eval": 200,
    "threads": 2,
    "reference_swap_rate": 0.5,
}


def held_out(model, processor, task) -> dict[str, float]:
    """Greedy accuracy on the task's eval split (one greedy rollout, graded by the task), the
    fraction of those answers that name one of the colours, and the accuracy sampled at T = 1
    (grpokit's evaluator)."""
    from grpokit.data.vision_tasks import COLORS, answered_color
    from grpokit.evaluation import Evaluator
    from grpokit.rollout import HFEngine
    from grpokit.rollout.sampling import SamplingParams

    evaluator = Evaluator.build(task.eval_dataset, processor.tokenizer, task=task, processor=processor)
    evaluator.max_tokens = task.max_completion_length
    engine = HFEngine(model, processor.tokenizer)
    outs = engine.generate(evaluator.prompt_ids, n=1, images=evaluator.vision,
                           params=SamplingParams(max_tokens=task.max_completion_length, temperature=0.0, seed=0))
    answers = [evaluator.rows[o.prompt_index]["answer"] for o in outs]
    accuracy = sum(task.is_correct(o.text, answer=a) for o, a in zip(outs, answers)) / len(outs)
    colour_word = sum(answered_color(o.text) in COLORS for o in outs) / len(outs)
    sampled = evaluator.pass_at(engine, n=4, ks=(1,), temperature=1.0, seed=0)
    return {"accuracy": accuracy, "sample_accuracy": sampled["eval/sample_accuracy"], "colour_word": colour_word}


def main(argv: list[str]) -> int:
    import yaml

    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs
    from grpokit.trajectory import Trajectories
    from grpokit.modeling.vision import ImageFeatures
    from grpokit.data import get_task
    from grpokit.data.vision import encode_rows
    from grpokit.models import new_vision_model, new_vision_processor

    cfg = dict(DEFAULTS)
    for item in argv:
        key, value = item.split("=", 1)
        if key not in cfg:
            raise SystemExit(f"unknown option {key!r}; options: {', '.join(cfg)}")
        cfg[key] = yaml.safe_load(value)
    os.chdir(ROOT)
    torch.set_num_threads(int(cfg["threads"]))
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()

    from grpokit.data.vision_tasks import COLORS

    processor = new_vision_processor("qwen2_vl", image_size=56)
    tok = processor.tokenizer
    tok.add_tokens(list(COLORS))  # one token per colour word: the answer is one decision, then the turn's end
    model = new_vision_model(processor, "qwen2_vl", hidden_size=cfg["hidden_size"], layers=cfg["layers"],
                             vision_hidden_size=cfg["vision_hidden_size"], vision_layers=cfg["vision_layers"],
                             seed=cfg["seed"])
    task = get_task("colors", seed=cfg["seed"], num_train=cfg["num_train"], num_eval=cfg["num_eval"],
                    reference_swap_rate=cfg["reference_swap_rate"])
    before = held_out(model, processor, task)
    prompt_ids, visions = encode_rows(task.train_dataset, processor, max_prompt_length=None, chat_template_kwargs=None)
    rows = [dict(r) for r in task.train_dataset.remove_columns(["image"])]
    answers = [tok(task.reference_completion(r), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
               for r in rows]

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.0)
    total, warm = cfg["steps"], cfg["warmup"]
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg["seed"])).tolist()
    model.train()
    for step in range(total):
        batch = [order[(step * cfg["batch_size"] + i) % len(order)] for i in range(cfg["batch_size"])]
        n = len(batch)
        traj = Trajectories(row_index=batch, prompts=[None] * n, completions=[None] * n,
                            prompt_ids=[prompt_ids[i] for i in batch], completion_ids=[answers[i] for i in batch],
                            sampling_logps=[[0.0] * len(answers[i]) for i in batch],
                            truncated=torch.zeros(n, dtype=torch.bool), images=[visions[i] for i in batch])
        (mb,) = make_micro_batches(traj, n, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False,
                                   image_features=ImageFeatures())
        logps, _ = completion_logprobs(model, mb, temperature=1.0)
        loss = -(logps * mb.completion_mask).sum() / mb.completion_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == total - 1:
            print(f"step {step:4d}  loss {float(loss.detach()):.4f}  lr {schedule.get_last_lr()[0]:.2e}", flush=True)
    model.eval()
    after = held_out(model, processor, task)

    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "starter_config.json").write_text(__import__("json").dumps(
        {**cfg, "task": "colors", "held_out_before": before, "held_out_after": after},
        indent=2) + "\n")
    elapsed = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    print(f"\nstarter model: {sum(p.numel() for p in model.parameters()):,} parameters in {out}")
    for name, size in sizes.items():
        print(f"  {name:32s} {size / 1024:8.1f} KiB")
    print(f"  total {sum(sizes.values()) / 2**20:.2f} MiB; wall time {elapsed:.0f}s")
    print(f"held-out (colors, seed {cfg['seed']}, {cfg['num_eval']} pictures): greedy accuracy "
          f"{before['accuracy']:.1%} -> {after['accuracy']:.1%} (chance 25%), sampled at T=1 "
          f"{before['sample_accuracy']:.1%} -> {after['sample_accuracy']:.1%}, colour-word answers "
          f"{before['colour_word']:.1%} -> {after['colour_word']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
