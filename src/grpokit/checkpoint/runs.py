"""A run's checkpoints: save one (rank 0 writes; under FSDP2 every rank first takes part in
gathering the full state), resume from one (exact, or with the changes allowed), and the final
model. `run` is the composed run (grpokit.core.run.RunParts): its config, model, optimizer,
scheduler, tokenizer or processor, collectives and sharding."""

from __future__ import annotations

import os
import warnings
from typing import Any

from grpokit import distributed
from grpokit.checkpoint.compat import RESUME_KEYS, check_resume_compatible
from grpokit.checkpoint.files import OPTIMIZER_FILE, CheckpointError, find_latest_checkpoint
from grpokit.checkpoint.load import load_checkpoint, read_model_state, torch_load
from grpokit.checkpoint.save import save_checkpoint


def checkpoint_config(run: Any) -> dict:
    """The config saved with a checkpoint, plus the global batch: a run may resume on another
    number of ranks when per_device_train_batch_size * gradient_accumulation_steps * ranks is
    unchanged (gradient_accumulation_steps may then differ)."""
    c = run.config
    return {**c.to_dict(),
            "completions_per_step": c.per_device_train_batch_size * c.gradient_accumulation_steps * run.comm.world_size}


def save_run_checkpoint(run: Any, trainer_state: dict) -> str | None:
    """Writes `checkpoint-<step>` on rank 0 (returns its path there, None elsewhere)."""
    model_state = optim_state = None
    if run.sharded:
        model_state, optim_state = distributed.full_state(run.model, run.optimizer)
    with run.comm.guard("saving a checkpoint"):
        if run.comm.rank != 0:
            return None
        return save_checkpoint(run.config.output_dir, trainer_state["global_step"], model=run.model,
                               optimizer=run.optimizer, scheduler=run.scheduler, trainer_state=trainer_state,
                               config=checkpoint_config(run), tokenizer=run.tokenizer,
                               save_total_limit=run.config.save_total_limit, model_state=model_state,
                               optimizer_state=optim_state)


def resume_run(run: Any, path: str | bool) -> tuple[str, dict, list[str]]:
    """Loads the checkpoint at `path` (True / "latest": the newest in output_dir) into the run's
    model, optimizer and schedule; returns (its path, the loop state saved with it, the fields
    that changed: allowed by `resume_allow_changes`, no longer an exact continuation)."""
    cfg = run.config
    if path is True or path == "latest":
        latest = find_latest_checkpoint(cfg.output_dir)
        if latest is None:
            raise CheckpointError(f"resume_from_checkpoint=True but {cfg.output_dir} has no checkpoint.")
        path = latest
    path = str(path)
    keys = [k for k in RESUME_KEYS if k != "gradient_accumulation_steps"] + ["completions_per_step"]
    changed = check_resume_compatible(path, checkpoint_config(run), keys, allowed=cfg.resume_allow_changes)
    if run.sharded:  # rank 0 reads the full weights and optimizer state, each rank keeps its shards
        model_state, optim_state = {}, {}
        if run.comm.rank == 0:
            model_state = read_model_state(path, run.model)
            optim_state = torch_load(os.path.join(path, OPTIMIZER_FILE), "cpu")
        distributed.load_full_state(run.model, run.optimizer, model_state, optim_state, strict=not run.is_peft)
        state = load_checkpoint(path, model=None, optimizer=None, scheduler=run.scheduler)
    else:
        state = load_checkpoint(path, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
    if changed:
        _rebase_learning_rate(run)
    return path, state, changed


def _rebase_learning_rate(run: Any) -> None:
    """The loaded schedule holds the checkpoint's base learning rate: rebase it on this run's
    (a no-op when it did not change), keeping the schedule's position."""
    base = getattr(run.scheduler, "base_lrs", None)
    if base is None or all(b == run.config.learning_rate for b in base[:1]):
        return
    run.scheduler.base_lrs = [run.config.learning_rate] * len(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # get_lr outside step(): wanted here
        for group, lr in zip(run.optimizer.param_groups, run.scheduler.get_lr()):
            group["lr"] = lr
    run.scheduler._last_lr = [g["lr"] for g in run.optimizer.param_groups]


def save_final_model(run: Any, path: str, merge_lora: bool = False) -> str:
    """The trained model (adapter for LoRA) and tokenizer or processor, written by rank 0 only;
    under FSDP2 every rank takes part in gathering the full weights first."""
    from grpokit.models import save_model

    if not run.sharded:
        if run.comm.rank == 0:  # a vision-language model's processor (its tokenizer included), else the tokenizer
            save_model(run.model, run.processor or run.tokenizer, path, merge_lora=merge_lora)
        return path
    if merge_lora:
        raise ValueError("merge_lora=True is not supported on a sharded (FSDP2) model: save without it, then "
                         "in one process load the adapter with grpokit.models.load_model(path) and save "
                         "it with grpokit.models.save_model(model, tokenizer, out, merge_lora=True).")
    full, _ = distributed.full_state(run.model, None)
    with run.comm.guard("saving the model"):
        if run.comm.rank == 0:
            os.makedirs(path, exist_ok=True)
            run.model.save_pretrained(path, state_dict=full)
            (run.processor or run.tokenizer).save_pretrained(path)
    return path
