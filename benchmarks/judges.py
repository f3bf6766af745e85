"""Judge cost: requests and seconds per GRPO step for the listwise judge, the pairwise judge in a
Swiss tournament and the pairwise judge over all pairs, at G = 4, 8, 16, side by side in one run
on the same judge, the same groups and the same machine.

    python benchmarks/judges.py                      # SmolLM2-135M-Instruct as a local judge (the smollm2 extra)
    python benchmarks/judges.py --judge openai --base-url http://127.0.0.1:8000/v1 --model <id>
    python benchmarks/judges.py --judge latency --latency-ms 300   # a server's round trip, simulated

A step judges `--prompts` groups (each prompt's G candidates). Every candidate is distinct (no
deduplication), the cache is off, each configuration runs once after one warm-up group. Printed per
configuration: requests per group, seconds per step, and the ratio of all-pairs' seconds to it;
and, as a check of what the judge is worth, its agreement across shown orders (listwise: mean
Kendall tau between an order and its reverse; pairwise: the two orders of each pair) and the
fraction of groups it failed (unreadable answers after the retries).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from grpokit.rewards.judges import FunctionBackend, JudgeReward, PairwiseJudgeReward  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?",
             "What gas do plants take in from the air?", "Which planet is closest to the sun?"]
ANSWERS = {
    0: ["Paris.", "The capital of France is Paris.", "Paris, on the Seine.", "It is Paris, of course.",
        "Lyon.", "Marseille is the capital.", "France's capital city is Paris.", "I think it might be Nice.",
        "Paris is the capital and largest city of France.", "Berlin.", "The answer is Paris!", "Not sure.",
        "paris", "Capital: Paris", "It's Rome.", "Toulouse, I believe."],
    1: ["Eight.", "A spider has eight legs.", "8", "Six legs.", "Spiders have 8 legs.", "Ten.", "Four pairs, so 8.",
        "I do not know.", "Eight legs, like all arachnids.", "Twelve.", "Two.", "Spiders: eight legs.",
        "It has 6.", "About eight.", "Eight, in four pairs.", "None."],
    2: ["Carbon dioxide.", "Plants take in CO2.", "Oxygen.", "They absorb carbon dioxide from the air.", "Nitrogen.",
        "CO2 for photosynthesis.", "Helium.", "Carbon dioxide (CO2).", "Water vapour.", "Methane.",
        "Plants breathe in carbon dioxide.", "Hydrogen.", "It is CO2.", "Argon.", "Carbon dioxide gas.", "Air."],
    3: ["Mercury.", "Mercury is closest to the sun.", "Venus.", "Earth.", "The planet Mercury.", "Mars.",
        "Mercury, at about 58 million km.", "Jupiter.", "It's Mercury.", "Pluto.", "Mercury!", "Saturn.",
        "Closest: Mercury", "Neptune.", "Mercury orbits nearest the sun.", "The moon."],
}


def make_backend(args):
    if args.judge == "latency":
        rng = random.Random(0)
        slots: dict = {}

        async def slow(messages):  # a server with `concurrency` slots; the answer itself is drawn at random
            loop = asyncio.get_running_loop()
            if loop not in slots:
                slots.clear()
                slots[loop] = asyncio.Semaphore(args.concurrency)
            async with slots[loop]:
                await asyncio.sleep(args.latency_ms / 1000)
            user = messages[-1]["content"]
            if "[A]" in user:
                return json.dumps({"winner": rng.choice("AB")})
            n = int(user.split("Rank all ")[1].split()[0])
            order = list(range(1, n + 1))
            rng.shuffle(order)
            return json.dumps({"ranking": order})

        return FunctionBackend(slow, name="latency"), (f"simulated server, {args.latency_ms:g} ms per request, "
                                               f"{args.concurrency} at once")
    if args.judge == "openai":
        from grpokit.rewards.judges import OpenAIBackend

        return (OpenAIBackend(args.model, base_url=args.base_url, max_concurrency=args.concurrency,
                              max_tokens=args.max_new_tokens),
                f"OpenAI-compatible server {args.base_url}, model {args.model}")
    from grpokit.rewards.judges import LocalBackend

    return (LocalBackend(args.model, device="cpu", max_new_tokens=args.max_new_tokens, batch_size=args.batch_size),
            f"local {args.model}, greedy, <= {args.max_new_tokens} new tokens, batches of {args.batch_size}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judge", choices=["local", "openai", "latency"], default="local")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--base-url", default=None)
    p.add_argument("--latency-ms", type=float, default=300.0)
    p.add_argument("--group-sizes", default="4,8,16")
    p.add_argument("--prompts", type=int, default=2, help="groups per step")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (openai, latency)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backend, what = make_backend(args)
    print(f"judge: {what}; {args.prompts} groups per step; cache off; every candidate distinct")
    common = dict(backend=backend, cache_size=0, max_retries=1, deadline_s=3600, min_agreement=None)
    configs = {"listwise (k=2)": JudgeReward(**common),
               "pairwise swiss": PairwiseJudgeReward(strategy="swiss", **common),
               "pairwise all-pairs": PairwiseJudgeReward(strategy="all_pairs", **common)}
    configs["pairwise swiss"].__name__ = configs["pairwise all-pairs"].__name__ = "pairwise_judge"
    warm = configs["listwise (k=2)"]
    asyncio.run(warm([QUESTIONS[0]] * 2, ANSWERS[0][:2]))
    results = []
    for g in [int(x) for x in args.group_sizes.split(",")]:
        row = {}
        for name, reward in configs.items():
            metrics: dict[str, list[float]] = {}
            log = lambda k, v: metrics.setdefault(k.split("/")[-1], []).append(v)  # noqa: E731

            async def step(reward=reward, log=log):
                return await asyncio.gather(*(reward([QUESTIONS[q]] * g, ANSWERS[q][:g], log_metric=log)
                                              for q in range(args.prompts)))

            t0 = time.perf_counter()
            asyncio.run(step())
            seconds = time.perf_counter() - t0
            agreement = [a for a in metrics.get("agreement", []) if a == a]
            row[name] = {"requests_per_group": statistics.mean(metrics["calls"]), "seconds_per_step": seconds,
                         "agreement": statistics.mean(agreement) if agreement else float("nan"),
                         "frac_failed": statistics.mean(metrics["frac_failed"])}
        base = row["pairwise all-pairs"]["seconds_per_step"]
        print(f"\nG = {g}")
        print(f"  {'':20s} {'requests/group':>14s} {'s/step':>8s} {'all-pairs / this':>16s} {'agreement':>9s} "
              f"{'failed':>6s}")
        for name, r in row.items():
            print(f"  {name:20s} {r['requests_per_group']:14.0f} {r['seconds_per_step']:8.2f} "
                  f"{base / r['seconds_per_step']:15.2f}x {r['agreement']:9.2f} {r['frac_failed']:6.2f}")
        results.append({"G": g, **row})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"judge": what, "prompts_per_step": args.prompts, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
