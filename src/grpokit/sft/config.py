"""`SFTConfig`: the supervised warm-start's settings (grpokit.sft.trainer runs them)."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SFTConfig:
    """Configuration of one SFT run (TRL's names where TRL has the knob)."""

    # --- model ---
    model_name_or_path: str | None = None
    """Hub id or local path of the model to fine-tune; leave None to make a fresh one from model_config."""
    model_config: dict[str, Any] | None = None
    """Config of a freshly initialised model, e.g. {"model_type": "llama", "hidden_size": 128, ...}."""
    tokenizer: str | None = None
    """"char" (character-level tokenizer), a hub id or a path; None: the model's own tokenizer."""
    dtype: str = "auto"
    """"auto" (float32 on CPU, bf16 on CUDA), "float32", "bfloat16" (the weights' own dtype: no fp32 copy)."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", "cuda:1"."""

    # --- data ---
    task: str | None = None
    """A built-in task (see grpokit.data.TASKS); its train split with reference completions is the data."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Arguments of the task builder, e.g. {"seed": 0, "num_train": 5000, "max_operand": 99}."""
    dataset_name: str | None = None
    """Hub name or local file/dir of a prompt-completion dataset (columns "prompt" and "completion")."""
    dataset_config: str | None = None
    """Hub dataset config name (e.g. "main")."""
    dataset_train_split: str = "train"
    """Split of dataset_name to train on."""

    # --- optimisation ---
    output_dir: str = "runs/sft"
    """Where the model, tokenizer, metrics and this config are saved."""
    learning_rate: float = 2e-5
    """Peak AdamW learning rate."""
    lr_scheduler_type: str = "cosine"
    """"cosine", "linear" or "constant" (after warmup)."""
    warmup_ratio: float = 0.0
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    num_train_epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to take; > 0 overrides num_train_epochs."""
    per_device_train_batch_size: int = 8
    """Sequences per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_length: int | None = 1024
    """Prompt + completion tokens kept per sequence (truncated on the right); None keeps all."""
    completion_only_loss: bool = True
    """Train only on the completion tokens (the prompt is masked from the loss)."""
    seed: int = 42
    """Seed of the model initialisation, the data order and evaluation sampling."""
    logging_steps: int = 10
    """Print the mean loss every this many optimizer steps."""

    # --- evaluation (built-in tasks only) ---
    eval_pass_k: int = 8
    """Samples per eval prompt for pass@k at eval_temperature (0 disables sampling eval)."""
    eval_temperature: float = 1.0
    """Sampling temperature of the pass@k evaluation."""
    eval_num_prompts: int | None = None
    """Eval prompts to use (None: the whole eval split); 0 disables evaluation."""
    eval_steps: int = 0
    """Also evaluate every this many steps during training (0: only at the end)."""
    save: bool = True
    """Save model + tokenizer to output_dir at the end."""

    # --- stages ---
    next_stage: dict[str, Any] | None = None
    """Overrides of a further stage that continues from this stage's weights with a fresh optimizer
    and schedule, e.g. {"task_kwargs": {...}, "max_steps": 300, "learning_rate": 1e-3}; it may hold
    its own next_stage. Only the last stage saves."""

    def __post_init__(self):
        _coerce_fields(self)
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise ValueError("give exactly one of model_name_or_path (load a model) or model_config (make a fresh one)")
        if self.model_config is not None:
            if not isinstance(self.model_config, dict) or "model_type" not in self.model_config:
                raise ValueError("model_config must be a dict with a 'model_type' key, e.g. {'model_type': 'llama'}")
            if self.tokenizer is None:
                raise ValueError("a fresh model (model_config) needs a tokenizer: tokenizer='char' or a path/hub id")
        if (self.task is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of task (a built-in task) or dataset_name (a prompt-completion dataset)")
        if self.task is not None:
            from grpokit.data.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"task={self.task!r} is not a built-in task; choose one of {sorted(TASKS)}")
        if not isinstance(self.task_kwargs, dict):
            raise ValueError("task_kwargs must be a mapping, e.g. {seed: 0, num_train: 5000}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        if self.eval_pass_k < 0 or self.eval_temperature <= 0:
            raise ValueError("eval_pass_k must be >= 0 and eval_temperature > 0")
        if self.next_stage is not None:
            self.stage_config(self.next_stage)  # validate the later stages now, not after training

    def stage_config(self, overrides: dict[str, Any]) -> SFTConfig:
        """The config of the stage after this one: this config with `overrides` applied."""
        if not isinstance(overrides, dict):
            raise ValueError(f"next_stage must be a mapping of SFT config keys, got {type(overrides).__name__}")
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in next_stage; valid keys: {sorted(names)}")
        fixed = sorted(set(overrides) & {"model_name_or_path", "model_config", "tokenizer", "dtype", "device"})
        if fixed:
            raise ValueError(f"next_stage continues the same model: it cannot set {fixed}")
        values = {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "next_stage": None}
        values.update(overrides)
        return type(self)(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SFTConfig:
        """Like SFTConfig(**values) but an unknown key gets an error listing the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown SFT config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**values)


def _coerce_fields(cfg) -> None:
    """Convert string values (YAML 1.1 "1e-3", CLI key=value) to the annotated scalar types."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not isinstance(value, str):
            if isinstance(value, int) and not isinstance(value, bool) and float in _scalar_types(hints[f.name]):
                setattr(cfg, f.name, float(value))
            continue
        kinds = _scalar_types(hints[f.name])
        if str in kinds:
            continue
        if type(None) in kinds and value.strip().lower() in ("none", "null", "~", ""):
            setattr(cfg, f.name, None)
            continue
        try:
            if bool in kinds:
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                setattr(cfg, f.name, lowered in ("true", "1", "yes"))
            elif int in kinds:
                number = float(value)
                if number != int(number):
                    raise ValueError
                setattr(cfg, f.name, int(number))
            elif float in kinds:
                setattr(cfg, f.name, float(value))
            elif dict in kinds:
                setattr(cfg, f.name, json.loads(value))
        except ValueError:
            expected = getattr(hints[f.name], "__name__", str(hints[f.name]))
            raise ValueError(f"{f.name}={value!r} is not a valid {expected}") from None


def _scalar_types(hint) -> set:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return set().union(*(_scalar_types(h) for h in typing.get_args(hint)))
    origin = typing.get_origin(hint)
    return {origin if origin is not None else hint}
