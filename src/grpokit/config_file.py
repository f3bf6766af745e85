"""The command line's configuration: an optional YAML file, then `key=value` overrides, over the
built-in demo's defaults when nothing names a model, dataset or task."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

# `grpokit train` with nothing said about model, data or task runs the built-in demo: the arithmetic
# task on the shipped starter model, about two minutes on a 2-core CPU.
DEMO_DEFAULTS: dict[str, Any] = {
    "task": "arithmetic",
    "output_dir": "runs/demo",
    "learning_rate": 3e-4,
    "per_device_train_batch_size": 64,
    "gradient_accumulation_steps": 2,
    "num_generations": 8,
    "max_completion_length": 8,
    "max_steps": 300,
    "temperature": 1.0,
    "lr_scheduler_type": "constant",
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "eval_on_start": True,
    "save_steps": 100,
    "use_cpu": True,
    "gradient_checkpointing": False,   # a 0.27M model: memory is no concern, recomputing costs time
    "per_device_eval_batch_size": 200,  # the held-out split in one generation call
}


_TOOL_TASK_RUN: dict[str, Any] = {
    "learning_rate": 3e-4, "per_device_train_batch_size": 64, "num_generations": 8, "max_steps": 60,
    "temperature": 1.0, "lr_scheduler_type": "constant", "logging_steps": 5, "eval_strategy": "steps",
    "eval_steps": 20, "eval_on_start": True, "save_steps": 60, "use_cpu": True, "gradient_checkpointing": False,
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    # the tool task and the environment task on their starter models: a minute or two on a 2-core CPU
    # (docs/multiturn.md)
    "multiply": {**_TOOL_TASK_RUN, "output_dir": "runs/multiply", "max_completion_length": 96,
                 "per_device_eval_batch_size": 200, "task_num_eval": 200},
    "guess": {**_TOOL_TASK_RUN, "output_dir": "runs/guess", "max_completion_length": 320,
              "per_device_eval_batch_size": 70, "task_num_eval": 70},
    # the vision task on its starter vision-language model (docs/vision.md)
    # (held-out greedy accuracy 52% -> 97% in 300 steps, under a minute on a 2-core CPU)
    "colors": {**_TOOL_TASK_RUN, "output_dir": "runs/colors", "max_completion_length": 8, "learning_rate": 1e-3,
               "per_device_train_batch_size": 128, "max_steps": 300, "logging_steps": 25, "eval_steps": 50,
               "save_steps": 300, "per_device_eval_batch_size": 200, "task_num_eval": 200},
}
"""The command line's defaults for a built-in task run on its starter model (no model named)."""


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['lr=1e-5', '--beta', '0.04', '--use_peft'] -> {'lr': 1e-5, 'beta': 0.04, 'use_peft': True};
    values are read as YAML (numbers, booleans, lists, null); `--key a b` (TRL's CLI) is [a, b]."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key = tok[2:]
            values = []
            if "=" in key:
                key, val = key.split("=", 1)
                values = [val]
            else:  # TRL's CLI: `--reward_funcs a b` is a list
                while i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and not _KEY_EQ.match(tokens[i + 1]):
                    values.append(tokens[i + 1])
                    i += 1
            if len(values) > 1:
                out[key.replace("-", "_")] = [_yaml_value(v, key) for v in values]
                i += 1
                continue
            val = values[0] if values else "true"
        elif "=" in tok:
            key, val = tok.split("=", 1)
        else:
            raise ValueError(f"cannot read {tok!r}: give options as key=value or --key value.")
        out[key.replace("-", "_")] = _yaml_value(val, key)
        i += 1
    return out


_KEY_EQ = re.compile(r"^[A-Za-z_][\w-]*=")


def _yaml_value(text: str, key: str = "value") -> Any:
    """YAML scalar, except that '1e-5' (a string to YAML 1.1) is read as the number it means."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{key}={text!r} is not a valid YAML value ({_yaml_problem(e)}); quote it, "
                         f"e.g. {key}='\"...\"'") from None
    if isinstance(value, str):
        try:
            return float(value) if any(ch in value.lower() for ch in ".e") else int(value)
        except ValueError:
            return value
    return value


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found (give a YAML file, or only key=value options).")
    with open(path) as f:
        try:
            cfg = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(e)}.") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a mapping of config fields (field: value per line).")
    return cfg


def load_config_dict(args: list[str]) -> dict[str, Any]:
    """Optional YAML file first (a leading path, or TRL's `--config path`), then overrides; TRL's
    script arguments (`trl grpo ...`) become grpokit's fields (take_trl_script_arguments)."""
    cfg: dict[str, Any] = {}
    if args and not args[0].startswith("-") and "=" not in args[0]:
        path, args = args[0], args[1:]
        cfg = _read_yaml(path)
    overrides = parse_overrides(args)
    if "config" in overrides:
        cfg = {**cfg, **_read_yaml(str(overrides.pop("config")))}
    cfg.update(overrides)
    return take_trl_script_arguments(cfg)


# `trl grpo` arguments that are not GRPOConfig fields (its ScriptArguments and ModelConfig), and
# where each goes in grpokit: model loading options into model_init_kwargs
_MODEL_INIT_ARGS = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                    "model_revision": "revision"}


def take_trl_script_arguments(cfg: dict[str, Any]) -> dict[str, Any]:
    """`--reward_model_name_or_path m` comes first in reward_funcs (as TRL's script puts it);
    `--dtype`, `--attn_implementation`, `--model_revision` go to model_init_kwargs."""
    cfg = dict(cfg)
    model = cfg.pop("reward_model_name_or_path", None)
    if model:
        funcs = cfg.get("reward_funcs") or []
        cfg["reward_funcs"] = [model, *([funcs] if isinstance(funcs, str) else funcs)]
    init = dict(cfg.get("model_init_kwargs") or {})
    for name, target in _MODEL_INIT_ARGS.items():
        if name in cfg:
            value = cfg.pop(name)
            if value is not None and value != "auto" or target != "dtype":
                init[target] = value
    if init:
        cfg["model_init_kwargs"] = init
    return cfg


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def with_demo_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """The command line's defaults: the demo when no model, dataset or task is named; the
    arithmetic task when a model is named without data (the Python API asks for a dataset)."""
    if cfg.get("task") in TASK_DEFAULTS and not cfg.get("model_name_or_path"):
        return {**TASK_DEFAULTS[cfg["task"]], **cfg}
    if any(cfg.get(k) for k in ("dataset_name", "task")):
        return cfg
    if cfg.get("model_name_or_path"):
        return {"task": "arithmetic", **cfg}
    return {**DEMO_DEFAULTS, **cfg}
