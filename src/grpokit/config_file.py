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


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """['lr=1e-5', '--beta', '0.04', '--use_peft'] -> {'lr': 1e-5, 'beta': 0.04, 'use_peft': True};
    values are read as YAML (numbers, booleans, lists, null)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            key = tok[2:]
            if "=" in key:
                key, val = key.split("=", 1)
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--") and not _KEY_EQ.match(tokens[i + 1]):
                val, i = tokens[i + 1], i + 1
            else:
                val = "true"
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


def load_config_dict(args: list[str]) -> dict[str, Any]:
    """Optional YAML file first, then overrides."""
    cfg: dict[str, Any] = {}
    if args and not args[0].startswith("-") and "=" not in args[0]:
        path, args = args[0], args[1:]
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} not found (give a YAML file, or only key=value options).")
        with open(path) as f:
            try:
                cfg = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path} is not valid YAML: {_yaml_problem(e)}.") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{path} must hold a mapping of config fields (field: value per line).")
    cfg.update(parse_overrides(args))
    return cfg


def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def with_demo_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """The command line's defaults: the demo when no model, dataset or task is named; the
    arithmetic task when a model is named without data (the Python API asks for a dataset)."""
    if any(cfg.get(k) for k in ("dataset_name", "task")):
        return cfg
    if cfg.get("model_name_or_path"):
        return {"task": "arithmetic", **cfg}
    return {**DEMO_DEFAULTS, **cfg}
