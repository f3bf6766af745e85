"""`grpokit train|eval|generate|sft|rewards test` — YAML config plus key=value (or --key value)
overrides; the command line wins over the file."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from grpokit.config_file import load_config_dict, with_demo_defaults

def cmd_train(argv: list[str]) -> int:
    """Also under `torchrun --nproc_per_node N -m grpokit train ...`: the trainer opens the process
    group from torchrun's environment; it is closed here after a run that ended well (after an
    error the process exits without waiting for the other ranks)."""
    from grpokit import distributed
    from grpokit.baselines import algo_classes

    raw = with_demo_defaults(load_config_dict(argv))
    config_cls, trainer_cls = algo_classes(raw.pop("algo", "grpo"))  # --algo grpo | ppo | dpo
    cfg = config_cls(**raw)
    trainer = trainer_cls(args=cfg)
    history = trainer.train()
    main_process = trainer.parts.rank == 0
    del trainer  # its DDP/FSDP2 wrappers hold the process group: free them before it is destroyed
    distributed.cleanup()
    if main_process:
        _print_before_after(cfg.output_dir)
        print(f"run folder: {cfg.output_dir}  (metrics.jsonl, completions.jsonl, plot.png, final/)")
    return 0 if history is not None else 1


def _print_before_after(run_dir: str) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    acc = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "eval/accuracy" in row:
                acc.append((row["step"], row["eval/accuracy"]))
    if len(acc) >= 2:
        (s0, a0), (s1, a1) = acc[0], acc[-1]
        print(f"held-out greedy accuracy: {a0:.1%} (step {s0}) -> {a1:.1%} (step {s1}), "
              f"{(a1 - a0) * 100:+.1f} points")


def _load_for_inference(cfg: dict[str, Any]):
    from grpokit import models

    path = cfg.pop("model_name_or_path", None) or cfg.pop("model", None) or models.starter_model_path()
    model = models.load_model(path, dtype="auto", device="cuda" if _cuda(cfg) else "cpu")
    return path, model, models.load_tokenizer(path)


def _cuda(cfg: dict[str, Any]) -> bool:
    import torch

    return torch.cuda.is_available() and not cfg.get("use_cpu", False)


def cmd_eval(argv: list[str]) -> int:
    """Greedy accuracy and pass@k of a checkpoint on a task or dataset."""
    from grpokit import data
    from grpokit.config import GRPOConfig
    from grpokit.evaluation import Evaluator
    from grpokit.rewards import RewardRunner, load_reward_funcs
    from grpokit.rollout import make_engine

    cfg = load_config_dict(argv)
    ks = tuple(cfg.pop("k", [1, 4, 8]) if isinstance(cfg.get("k", None), list) else [cfg.pop("k", 8)])
    n = int(cfg.pop("n", max(ks)))
    path, model, tok = _load_for_inference(cfg)
    conf = GRPOConfig(**{k: v for k, v in cfg.items() if k not in ("split",)})
    task, runner = None, None
    if conf.dataset_name:
        ds = data.load_dataset_spec(conf.dataset_name, split=cfg.get("split", conf.dataset_test_split or "test"),
                                    config_name=conf.dataset_config)
    else:
        task = data.get_task(conf.task or "arithmetic", seed=conf.seed, num_train=conf.task_num_train,
                             num_eval=conf.task_num_eval)
        ds = task.eval_dataset
    if task is None:
        if not conf.reward_funcs:
            raise SystemExit("grpokit eval: a dataset needs reward_funcs=[...] to decide what is correct.")
        runner = RewardRunner(load_reward_funcs(conf.reward_funcs, reward_kwargs=conf.reward_kwargs))
    ev = Evaluator.build(ds, tok, task=task, reward_runner=runner, config=conf)
    engine = make_engine("hf", model, tok)
    result = {"model": path, "prompts": len(ev.prompt_ids), **ev.greedy(engine)}
    result.update(ev.pass_at(engine, n=n, ks=ks, temperature=conf.temperature, seed=conf.seed))
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(argv: list[str]) -> int:
    """Sample completions from a checkpoint: grpokit generate model_name_or_path=... prompt='12+7=' n=4"""
    from grpokit.rollout import SamplingParams, make_engine

    cfg = load_config_dict(argv)
    prompts = cfg.pop("prompt", None)
    if prompts is None:
        raise SystemExit("grpokit generate: give prompt='...' (or a list).")
    prompts = [str(p) for p in prompts] if isinstance(prompts, list) else [str(prompts)]
    n = int(cfg.pop("n", 1))
    _, model, tok = _load_for_inference(cfg)
    params = SamplingParams(max_tokens=int(cfg.pop("max_tokens", 64)), temperature=float(cfg.pop("temperature", 1.0)),
                            top_p=float(cfg.pop("top_p", 1.0)), top_k=int(cfg.pop("top_k", 0)),
                            stop=list(cfg.pop("stop", [])), seed=int(cfg.pop("seed", 0)))
    if cfg:
        raise SystemExit(f"grpokit generate: unknown option(s): {', '.join(cfg)}")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for out in make_engine("hf", model, tok).generate(ids, n=n, params=params):
        print(f"[{out.prompt_index}] {prompts[out.prompt_index]!r} -> {out.text!r} ({out.finish_reason})")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from grpokit.sft import SFTConfig, run_sft

    metrics = run_sft(SFTConfig(**load_config_dict(argv)))
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_rewards(argv: list[str]) -> int:
    """`grpokit rewards test [config.yaml] [k=v]`: run the configured rewards on a few rows."""
    if not argv or argv[0] != "test":
        raise SystemExit("usage: grpokit rewards test [config.yaml] [key=value ...]")
    from grpokit import data
    from grpokit.config import GRPOConfig
    from grpokit.rewards import RewardRunner, describe_rewards, load_reward_funcs

    raw = load_config_dict(argv[1:])
    num = int(raw.pop("num_rows", 4))
    completions = raw.pop("completions", None)
    conf = GRPOConfig(**with_demo_defaults(raw))
    if conf.dataset_name:
        ds = data.load_dataset_spec(conf.dataset_name, split=conf.dataset_train_split, config_name=conf.dataset_config)
        funcs = conf.reward_funcs
        weights = conf.reward_weights
    else:
        task = data.get_task(conf.task or "arithmetic", seed=conf.seed, num_train=conf.task_num_train,
                             num_eval=conf.task_num_eval)
        ds, funcs = task.train_dataset, conf.reward_funcs or task.reward_funcs
        weights = conf.reward_weights if conf.reward_funcs else task.reward_weights
    runner = RewardRunner(load_reward_funcs(list(funcs), reward_kwargs=conf.reward_kwargs), weights=weights,
                          timeout=conf.reward_timeout, on_error=conf.reward_on_error)
    rows = [dict(ds[i]) for i in range(min(num, len(ds)))]
    runner.check_signature(columns=set(ds.column_names))
    if completions is None:  # sample them from the policy
        from grpokit import models
        from grpokit.rollout import SamplingParams, make_engine

        path = conf.model_name_or_path or models.starter_model_path()
        model, tok = models.load_model(path, device="cpu"), models.load_tokenizer(path)
        ids = data.validate_prompts(ds.select(range(len(rows))), tok, max_prompt_length=conf.max_prompt_length)
        outs = make_engine("hf", model, tok).generate(ids, n=1, params=SamplingParams(
            max_tokens=conf.max_completion_length, temperature=conf.temperature, stop=conf.stop, seed=conf.seed))
        completions = [o.text for o in outs]
    completions = list(completions)[:len(rows)]
    rows = rows[:len(completions)]
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    print(describe_rewards(runner, [r["prompt"] for r in rows], completions, cols))
    return 0


def cmd_compare(argv: list[str]) -> int:
    """GRPO, PPO and DPO on the same task and sample budget; writes reports/compare/ (docs/compare.md)."""
    from grpokit.compare.run import run_compare

    return run_compare(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "sft": cmd_sft, "rewards": cmd_rewards,
            "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="grpokit", description="GRPO training for language models.",
        epilog="grpokit train                      # the built-in demo (arithmetic, starter model, CPU)\n"
               "grpokit train cfg.yaml lr=1e-5     # YAML config, command line overrides\n"
               "grpokit train --help-config        # every config field\n"
               "grpokit train --algo ppo           # the PPO (or --algo dpo: DPO) baseline, same settings\n"
               "grpokit compare                    # GRPO vs PPO vs DPO, report in reports/compare/\n"
               "grpokit eval model_name_or_path=runs/demo/final\n"
               "grpokit generate prompt='12+7=' n=4\n"
               "grpokit sft configs/starter_sft.yaml\n"
               "grpokit rewards test cfg.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    ns = parser.parse_args(argv[:1])
    rest = argv[1:]
    if ns.command == "train" and "--help-config" in rest:
        from grpokit.config import GRPOConfig, field_help

        defaults = GRPOConfig().to_dict()
        for name, text in field_help().items():
            print(f"{name:36s} {defaults[name]!r:>14}  {text}")
        return 0
    try:
        return COMMANDS[ns.command](rest)
    except (ValueError, FileNotFoundError) as e:
        print(f"grpokit {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from grpokit.distributed import RankFailedError

        if not isinstance(e, RankFailedError):
            raise
        print(f"grpokit {ns.command}: error: {e}", file=sys.stderr)  # names the failing rank and its error
        return 1
