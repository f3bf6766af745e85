"""Rollout throughput: grpokit's HFEngine vs `model.generate`, same model, same sampling, one run.

    python benchmarks/rollout.py                    # CPU, float32, ~25M-parameter Qwen2-shaped model
    python benchmarks/rollout.py --device cuda      # on a GPU (bfloat16 by default there)

The model is random (built from a config, seed 0); EOS is made likely (probability ~1/--eos-every
per step, see benchmarks/_models.py) so completion lengths vary and some stop early, as in a
real rollout. Both systems sample the same distribution (temperature 1, no truncation unless
asked) with the same max_new_tokens; `generate` gets num_return_sequences=G on a left-padded
batch of the prompts. After a warm-up of each, runs are interleaved (engine, generate, engine,
...) and the median time of each is reported, with the engine's phase split.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import EOS, PAD, build_model, build_tokenizer, make_eos_likely, n_params  # noqa: E402

from grpokit.rollout import HFEngine, SamplingParams  # noqa: E402


def run_generate(model, prompts, g, params, device, pad=PAD, eos=EOS):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kw = dict(do_sample=params.temperature > 0, max_new_tokens=params.max_tokens,
              num_return_sequences=g, pad_token_id=pad, eos_token_id=eos, top_k=params.top_k or 0,
              top_p=params.top_p)
    if params.temperature > 0:
        kw["temperature"] = params.temperature
    if params.min_p:
        kw["min_p"] = params.min_p
    torch.manual_seed(params.seed or 0)
    out = model.generate(input_ids=ids, attention_mask=att, **kw)[:, width:].tolist()
    lengths = []
    for row in out:  # generated tokens up to and including the first EOS
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


CHAT_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how bees make honey, step by step.",
    "What is 17 + 25? Show your reasoning.",
    "Give three tips for learning a new language and explain each one.",
]


def smollm2(n_prompts: int):
    """SmolLM2-135M-Instruct (the smollm2 extra's GGUF file, float32) and n chat prompts' ids."""
    from grpokit.models import load_model, load_tokenizer

    model = load_model("smollm2-135m-instruct", device="cpu")
    tok = load_tokenizer("smollm2-135m-instruct")
    texts = [tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPTS[i % len(CHAT_PROMPTS)]}],
                                     add_generation_prompt=True, tokenize=False) for i in range(n_prompts)]
    return model, tok, [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]


def timed(fn, device):
    """(wall seconds, CPU seconds of this process, result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--arch", default="qwen2", choices=["qwen2", "llama", "gpt2"])
    ap.add_argument("--model", default="bench", choices=["bench", "smollm2"],
                    help="bench: the random 24.9M model; smollm2: SmolLM2-135M-Instruct (pip install "
                         "'grpokit[smollm2]'), chat prompts, its own EOS")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=200, help="mean prompt length (lengths vary +-10%%)")
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--eos-every", type=float, default=64.0, help="EOS probability per step is ~1/this")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--skip-generate", action="store_true", help="time the engine only")
    ap.add_argument("--ablate", action="store_true",
                    help="also time the engine without its CPU packed output projection")
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        model, tok, prompts = smollm2(args.prompts)
        model = model.to(device=device, dtype=dtype)
        pad, eos = tok.pad_token_id, tok.eos_token_id
    else:
        model = build_model("bench", arch=args.arch, seed=0, dtype=torch.float32)
        make_eos_likely(model, p=1.0 / args.eos_every)
        model = model.to(device=device, dtype=dtype)
        tok = build_tokenizer(model.config.vocab_size)
        pad, eos = PAD, EOS
        g = torch.Generator().manual_seed(0)
        lo, hi = int(args.prompt_len * 0.9), int(args.prompt_len * 1.1)
        prompts = [torch.randint(3, model.config.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(args.prompts)]
    engine = HFEngine(model, tok)
    plain_head = HFEngine(model, tok, cpu_packed_lm_head=False)

    if args.model == "smollm2":
        print(f"model: SmolLM2-135M-Instruct, {n_params(model) / 1e6:.1f}M params, {dtype}, device {device}, "
              f"torch threads {torch.get_num_threads()}; chat prompts, the model's own EOS")
    else:
        print(f"model: {args.arch}-shaped, {n_params(model) / 1e6:.1f}M params, {dtype}, device {device}, "
              f"torch threads {torch.get_num_threads()}")
        print(f"EOS made likely without training: shared embedding coordinate + larger EOS value on it "
              f"(P(EOS) ~ 1/{args.eos_every:g} per step)")
    print(f"workload: {args.prompts} prompts of {[len(p) for p in prompts]} tokens, G={args.G}, "
          f"max_tokens={args.max_tokens}, temperature=1.0, top_p={args.top_p}, top_k={args.top_k}")

    def params(seed):
        return SamplingParams(max_tokens=args.max_tokens, temperature=1.0, top_p=args.top_p,
                              top_k=args.top_k, seed=seed)

    def engine_run(seed, eng=engine):
        out = eng.generate(prompts, n=args.G, params=params(seed))
        return [len(c.token_ids) for c in out], dict(eng.stats)

    # warm-up (allocator, lazy imports, kernels) of both, short
    warm = SamplingParams(max_tokens=8, seed=0)
    engine.generate(prompts, n=args.G, params=warm)
    if args.ablate:
        plain_head.generate(prompts, n=args.G, params=warm)
    if not args.skip_generate:
        run_generate(model, prompts, args.G, warm, device, pad, eos)

    rows = {"engine": [], "generate": []}
    if args.ablate:
        rows["engine, F.linear head"] = []
    for rep in range(args.repeats):
        dt, cpu, (lengths, stats) = timed(lambda rep=rep: engine_run(rep + 1), device)
        rows["engine"].append((dt, lengths, stats, cpu))
        print(f"  run {rep}: engine   {dt:7.2f} s (cpu {cpu:7.2f} s)  mean length {statistics.mean(lengths):6.1f}  "
              f"prefill {stats['prefill_s']:.2f} s  decode {stats['decode_s']:.2f} s  steps {stats['steps']}")
        if args.ablate:  # same seed as the engine run: the same completions, another output projection
            dt, cpu, (lengths, stats) = timed(lambda rep=rep: engine_run(rep + 1, plain_head), device)
            rows["engine, F.linear head"].append((dt, lengths, stats, cpu))
            print(f"  run {rep}: engine, F.linear head {dt:7.2f} s (cpu {cpu:7.2f} s)")
        if not args.skip_generate:
            dt, cpu, lengths = timed(lambda rep=rep: run_generate(model, prompts, args.G, params(rep + 1), device, pad, eos),
                                     device)
            rows["generate"].append((dt, lengths, None, cpu))
            print(f"  run {rep}: generate {dt:7.2f} s (cpu {cpu:7.2f} s)  mean length {statistics.mean(lengths):6.1f}")

    n_completions = args.prompts * args.G
    summary = {}
    for name, runs in rows.items():
        if not runs:
            continue
        t = statistics.median(r[0] for r in runs)
        toks = statistics.median(sum(r[1]) / r[0] for r in runs)
        cpu = statistics.median(r[3] for r in runs)
        cpu_toks = statistics.median(sum(r[1]) / r[3] for r in runs)
        summary[name] = (t, n_completions / t, toks, cpu, cpu_toks)
        print(f"{name:9s} median {t:7.2f} s   {n_completions / t:7.2f} completions/s   {toks:8.1f} generated tokens/s"
              f"   (per CPU-second: {n_completions / cpu:6.2f} completions, {cpu_toks:7.1f} tokens)")
    st = [r[2] for r in rows["engine"]]
    pre = statistics.median(s["prefill_s"] for s in st)
    dec = statistics.median(s["decode_s"] for s in st)
    print(f"engine phase split (median): prefill {pre:.3f} s ({100 * pre / (pre + dec):.0f}%), "
          f"decode {dec:.3f} s ({100 * dec / (pre + dec):.0f}%)")
    if "generate" in summary:
        e, h = summary["engine"], summary["generate"]
        print(f"ratio engine / generate: {e[1] / h[1]:.2f}x completions/s, {e[2] / h[2]:.2f}x generated tokens/s"
              f"  (per CPU-second: {h[3] / e[3]:.2f}x completions, {e[4] / h[4]:.2f}x tokens)")
    if "engine, F.linear head" in summary:
        e, a = summary["engine"], summary["engine, F.linear head"]
        print(f"packed output projection: engine {a[0] / e[0]:.2f}x faster than with F.linear (same completions), "
              f"{a[3] / e[3]:.2f}x in CPU time")


if __name__ == "__main__":
    main()
