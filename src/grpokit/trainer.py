"""The GRPO training loop, readable top to bottom, and the TRL-style `GRPOTrainer` facade.

One step:  sample G completions per prompt -> rewards -> group advantages
           -> (old logprobs only when num_iterations > 1; reference logprobs only when beta > 0)
           -> num_iterations passes of micro-batched updates with gradient accumulation
           -> gradient clipping -> optimizer and LR schedule step -> metrics -> checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from typing import Any

import torch

from grpokit import memory
from grpokit.algos import LOSS_TYPES, group_advantages, policy_loss, rollout_correction_weights, top_entropy_mask
from grpokit.batch import Rollout, make_micro_batches, pad_micro_batches, sampler_logps_are_old_logps, uses_packed_forward
from grpokit.config import GRPOConfig
from grpokit.run import RunFacade, RunParts, build_run


class GRPOTrainer(RunFacade):
    """`GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
    eval_dataset=..., processing_class=..., peft_config=...)` then `.train()`, as in TRL.

    `model` is a hub id, a local path or a loaded model; `reward_funcs` one or a list of
    callables / registry names / "module:function" paths. Everything is validated here, before
    the first step; afterwards `trainer.model` is the trained model."""

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None,
                 optimizers=(None, None), reward_processing_classes=None, **kwargs):
        if callbacks:
            raise ValueError("GRPOTrainer: callbacks are not supported by grpokit; read metrics.jsonl instead.")
        if reward_processing_classes is not None:
            raise ValueError("GRPOTrainer: reward_processing_classes is not supported; pass reward models by "
                             "path to the 'reward_model' reward (see docs/rewards.md).")
        self._take_args(GRPOConfig, args, kwargs)
        self.parts: RunParts = build_run(
            self.args, model=model, reward_funcs=reward_funcs, train_dataset=train_dataset,
            eval_dataset=eval_dataset, tokenizer=processing_class, peft_config=peft_config,
            optimizers=optimizers,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Run the loop; returns the final metrics (including eval accuracy before/after)."""
        return train_loop(self.parts, resume_from_checkpoint=resume_from_checkpoint
                          if resume_from_checkpoint is not None else self.args.resume_from_checkpoint)

    def save_model(self, output_dir: str | None = None, merge_lora: bool = False) -> str:
        """Writes on rank 0 only (every rank must call it under FSDP2: the weights are gathered)."""
        return self.parts.save_final(output_dir or os.path.join(self.args.output_dir, "final"), merge_lora=merge_lora)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def train_loop(run: RunParts, resume_from_checkpoint: str | bool | None = None) -> dict:
    cfg, tracker = run.config, run.tracker
    tracker.write(run.summary())
    state, final = run.begin(resume_from_checkpoint)

    while state["global_step"] < run.total_steps:
        phase: dict[str, float] = {}
        # 1. sample G completions for this step's prompts
        rows, state["epoch"], state["cursor"] = run.next_prompt_rows(state["epoch"], state["cursor"])
        # (run.guard: an exception on one rank stops every rank now, naming it, not at a timeout)
        with _timed(phase, "time/generate"), run.guard("generation"):
            rollout = run.sample(rows, seed=cfg.seed + 1_000_003 * state["global_step"] + run.rank)
        # 2. rewards -> 3. group-relative advantages
        with _timed(phase, "time/reward"), run.guard("the reward functions"):
            reward_out = run.score(rollout)
        rollout.rewards_per_func, rollout.rewards = reward_out.per_func, reward_out.total
        rollout.reward_names = list(reward_out.names)
        rollout.advantages = group_advantages(rollout.rewards, cfg.num_generations,
                                              scale_rewards=cfg.scale_rewards, estimator=cfg.advantage_estimator)
        micro_batches = make_micro_batches(rollout, cfg.per_device_train_batch_size, pad_id=run.pad_id,
                                           device=run.device, mask_truncated=cfg.mask_truncated_completions,
                                           merge=_can_merge_micro_batches(run),
                                           skip_zero_advantage=cfg.beta == 0 and cfg.top_entropy_quantile >= 1.0,
                                           never_empty=run.world_size > 1)
        if run.world_size > 1:
            # every rank runs as many forwards as the rank with the most (merging depends on the
            # data): the same collectives everywhere, whatever each rank has to train
            micro_batches = pad_micro_batches(micro_batches, run.global_max(len(micro_batches)))
        # 4. old logprobs only when reused for several updates; reference only when beta > 0
        with _timed(phase, "time/logprobs"):
            _add_fixed_logprobs(run, micro_batches)
        num_items = run.global_sum(sum(mb.completion_mask.sum() for mb in micro_batches))
        num_sequences = run.global_sum(torch.tensor(float(len(rollout.completion_ids))))

        # 5. num_iterations passes of micro-batched updates
        step_stats: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.num_iterations):
            if state["global_step"] >= run.total_steps:
                break
            with _timed(phase, "time/backward"):
                stats = _accumulate_gradients(run, micro_batches, num_items, num_sequences)
            with _timed(phase, "time/optimizer"):
                applied, grad_norm = run.optimizer_step()
            if not applied:
                state["skipped_steps"] += 1
            stats["grad_norm"] = grad_norm
            step_stats.append(stats)
            state["global_step"] += 1
        state["samples_seen"] += run.world_size * len(rollout.completion_ids)

        # 6. metrics, samples, eval, checkpoint
        metrics = _step_metrics(run, rollout, reward_out.stats, step_stats, phase, state)
        end_of_step(run, state, metrics, rollout)
        final = metrics
    run.finish()
    return final


