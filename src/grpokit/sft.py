"""Supervised fine-tuning (SFT): the warm start before GRPO, and how the starter model is made.

One plain PyTorch loop, readable top to bottom: tokenize (prompt, completion) pairs, shuffle, pad,
cross-entropy on the completion tokens (or on everything), AdamW with warmup + decay, then an
optional greedy / pass@k evaluation on a built-in task's held-out split, then save.

Data comes from a built-in task (`task="arithmetic"`, completions are the task's reference answers)
or a dataset in TRL's prompt-completion format (`dataset_name=...` with "prompt" and "completion"
columns, standard strings or conversational message lists). The model is loaded
(`model_name_or_path`) or made fresh from a config (`model_config={"model_type": "llama", ...}` plus
`tokenizer="char"`), which is how the shipped starter model is built from nothing. `next_stage`
chains further stages on the same model (the starter: learn arithmetic, then a sloppy-teacher stage).

`SFTConfig(**yaml_dict)` accepts plain YAML values: numbers given as strings ("1e-3", from YAML 1.1
or `key=value` overrides) are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpokit.sft_data import _collate, _load_sft_data, _num_label_tokens, _tokenize_pairs, evaluate_on_task

__all__ = ["SFTConfig", "evaluate_on_task", "run_sft"]


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


# --------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------


def _lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Fine-tune (every stage in turn), evaluate (built-in tasks), save to cfg.output_dir.

    Returns the last stage's metrics; an earlier stage's are included with a "stageN/" prefix.
    """
    from grpokit.models import load_model, load_tokenizer, new_model_from_config, resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model_name_or_path, padding_side="right")
    if cfg.model_config is not None:
        model = new_model_from_config(cfg.model_config, tokenizer, seed=cfg.seed).to(device=device, dtype=dtype)
    else:
        model = load_model(cfg.model_name_or_path, dtype=dtype, device=device)
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))

    stages = [cfg]
    while stages[-1].next_stage is not None:
        stages.append(stages[-1].stage_config(stages[-1].next_stage))
    metrics: dict[str, Any] = {}
    for i, stage in enumerate(stages, start=1):
        last = i == len(stages)
        if len(stages) > 1:
            print(f"sft stage {i}/{len(stages)}", flush=True)
        stage_metrics = _train_stage(stage, model, tokenizer, device, save=stage.save and last)
        if last:
            metrics.update(stage_metrics)
        else:
            metrics.update({f"stage{i}/{k}": v for k, v in stage_metrics.items()})
    if stages[-1].save:
        out = Path(stages[-1].output_dir)
        (out / "sft_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        (out / "sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _train_stage(cfg: SFTConfig, model, tokenizer, device, save: bool) -> dict[str, Any]:
    """One SFT stage on `model` in place: data, optimizer, loop, evaluation, optional save."""
    from grpokit.models import save_model

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    tokenizer.padding_side = "right"
    prompts, completions, task = _load_sft_data(cfg, tokenizer)
    examples = _tokenize_pairs(prompts, completions, tokenizer, cfg.max_length)
    batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(examples) / batch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total_steps)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"sft: {num_params / 1e6:.2f}M params, {dtype}, {device}; {len(examples)} examples, "
        f"{total_steps} steps of {batch} sequences ({total_steps * batch / len(examples):.2f} epochs), "
        f"lr {cfg.learning_rate:g} {cfg.lr_scheduler_type} warmup {warmup}, "
        f"loss on {'completions' if cfg.completion_only_loss else 'all tokens'}",
        flush=True,
    )

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.lr_scheduler_type, warmup, total_steps))
    order_rng = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []

    eval_set = None
    if task is not None and cfg.eval_num_prompts != 0:
        eval_set = task.eval_dataset
        if cfg.eval_num_prompts is not None:
            eval_set = eval_set.select(range(min(cfg.eval_num_prompts, len(eval_set))))

    def evaluate() -> dict[str, float]:
        results = evaluate_on_task(
            model,
            tokenizer,
            eval_set,
            task.is_correct,
            num_samples=cfg.eval_pass_k,
            temperature=cfg.eval_temperature,
            max_new_tokens=task.max_completion_length,
            seed=cfg.seed,
        )
        print("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()) + f" on {len(eval_set)} prompts")
        return results

    model.train()
    start_time = time.perf_counter()
    losses: list[float] = []
    window: list[float] = []
    for step in range(total_steps):
        step_loss = 0.0
        micro = []
        for _ in range(cfg.gradient_accumulation_steps):
            while len(order) < cfg.per_device_train_batch_size:
                order += torch.randperm(len(examples), generator=order_rng).tolist()
            micro.append([examples[i] for i in order[: cfg.per_device_train_batch_size]])
            order = order[cfg.per_device_train_batch_size :]
        # token-weighted mean over the whole accumulated batch
        total_tokens = sum(_num_label_tokens(ids, p, cfg.completion_only_loss) for mb in micro for ids, p in mb)
        for mb in micro:
            input_ids, attention_mask, labels = _collate(mb, tokenizer.pad_token_id, cfg.completion_only_loss)
            input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            loss_sum = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
            )
            loss = loss_sum / max(total_tokens, 1)
            loss.backward()
            step_loss += loss.item()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        window.append(step_loss)
        if (step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps:
            elapsed = time.perf_counter() - start_time
            print(
                f"step {step + 1:>5}/{total_steps}  loss {sum(window) / len(window):.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {elapsed:.1f}s",
                flush=True,
            )
            window = []
        if eval_set is not None and cfg.eval_steps > 0 and (step + 1) % cfg.eval_steps == 0 and step + 1 < total_steps:
            evaluate()
    train_runtime = time.perf_counter() - start_time
    model.eval()

    metrics: dict[str, Any] = {
        "num_params": num_params,
        "train_steps": total_steps,
        "train_examples": len(examples),
        "train_runtime_s": round(train_runtime, 2),
        "first_loss": losses[0] if losses else None,
        "final_loss": sum(losses[-cfg.logging_steps :]) / max(1, len(losses[-cfg.logging_steps :])),
    }
    if eval_set is not None:
        eval_start = time.perf_counter()
        metrics.update({f"eval_{k}": v for k, v in evaluate().items()})
        metrics["eval_num_prompts"] = len(eval_set)
        metrics["eval_runtime_s"] = round(time.perf_counter() - eval_start, 2)

    if save:
        out = Path(cfg.output_dir)
        tokenizer.padding_side = "left"  # saved ready for generation
        save_model(model, tokenizer, out)
        print(f"saved to {out}")
    return metrics
