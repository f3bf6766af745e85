"""Everything a run needs, built and validated before the first step (`build_run`), and the small
operations the loop in trainer.py calls on it (sample, score, optimizer step, eval, checkpoint).

Bad input fails here, with a message naming the field and the fix: config, dataset columns,
reward signatures, prompts longer than the context, missing chat template, empty dataset."""

from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit.batch import Rollout
from grpokit.config import GRPOConfig
from grpokit.rollout import SamplingParams, make_engine


@dataclass
class RunParts:
    config: GRPOConfig
    model: Any
    tokenizer: Any
    device: torch.device
    prompts: list                    # per dataset row: the prompt as given (str or messages)
    prompt_ids: list[list[int]]      # per dataset row: tokenized prompt
    columns: dict[str, list]         # per dataset row: every other column, for the rewards
    conversational: bool
    reward_runner: Any
    engine: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tracker: Any
    total_steps: int
    prompts_per_step: int            # per rank
    eval_dataset: Any = None
    eval_fn: Any = None              # evaluation.Evaluator or None
    ref_model: Any = None
    is_peft: bool = False
    rank: int = 0
    world_size: int = 1
    pad_id: int = 0
    task_name: str | None = None
    model_name: str = ""
    _notes: list[str] = field(default_factory=list)

    @property
    def num_train_rows(self) -> int:
        return len(self.prompt_ids)

    # ---- data order: a seeded permutation per epoch; position = (epoch, cursor) ----
    def next_prompt_rows(self, epoch: int, cursor: int) -> tuple[list[int], int, int]:
        """This rank's dataset rows for the next step, and the new (epoch, cursor). Every rank
        walks the same global order and takes its own slice, so groups never cross ranks."""
        need = self.prompts_per_step * self.world_size
        rows: list[int] = []
        while len(rows) < need:
            order = self._epoch_order(epoch)
            take = order[cursor:cursor + need - len(rows)]
            rows += take
            cursor += len(take)
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
        mine = rows[self.rank * self.prompts_per_step:(self.rank + 1) * self.prompts_per_step]
        return mine, epoch, cursor

    def _epoch_order(self, epoch: int) -> list[int]:
        n = self.num_train_rows
        if not self.config.shuffle_dataset:
            return list(range(n))
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    # ---- sampling and scoring ----
    def sampling_params(self, seed: int | None, *, temperature: float | None = None) -> SamplingParams:
        c = self.config
        return SamplingParams(max_tokens=c.max_completion_length,
                              temperature=c.temperature if temperature is None else temperature,
                              top_p=c.top_p, top_k=c.top_k, min_p=c.min_p or 0.0, stop=list(c.stop), seed=seed)

    def sample(self, rows: list[int], seed: int) -> Rollout:
        g = self.config.num_generations
        outs = self.engine.generate([self.prompt_ids[r] for r in rows], n=g, params=self.sampling_params(seed))
        row_index = [rows[o.prompt_index] for o in outs]
        completions = [[{"role": "assistant", "content": o.text}] if self.conversational else o.text for o in outs]
        return Rollout(
            row_index=row_index, prompts=[self.prompts[r] for r in row_index], completions=completions,
            prompt_ids=[self.prompt_ids[r] for r in row_index], completion_ids=[list(o.token_ids) for o in outs],
            sampling_logps=[list(o.logprobs) for o in outs],
            truncated=torch.tensor([o.finish_reason == "length" for o in outs], dtype=torch.bool),
            rewards_per_func=torch.empty(0), rewards=torch.empty(0), advantages=torch.empty(0),
        )

    def score(self, rollout: Rollout):
        cols = {k: [v[r] for r in rollout.row_index] for k, v in self.columns.items()}
        return self.reward_runner(rollout.prompts, rollout.completions, completion_ids=rollout.completion_ids,
                                  columns=cols)

    @contextlib.contextmanager
    def reference_context(self):
        """The reference policy: the base model with the adapter off (LoRA), else a frozen copy."""
        if self.is_peft:
            from grpokit.models import reference_logits_context

            with reference_logits_context(self.model):
                yield self.model
        else:
            yield self.ref_model

    # ---- optimisation ----
    def optimizer_step(self) -> tuple[bool, torch.Tensor]:
        """Clip, check, step. A non-finite gradient norm skips the update (or raises)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach().float().cpu()
        applied = bool(torch.isfinite(grad_norm))
        if not applied and self.config.on_nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient norm ({float(grad_norm)}); set on_nonfinite='skip' "
                                     "to skip such steps instead.")
        if applied:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self.engine.update_weights(self.model)
        return applied, grad_norm

    def no_sync(self):
        return self.model.no_sync() if hasattr(self.model, "no_sync") and self.world_size > 1 else contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def global_sum(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device).detach().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def reduce_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(local)
        vec = torch.stack([torch.as_tensor(local[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
        if self.world_size > 1:
            vec = vec.to(self.device)
            torch.distributed.all_reduce(vec)
            vec = (vec / self.world_size).cpu()
        return {k: float(v) for k, v in zip(keys, vec)}

    # ---- eval, checkpoints, end ----
    def log_eval(self, step: int) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        metrics = self.eval_fn.greedy(self.engine)
        self.tracker.log(step, metrics)
        self.tracker.write(f"eval @ step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def save_checkpoint(self, state: dict) -> str | None:
        if self.rank != 0:
            return None
        from grpokit.checkpoint import save_checkpoint

        return save_checkpoint(self.config.output_dir, state["global_step"], model=self.model,
                               optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=dict(state),
                               config=self.config.to_dict(), tokenizer=self.tokenizer,
                               save_total_limit=self.config.save_total_limit)

    def resume(self, path: str | bool) -> dict:
        from grpokit.checkpoint import CheckpointError, check_resume_compatible, find_latest_checkpoint, load_checkpoint

        if path is True or path == "latest":
            path = find_latest_checkpoint(self.config.output_dir)
            if path is None:
                raise CheckpointError(f"resume_from_checkpoint=True but {self.config.output_dir} has no checkpoint.")
        check_resume_compatible(path, self.config.to_dict())
        state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.engine.update_weights(self.model)
        self.tracker.write(f"resumed from {path} at step {state['global_step']}")
        return {k: state[k] for k in ("global_step", "epoch", "cursor", "skipped_steps", "samples_seen") if k in state}

    def finish(self) -> None:
        if self.rank == 0:
            from grpokit.models import save_model

            save_model(self.model, self.tokenizer, os.path.join(self.config.output_dir, "final"))
        self.tracker.close(plot=self.config.plot)

    def summary(self) -> str:
        c = self.config
        g, w = c.num_generations, self.world_size
        completions = c.per_device_train_batch_size * c.gradient_accumulation_steps * w
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        lines = [
            f"grpokit: {self.model_name} on {self.device} ({next(self.model.parameters()).dtype}), "
            f"{n_train:,} trainable of {n_all:,} parameters{' (LoRA)' if self.is_peft else ''}",
            f"  data: {self.num_train_rows} prompts{f' (task {self.task_name})' if self.task_name else ''}; "
            f"rewards: {', '.join(self.reward_runner.names) if hasattr(self.reward_runner, 'names') else ''}",
            f"  per step: {completions // g} prompts x G={g} = {completions} completions on {w} rank(s), "
            f"{c.gradient_accumulation_steps} micro-batch(es) of {c.per_device_train_batch_size}; "
            f"<= {completions * c.max_completion_length:,} completion tokens",
            f"  {self.total_steps} optimizer steps; loss_type={c.loss_type}, epsilon={c.epsilon}/"
            f"{c.epsilon_high if c.epsilon_high is not None else c.epsilon}, beta={c.beta}, lr={c.learning_rate}, "
            f"scale_rewards={c.scale_rewards}",
            "  skipped: old logprobs (num_iterations=1: they equal the current ones)" if c.num_iterations == 1
            else f"  old logprobs computed once per batch (num_iterations={c.num_iterations})",
            "  skipped: reference model (beta=0)" if c.beta == 0
            else ("  reference: base model with the adapter off (LoRA)" if self.is_peft
                  else "  reference: frozen copy of the initial model"),
        ]
        return "\n".join(lines + [f"  {n}" for n in self._notes])


# --------------------------------------------------------------------------------------------

def build_run(cfg: GRPOConfig, *, model=None, reward_funcs=None, train_dataset=None, eval_dataset=None,
              tokenizer=None, peft_config=None, optimizers=(None, None)) -> RunParts:
    """Load and check everything; nothing is trained or written before this returns."""
    from grpokit import data, models
    from grpokit.rewards import RewardRunner, load_reward_funcs

    _seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.use_cpu else "cpu")
    notes: list[str] = []

    # data and task
    task = None
    if train_dataset is None and cfg.dataset_name is None:
        task = data.get_task(cfg.task or "arithmetic", seed=cfg.seed, num_train=cfg.task_num_train,
                             num_eval=cfg.task_num_eval)
        train_dataset, eval_dataset = task.train_dataset, eval_dataset if eval_dataset is not None else task.eval_dataset
    elif cfg.task is not None:
        raise ValueError("GRPOConfig: set either task (a built-in dataset) or dataset_name/train_dataset, not both.")
    if isinstance(train_dataset, str) or (train_dataset is None and cfg.dataset_name):
        name = train_dataset if isinstance(train_dataset, str) else cfg.dataset_name
        train_dataset = data.load_dataset_spec(name, split=cfg.dataset_train_split, config_name=cfg.dataset_config)
        if eval_dataset is None and cfg.dataset_test_split:
            eval_dataset = data.load_dataset_spec(name, split=cfg.dataset_test_split, config_name=cfg.dataset_config)
    if cfg.remove_unused_columns:
        train_dataset = train_dataset.select_columns(["prompt"])

    # model and tokenizer
    model_ref = model if model is not None else (cfg.model_name_or_path or models.starter_model_path())
    if not isinstance(model_ref, str) and tokenizer is None:
        raise ValueError("GRPOTrainer: model is a loaded model, so pass its tokenizer as processing_class=.")
    model_name = model_ref if isinstance(model_ref, str) else type(model_ref).__name__
    if isinstance(model_ref, str) and model_ref == models.starter_model_path():
        model_name = "grpokit starter model"
    dtype = _pick_dtype(cfg, device, notes)
    policy = models.load_model(model_ref, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                               **(cfg.model_init_kwargs or {}))
    tok = models.load_tokenizer(tokenizer if tokenizer is not None else model_ref)
    if cfg.disable_dropout:
        for m in policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if peft_config is None and cfg.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    is_peft = peft_config is not None or hasattr(policy, "disable_adapter")
    if peft_config is not None:
        policy = models.apply_lora(policy, peft_config)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if is_peft and hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()

    # prompts: rendered, tokenized, checked against the context
    max_ctx = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    prompt_ids = data.validate_prompts(train_dataset, tok, max_prompt_length=cfg.max_prompt_length)
    conversational = data.is_conversational(train_dataset[0])
    prompts = list(train_dataset["prompt"])
    columns = {c: list(train_dataset[c]) for c in train_dataset.column_names if c != "prompt"}
    if max_ctx:
        longest = max(map(len, prompt_ids))
        if longest + cfg.max_completion_length > max_ctx:
            raise ValueError(f"the longest prompt ({longest} tokens) + max_completion_length "
                             f"({cfg.max_completion_length}) exceeds the model's context of {max_ctx} tokens.")

    # rewards: resolved and checked against the dataset's columns
    funcs = reward_funcs if reward_funcs is not None else (cfg.reward_funcs or (task.reward_funcs if task else None))
    if not funcs:
        raise ValueError("no reward functions: pass reward_funcs= (callables, registry names or "
                         "'module:function') or set reward_funcs in the config.")
    funcs = funcs if isinstance(funcs, (list, tuple)) else [funcs]
    weights = cfg.reward_weights if cfg.reward_weights is not None else (
        task.reward_weights if task is not None and funcs is task.reward_funcs else None)
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions.")
    runner = RewardRunner(load_reward_funcs(list(funcs), reward_kwargs=cfg.reward_kwargs), weights=weights,
                          timeout=cfg.reward_timeout, on_error=cfg.reward_on_error,
                          num_workers=cfg.reward_num_workers)
    runner.check_signature(columns=set(train_dataset.column_names))

    # generation engine, reference, optimizer, schedule
    engine = make_engine("vllm" if cfg.use_vllm else "hf", policy, tok, max_batch_tokens=cfg.max_batch_tokens)
    ref_model = None
    if cfg.beta > 0 and not is_peft:
        ref_model = models.load_reference_model(policy)
    optimizer, scheduler = optimizers
    params = [p for p in policy.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                      fused=(cfg.optim == "adamw_torch_fused" and device.type == "cuda") or None)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prompts_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    total_steps = _total_steps(cfg, len(prompt_ids), prompts_per_step * world)
    if scheduler is None:
        from transformers import get_scheduler

        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps)

    from grpokit.evaluation import Evaluator
    from grpokit.tracking import Tracker

    eval_fn = None
    if eval_dataset is not None:
        eval_fn = Evaluator.build(eval_dataset, tok, task=task, reward_runner=runner, config=cfg)
    tracker = Tracker(cfg.output_dir, report_to=tuple(cfg.report_to) or ("jsonl",), config=cfg.to_dict(),
                      total_steps=total_steps, is_main_process=rank == 0, run_name=cfg.run_name,
                      disable_progress=cfg.disable_tqdm)
    return RunParts(config=cfg, model=policy, tokenizer=tok, device=device, prompts=prompts, prompt_ids=prompt_ids,
                    columns=columns, conversational=conversational, reward_runner=runner, engine=engine,
                    optimizer=optimizer, scheduler=scheduler, tracker=tracker, total_steps=total_steps,
                    prompts_per_step=prompts_per_step, eval_dataset=eval_dataset, eval_fn=eval_fn,
                    ref_model=ref_model, is_peft=is_peft, rank=rank, world_size=world,
                    pad_id=tok.pad_token_id, task_name=task.name if task else None, model_name=model_name,
                    _notes=notes)


def _total_steps(cfg: GRPOConfig, num_rows: int, global_prompts_per_step: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    rounds = math.ceil(cfg.num_train_epochs * num_rows / global_prompts_per_step)
    return max(1, rounds * cfg.num_iterations)


def _pick_dtype(cfg: GRPOConfig, device: torch.device, notes: list[str]) -> torch.dtype:
    if device.type == "cuda":
        if cfg.bf16 is False:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if cfg.bf16:
        notes.append("warning: bf16=True on CPU; this CPU has no bf16 matmul hardware, expect it to be very slow.")
        return torch.bfloat16
    return torch.float32


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