def _can_merge_micro_batches(run: RunParts) -> bool:
    """Micro-batches may be joined into fewer forwards (batch.make_micro_batches(merge=True)) when
    the loss is a plain sum over them (global normalisers: not grpo/bnpo/sapo's local means), the
    entropy mask is off (its quantile is per micro-batch) and the packed forward is used."""
    cfg = run.config
    return (LOSS_TYPES[cfg.loss_type][1] not in ("grpo", "bnpo") and cfg.top_entropy_quantile >= 1.0
            and uses_packed_forward(run.model))


def end_of_step(run: RunParts, state: dict, metrics: dict[str, float], rollout: Rollout | None) -> None:
    """What follows every step's update, for every algorithm's loop: metrics to the trackers, a
    few samples, the console line, evaluation and checkpoint when due. Eval metrics join `metrics`."""
    cfg, tracker, step = run.config, run.tracker, state["global_step"]
    tracker.log(step, metrics)
    tracker.update_progress(step, metrics)
    if rollout is not None and cfg.log_completions and (step % cfg.logging_steps == 0 or step == 1):
        tracker.log_completions(step, _sample_rows(rollout, cfg.num_completions_to_print))
    if step % cfg.logging_steps == 0:
        tracker.write(_format_line(step, metrics))
    if cfg.eval_strategy == "steps" and run.eval_dataset is not None and (
            step % cfg.eval_steps == 0 or step >= run.total_steps):
        metrics.update(run.log_eval(step))
    if cfg.save_strategy == "steps" and (step % cfg.save_steps == 0 or step >= run.total_steps):
        run.save_checkpoint(state)


def _add_fixed_logprobs(run: RunParts, micro_batches) -> None:
    """Logprobs that stay fixed through the update passes: the old policy's (only when
    num_iterations > 1: otherwise they equal the current ones, detached) and the reference's."""
    cfg = run.config
    if cfg.num_iterations == 1 and cfg.beta == 0:
        return
    # the HF engine's fp32 sampling logprobs are the old ones up to float error (see batch.py)
    reuse = cfg.num_iterations > 1 and sampler_logps_are_old_logps(
        run.model, run.engine, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
        use_vllm=cfg.use_vllm)
    with torch.no_grad():
        for mb in micro_batches:
            if cfg.num_iterations > 1:
                mb.old_logps = mb.sampling_logps if reuse else run.train_forward(mb, temperature=cfg.temperature)[0]
            if cfg.beta > 0:
                with run.reference_context() as ref_forward:
                    mb.ref_logps = ref_forward(mb, temperature=cfg.temperature)[0]


def _accumulate_gradients(run: RunParts, micro_batches, num_items, num_sequences) -> dict[str, torch.Tensor]:
    """Forward + backward of every micro-batch; the loss normalisers cover the whole accumulated,
    all-rank batch, so the summed gradient equals the whole batch's (see algos.losses)."""
    cfg = run.config
    run.model.train()
    totals: dict[str, torch.Tensor] = {}
    want_entropy = cfg.top_entropy_quantile < 1.0
    for i, mb in enumerate(micro_batches):
        sync = run.no_sync() if i < len(micro_batches) - 1 else nullcontext()
        with sync, run.autocast():
            # through run.train_forward (batch.completion_logprobs in a DDP/FSDP2-wrapped module), so
            # the gradients are averaged over ranks exactly once, in this backward
            logps, entropy = run.train_forward(mb, temperature=cfg.temperature, with_entropy=want_entropy)
            is_weights = None
            if cfg.use_vllm and cfg.vllm_importance_sampling_correction:
                level, mode = cfg.vllm_importance_sampling_mode.split("_")
                base = mb.old_logps if mb.old_logps is not None else logps.detach()
                is_weights = rollout_correction_weights(base, mb.sampling_logps, mb.completion_mask, level=level,
                                                        mode=mode, cap=cfg.vllm_importance_sampling_cap)
            entropy_mask = (top_entropy_mask(entropy.detach(), mb.completion_mask, cfg.top_entropy_quantile)
                            if want_entropy else None)
            loss, stats = policy_loss(
                logps, mb.old_logps, mb.advantages, mb.completion_mask,
                loss_type=cfg.loss_type, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, delta=cfg.delta,
                dual_clip=cfg.dual_clip, importance_sampling_level=cfg.importance_sampling_level,
                beta=cfg.beta, ref_logps=mb.ref_logps, kl_estimator=cfg.kl_estimator,
                max_completion_length=cfg.max_completion_length,
                num_items_in_batch=num_items / run.world_size, num_sequences=num_sequences / run.world_size,
                is_weights=is_weights, entropy_mask=entropy_mask,
                sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg)
            if LOSS_TYPES[cfg.loss_type][1] in ("grpo", "bnpo"):
                # local means (grpo, bnpo, sapo): average them over the micro-batches, as TRL divides
                # by the accumulation steps; dapo/cispo/dr_grpo already carry global normalisers
                loss = loss / len(micro_batches)
        loss.backward()
        weight = mb.completion_mask.sum().detach()
        totals["loss"] = totals.get("loss", 0.0) + loss.detach()
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + v.detach() * weight
        totals["_tokens"] = totals.get("_tokens", 0.0) + weight
    tokens = totals.pop("_tokens").clamp(min=1)
    return {k: (v if k == "loss" else v / tokens) for k, v in totals.items()}


