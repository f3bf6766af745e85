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
from pathlib import Path
from typing import Any

import torch

from grpokit.sft.config import SFTConfig
from grpokit.sft.data import collate, evaluate_on_task, load_sft_data, num_label_tokens, tokenize_pairs

__all__ = ["SFTConfig", "evaluate_on_task", "run_sft"]


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
    prompts, completions, task = load_sft_data(cfg, tokenizer)
    tools = getattr(task, "tools", None) if task is not None else None
    if task is not None and getattr(task, "environment_factory", None) is not None:  # its methods are the tools
        from grpokit.envs import environment_tools

        tools = (tools or []) + environment_tools(task.environment_factory())
    examples = tokenize_pairs(prompts, completions, tokenizer, cfg.max_length,
                              chat_template_kwargs={"tools": tools} if tools else None)
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

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
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
    if task is not None and cfg.eval_num_prompts != 0 and not tools:
        # (a tool task's accuracy needs whole conversations: grpokit.evaluation with its tools)
        eval_set = task.eval_dataset
        if cfg.eval_num_prompts is not None:
            eval_set = eval_set.select(range(min(cfg.eval_num_prompts, len(eval_set))))

    def evaluate(prompts) -> dict[str, float]:
        results = evaluate_on_task(
            model,
            tokenizer,
            prompts,
            task.is_correct,
            num_samples=cfg.eval_pass_k,
            temperature=cfg.eval_temperature,
            max_new_tokens=task.max_completion_length,
            seed=cfg.seed,
        )
        print("eval: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()) + f" on {len(prompts)} prompts")
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
        total_tokens = sum(num_label_tokens(ids, p, cfg.completion_only_loss) for mb in micro for ids, p in mb)
        for mb in micro:
            input_ids, attention_mask, labels = collate(mb, tokenizer.pad_token_id, cfg.completion_only_loss)
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
            evaluate(eval_set)
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
        metrics.update({f"eval_{k}": v for k, v in evaluate(eval_set).items()})
        metrics["eval_num_prompts"] = len(eval_set)
        metrics["eval_runtime_s"] = round(time.perf_counter() - eval_start, 2)

    if save:
        out = Path(cfg.output_dir)
        tokenizer.padding_side = "left"  # saved ready for generation
        save_model(model, tokenizer, out)
        print(f"saved to {out}")
    return metrics