def _step_metrics(run: RunParts, rollout: Rollout, reward_stats: dict, step_stats, phase, state) -> dict[str, float]:
    """Everything logged for one step, reduced across ranks once."""
    lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
    local = {
        "reward": torch.nanmean(rollout.rewards), "reward_std": _nanstd(rollout.rewards),
        "advantage_abs": rollout.advantages.abs().mean(),
        "frac_reward_zero_std": _frac_zero_std_groups(rollout.rewards, run.config.num_generations),
        "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
        "completions/min_length": lengths.min(), "completions/clipped_ratio": rollout.truncated.float().mean(),
    }
    for j, name in enumerate(rollout.reward_names):
        local[f"rewards/{name}/mean"] = torch.nanmean(rollout.rewards_per_func[:, j])
        local[f"rewards/{name}/std"] = _nanstd(rollout.rewards_per_func[:, j])
    for k in step_stats[-1] if step_stats else []:
        local[k] = torch.stack([torch.as_tensor(s[k], dtype=torch.float32).cpu() for s in step_stats]).mean()
    metrics = run.reduce_metrics(local)
    metrics.update({k: float(v) for k, v in reward_stats.items() if k not in metrics and _is_number(v)})
    metrics.update(phase)
    metrics["time/step"] = sum(v for k, v in phase.items() if k.startswith("time/"))
    metrics["memory/peak_rss_gb"] = memory.lifetime_peak_gb("rss")
    if torch.cuda.is_available() and run.device.type == "cuda":
        metrics["memory/peak_cuda_gb"] = memory.lifetime_peak_gb("cuda", run.device)
    metrics["learning_rate"] = run.scheduler.get_last_lr()[0]
    metrics["skipped_steps"] = float(state["skipped_steps"])
    metrics["samples"] = float(state["samples_seen"])
    metrics["epoch"] = state["epoch"] + state["cursor"] / max(1, run.num_train_rows)
    return metrics


def _sample_rows(rollout: Rollout, limit: int | None) -> list[dict[str, Any]]:
    n = len(rollout.completions) if limit is None else min(limit, len(rollout.completions))
    rows = []
    for i in range(n):
        row = {"row": rollout.row_index[i], "prompt": rollout.prompts[i], "completion": rollout.completions[i],
               "reward": _num(rollout.rewards[i]), "advantage": _num(rollout.advantages[i])}
        for j, name in enumerate(rollout.reward_names):
            row[name] = _num(rollout.rewards_per_func[i, j])
        rows.append(row)
    return rows


def _format_line(step: int, m: dict[str, float]) -> str:
    keys = ("reward", "loss", "kl", "completions/mean_length", "grad_norm", "time/step")
    return f"step {step}: " + "  ".join(f"{k.split('/')[-1]}={m[k]:.4g}" for k in keys if k in m)


class _timed:
    """Adds a phase's seconds to into["time/<phase>"] and its peak memory (GiB: CUDA allocated on
    a GPU, else resident; see grpokit.memory) to into["memory/<phase>_peak_gb"]."""

    def __init__(self, into: dict, key: str):
        self.into, self.key = into, key
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else None

    def __enter__(self):
        memory.reset_peak(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.key] = self.into.get(self.key, 0.0) + time.perf_counter() - self.t0
        name = "memory/" + self.key.split("/", 1)[-1] + "_peak_gb"
        self.into[name] = max(self.into.get(name, 0.0), memory.peak_gb(self.device))


def _nanstd(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else torch.tensor(0.0)


def _frac_zero_std_groups(rewards: torch.Tensor, g: int) -> torch.Tensor:
    groups = rewards.view(-1, g)
    spread = torch.nan_to_num(groups, nan=0.0).amax(1) - torch.nan_to_num(groups, nan=0.0).amin(1)
    return (spread == 0).float().mean()


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)

