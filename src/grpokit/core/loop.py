"""The one training loop, for GRPO, PPO and DPO, readable top to bottom; and GRPO's step.

    state = where the loop is (fresh, or from a checkpoint)
    while steps remain:
        rows      = this rank's prompts for the step (seeded order, groups never cross ranks)
        out       = algorithm.step(run, rows, state, phase)   # sample and score, then what differs:
                    GRPO: group advantages -> micro-batches -> (old/ref logprobs) -> updates
                    PPO:  values, GAE -> epochs x mini-batches      DPO: pairs -> one update
        state    += out (optimizer steps, samples, skipped steps)
        metrics   = the step's metrics, reduced across ranks once
        end_of_step: trackers, completions table, console line, eval and checkpoint when due
    final model, plot

An algorithm is an object with `step(run, rows, state, phase) -> StepOutput`; the loop does
everything else. `sample_and_score` is the one place a step samples and scores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from grpokit import memory
from grpokit.algos import (batch_normalized, entropy_bonus, group_advantages, groups_with_signal, is_local_mean,
                           make_policy_loss, policy_loss_fields,
                           normalize_then_sum, rollout_correction_weights, top_entropy_mask)
from grpokit.checkpoint.runs import resume_run, save_run_checkpoint
from grpokit.config import GRPOConfig
from grpokit.core.batch import MicroBatch, make_micro_batches, pad_micro_batches
from grpokit.core.events import NO_EVENTS, NOTHING_ASKED, Events, Requests
from grpokit.modeling.info import ModelInfo, text_config
from grpokit.core.run import RunParts
from grpokit.trajectory import Rollout, ToolStats, concat_rollouts


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    global_step: int = 0        # optimizer steps made (GRPO), or steps (PPO/DPO: one batch each)
    epoch: int = 0              # dataset position: (epoch, cursor) in the seeded order of that epoch
    cursor: int = 0
    skipped_steps: int = 0      # optimizer steps skipped for a non-finite gradient
    samples_seen: int = 0       # completions (or pairs) consumed, all ranks
    algorithm: dict = field(default_factory=dict)
    """The algorithm's own state across steps (GRPO: the adaptive entropy coefficient, a synced
    reference's weights), saved with the checkpoint."""
    pipeline: dict = field(default_factory=dict)
    """The generation worker's rollouts sampled ahead, and its position (grpokit.pipeline), saved
    with the checkpoint; empty for the synchronous run."""

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in DICTS}
        for name in DICTS:
            if getattr(self, name):
                out[name] = dict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        kwargs: dict[str, Any] = {f.name: int(d[f.name]) for f in dataclasses.fields(cls)
                                  if f.name not in DICTS and f.name in d}
        kwargs.update({name: dict(d.get(name) or {}) for name in DICTS})
        return cls(**kwargs)


DICTS = ("algorithm", "pipeline")


def checkpoint_state(run: RunParts, state: LoopState) -> dict:
    """The loop state a checkpoint keeps, with what the pipeline sampled ahead."""
    state.pipeline = run.pipeline.checkpoint(run)
    try:
        return state.to_dict()
    finally:
        state.pipeline = {}


def begin(run: RunParts, resume_from_checkpoint: str | bool | None) -> LoopState:
    """The loop's start: every row's environment exists; output_dir holds no other run's files
    (checked on rank 0, every rank stops); the state, fresh or from the checkpoint."""
    if run.multiturn is not None and run.multiturn.environments is not None:
        run.multiturn.environments.check_rows(run.train.columns.get("environment", [None] * len(run.train)))
    with run.comm.guard("checking output_dir"):
        run.tracker.begin(resuming=bool(resume_from_checkpoint))
    if not resume_from_checkpoint:
        return LoopState()
    path, saved, changed = resume_run(run, resume_from_checkpoint)
    if changed:
        run.tracker.write(f"resuming with changed fields, no longer an exact continuation: {'; '.join(changed)}")
    run.engine.update_weights(run.model)
    run.tracker.write(f"resumed from {path} at step {saved['global_step']}")
    return LoopState.from_dict(saved)


def start_pipeline(run: RunParts, state: LoopState) -> None:
    """The generation worker starts from the loop's state (and a checkpoint's rollouts)."""
    run.pipeline.start(run, state)
    if getattr(run.pipeline, "not_exact", ""):
        run.tracker.write(f"resuming, no longer an exact continuation: {run.pipeline.not_exact}")
    state.pipeline = {}


@dataclass
class StepOutput:
    """What one step of an algorithm produced, for the loop's bookkeeping and logging."""

    rollout: Rollout | None              # what was sampled and scored (None: offline data)
    step_stats: list[dict[str, torch.Tensor]]  # one dict per optimizer step (averaged in the log)
    samples: int                         # completions (or pairs) consumed by this step, this rank
    optimizer_steps: int = 1             # how far global_step advances (GRPO: one per update pass)
    skipped: int = 0                     # optimizer steps skipped (non-finite gradient)
    extra: dict[str, float] = field(default_factory=dict)  # once-per-step metrics
    per_sample: dict[str, torch.Tensor] = field(default_factory=dict)  # [N] columns of the completions table


class Algorithm(Protocol):
    def step(self, run: RunParts, rows: list[int], state: LoopState, phase: dict, events: Events) -> StepOutput:
        """One step; `events`: announce substep_end, pre_optimizer_step and optimizer_step (core.events)."""
        ...


def train_loop(run: RunParts, algorithm: Algorithm, resume_from_checkpoint: str | bool | None = None,
               summary: str | None = None, resume_command: str | None = None,
               events: Events = NO_EVENTS) -> dict[str, float]:
    """`resume_command`: the command line that started the run (the CLI's), for the resume hint
    printed after Ctrl-C; without it the hint is the Python call. `events`: who listens to the
    training events (the TRL-style trainer's state and callbacks; see core.events)."""
    run.tracker.write(summary if summary is not None else run.summary())
    state = begin(run, resume_from_checkpoint)
    start_pipeline(run, state)
    try:
        return _run_steps(run, algorithm, state, resume_command, events)
    finally:
        run.pipeline.close()


def _run_steps(run: RunParts, algorithm: Algorithm, state: LoopState, resume_command: str | None,
               events: Events) -> dict[str, float]:
    totals = RunTotals(start_step=state.global_step)
    events.train_begin(run, state)
    final: dict[str, float] = {}
    if run.config.eval_on_start and run.evaluation.evaluator is not None and state.global_step == 0:
        final = run.log_eval(step=0, on_batch=events.prediction_step)
        events.evaluated(run, state, final)
    epoch_open = False
    with StopRequest(run.tracker.write) as stop:
        while state.global_step < run.total_steps:
            if not epoch_open:
                events.epoch_begin(run, state)
                epoch_open, epoch = True, state.epoch
            phase: dict[str, float] = {}
            events.step_begin(run, state)
            rows, state.epoch, state.cursor = run.order.next_rows(state.epoch, state.cursor)
            out = algorithm.step(run, rows, state, phase, events)
            state.global_step += out.optimizer_steps
            state.samples_seen += run.world_size * out.samples
            state.skipped_steps += out.skipped
            metrics = step_metrics(run, out, phase, state)
            asked = events.step_end(run, state, metrics, out)
            happened = end_of_step(run, state, metrics, out, asked, events)
            totals.add(metrics, run.world_size * out.samples)
            final = metrics
            then = events.after_step(run, state)
            if then.end_epoch and state.epoch == epoch:  # a listener ended the epoch: the next starts now
                state.epoch, state.cursor = state.epoch + 1, 0
            if state.epoch != epoch:
                events.epoch_end(run, state)
                epoch_open = False
            # one collective decides for every rank: 2 = Ctrl-C somewhere, 1 = a listener asked to stop
            decision = run.comm.global_max(2 * int(stop.requested) + int(then.stop))
            if decision >= 2 and state.global_step < run.total_steps:
                return interrupted(run, state, final, happened, resume_command)
            if decision:
                break
    if epoch_open:
        events.epoch_end(run, state)
    run.finish()
    final = {**final, **totals.train_metrics(state)}
    run.tracker.write(totals.summary(final, state))
    events.train_end(run, state, final)
    return final


class StopRequest:
    """Ctrl-C (SIGINT) during training asks the loop to stop after the current step, which then
    saves a checkpoint, writes the plot and prints the resume command; a second Ctrl-C stops at
    once (KeyboardInterrupt). Installed only from the main thread; a no-op elsewhere."""

    def __init__(self, write):
        self.write, self.requested, self._previous = write, False, None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        if self.requested:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.write("interrupted: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)")

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def interrupted(run: RunParts, state: LoopState, final: dict, events: dict,
                resume_command: str | None) -> dict[str, float]:
    """After a Ctrl-C: a checkpoint of this step (unless end_of_step just saved one), the plot, the hint."""
    cfg = run.config
    path = events["saved"] or save_run_checkpoint(run, checkpoint_state(run, state))
    run.tracker.close(plot=cfg.plot)
    if run.comm.rank == 0 and path:
        how = (f"{resume_command} resume_from_checkpoint={path}" if resume_command
               else f"trainer.train(resume_from_checkpoint={path!r})")
        run.tracker.write(f"stopped at step {state.global_step} of {run.total_steps}; checkpoint: {path}\n"
                          f"resume with: {how}")
    return {**final, "interrupted": 1.0}


@dataclass
class RunTotals:
    """What the closing summary adds up over the steps of this process's run."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    samples: int = 0
    tokens: float = 0.0
    steps: int = 0
    loss_sum: float = 0.0

    def add(self, metrics: dict[str, float], samples: int) -> None:
        self.samples += samples
        self.tokens += metrics.get("completions/tokens", 0.0)
        self.loss_sum += metrics.get("loss", 0.0)
        self.steps += 1

    def train_metrics(self, state: LoopState) -> dict[str, float]:
        """The closing metrics under the names transformers' Trainer gives them."""
        seconds = time.perf_counter() - self.started
        return {"train_runtime": seconds, "train_samples_per_second": self.samples / max(seconds, 1e-9),
                "train_steps_per_second": self.steps / max(seconds, 1e-9), "train_loss": self.mean_loss}

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(1, self.steps)

    def summary(self, final: dict[str, float], state: LoopState) -> str:
        """One line from `final` (with train_metrics merged in) and the totals."""
        parts = [f"done: {state.global_step - self.start_step} optimizer steps in {final['train_runtime']:.1f} s",
                 f"{self.samples:,} completions ({final['train_samples_per_second']:.1f}/s)",
                 f"{self.tokens:,.0f} completion tokens"]
        if "reward" in final:
            parts.append(f"last reward {final['reward']:.4g}")
        if "eval/accuracy" in final:
            parts.append(f"eval accuracy {final['eval/accuracy']:.1%}")
        if state.skipped_steps:
            parts.append(f"{state.skipped_steps} steps skipped (non-finite)")
        return ", ".join(parts)


def sample_and_score(run: RunParts, rows: list[int], state: LoopState, phase: dict, round_: int = 0) -> Rollout:
    """G trajectories per prompt, scored. The sampling seed of a step is
    `seed + 1_000_003 * global_step + world_size * round_ + rank` (round_: dynamic sampling's extra
    rounds), so a resumed run samples what the straight run did.
    `run.comm.guard`: an exception on one rank stops every rank now, naming it, not at a timeout."""
    seed = run.sampling_seed(state.global_step, round_)
    with timed(phase, "time/generate"), run.comm.guard("generation"):
        trajectories = run.sample(rows, seed=seed)
    with timed(phase, "time/reward"), run.comm.guard("the reward functions"):
        return run.score(trajectories)


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------

class GRPO:
    """GRPO's step: group-relative advantages, then `num_iterations` clipped-ratio updates."""

    def __init__(self, run: RunParts):
        if not isinstance(run.config, GRPOConfig):
            raise TypeError(f"GRPO's step needs a GRPOConfig, got {type(run.config).__name__}.")
        cfg = self.config = run.config
        # the objective's knobs bound once from the config; called with tensors only
        self.objective = make_policy_loss(cfg.loss_type,
                                          **{f: getattr(cfg, f) for f in policy_loss_fields(cfg.loss_type)})
        self.local_means = is_local_mean(cfg.loss_type)
        self.entropy = EntropyBonus.from_config(cfg)
        self.ref_restored = False  # a resumed run's synced reference is loaded at its first step
        # a MoE model's load-balancing loss (TRL: router_aux_loss_coef, None = the model config's)
        info = run.plan.model if run.plan.model is not None else ModelInfo.of(run.model)
        self.router_aux_coef = ((cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None
                                 else float(getattr(text_config(run.model), "router_aux_loss_coef", 0.001)))
                                if info.router else None)
        self.warned: set[str] = set()

    def advantages(self, run: RunParts, rollout: Rollout) -> torch.Tensor:
        """Group-relative advantages; the batch statistics ("batch" scaling, GDPO's second half)
        are those of every rank's rewards, as TRL's."""
        cfg = self.config
        if cfg.multi_objective_aggregation == "normalize_then_sum":
            weights = torch.tensor(cfg.reward_weights or [1.0] * rollout.rewards_per_func.shape[1])
            summed = normalize_then_sum(rollout.rewards_per_func, weights, cfg.num_generations)
            return batch_normalized(summed, run.comm.gather_values(summed))
        batch = run.comm.gather_values(rollout.rewards) if cfg.scale_rewards == "batch" else None
        return group_advantages(rollout.rewards, cfg.num_generations, scale_rewards=cfg.scale_rewards,
                                estimator=cfg.advantage_estimator, batch_rewards=batch)

    def step(self, run: RunParts, rows: list[int], state: LoopState, phase: dict,
             events: Events = NO_EVENTS) -> StepOutput:
        cfg, plan = self.config, run.plan
        self.entropy.load(state)
        if cfg.sync_ref_model and not self.ref_restored and "ref_model" in state.algorithm:
            run.ref_model.load_state_dict(state.algorithm["ref_model"])  # resumed: the synced reference
        self.ref_restored = True
        rollout, sampling_stats = self.sample_batch(run, rows, state, phase)
        advantages = self.advantages(run, rollout)
        warning = vanished_advantages(rollout.rewards, advantages, cfg.num_generations)
        if warning and warning not in self.warned:
            self.warned.add(warning)
            run.tracker.write(f"warning (step {state.global_step + 1}): {warning}")
        # one generation feeds k optimizer steps (TRL's steps_per_generation), each on its own
        # chunk of the groups (in data order), every chunk cut into its micro-batches
        k = cfg.updates_per_generation()
        per_chunk = len(rollout) // k
        chunks = []
        for j in range(k):
            rows_j = slice(j * per_chunk, (j + 1) * per_chunk)
            mbs = make_micro_batches(rollout.select(list(range(rows_j.start, rows_j.stop))) if k > 1 else rollout,
                                     cfg.per_device_train_batch_size, advantages=advantages[rows_j],
                                     pad_id=run.pad_id, device=run.device,
                                     mask_truncated=cfg.mask_truncated_completions, merge=plan.merge,
                                     skip_zero_advantage=plan.skip_zero_advantage,
                                     never_empty=plan.never_empty, token_budget=cfg.token_budget,
                                     packed=plan.packed, pad_to_multiple_of=cfg.pad_to_multiple_of)
            # local means (grpo, bnpo, sapo, luspo) are averaged over the micro-batches, as TRL divides
            # by the accumulation steps (such losses never merge, so every rank has as many)
            accumulation = len(mbs)
            if run.world_size > 1:
                # every rank runs as many forwards as the rank with the most (merging depends on the
                # data): the same collectives everywhere, whatever each rank has to train
                mbs = pad_micro_batches(mbs, run.comm.global_max(len(mbs)))
            chunks.append((mbs, accumulation))
        with timed(phase, "time/logprobs"):
            add_fixed_logprobs(run, [mb for mbs, _ in chunks for mb in mbs])
        # the normalisers of one optimizer step: the generation's totals over its k steps (TRL's)
        num_items = run.comm.global_sum(sum(mb.completion_mask.sum() for mbs, _ in chunks for mb in mbs)) / k
        num_sequences = run.comm.global_sum(torch.tensor(float(len(rollout)))) / k

        step_stats: list[dict[str, torch.Tensor]] = []
        skipped = 0
        updates = [chunk for _ in range(cfg.num_iterations) for chunk in chunks]
        for mbs, accumulation in updates[:run.total_steps - state.global_step]:
            divisor = accumulation if self.local_means else 1
            with timed(phase, "time/backward"):
                stats = self.accumulate_gradients(run, mbs, num_items, num_sequences, divisor, accumulation,
                                                  events=events)
            with timed(phase, "time/optimizer"):
                applied, stats["grad_norm"] = run.optimizer_step(events)
            self.entropy.end_of_optimizer_step(run, stats)
            self.sync_reference(run, state.global_step + len(step_stats) + 1)
            skipped += 0 if applied else 1
            step_stats.append(stats)
        self.entropy.save(state)
        if cfg.sync_ref_model:  # the live tensors (no copy per step): a checkpoint writes their values then
            state.algorithm["ref_model"] = run.ref_model.state_dict()
        return StepOutput(rollout=rollout, step_stats=step_stats, samples=len(rollout),
                          optimizer_steps=len(step_stats), skipped=skipped,
                          extra={"frac_reward_zero_std": self.frac_without_signal(rollout), **sampling_stats},
                          per_sample={"advantage": advantages})

    def frac_without_signal(self, rollout: Rollout) -> float:
        """frac_reward_zero_std: the groups whose advantages are all 0 (algos.groups_with_signal)."""
        return 1.0 - float(groups_with_signal(rollout.rewards, self.config.num_generations).float().mean())

    def sample_batch(self, run: RunParts, rows: list[int], state: LoopState, phase: dict) -> tuple[Rollout, dict]:
        """The step's scored groups. With DAPO's dynamic sampling, groups whose rewards are all
        equal (no signal) are left out and more prompts are sampled, the next ones of the data
        order, until the step holds as many groups with signal as prompts per step, or
        `dynamic_sampling_max_rounds` extra rounds were made (then the remaining places keep
        signal-less groups, so the batch size never changes). Every rank makes as many rounds as
        the rank that needs the most (one collective per round)."""
        cfg, g = self.config, self.config.num_generations
        rollout = sample_and_score(run, rows, state, phase)
        if not cfg.dynamic_sampling:
            return rollout, {}
        target = len(rows)
        parts, rounds = [rollout], 0
        while True:
            signal = sum(int(v) for p in parts for v in groups_with_signal(p.rewards, g))
            if not run.comm.global_max(int(signal < target)) or rounds >= cfg.dynamic_sampling_max_rounds:
                break
            rounds += 1
            more, state.epoch, state.cursor = run.order.next_rows(state.epoch, state.cursor)
            parts.append(sample_and_score(run, more, state, phase, round_=rounds))
        whole = concat_rollouts(parts)
        informative = groups_with_signal(whole.rewards, g).tolist()
        chosen = [i for i, ok in enumerate(informative) if ok][:target]
        filled = len(chosen)
        chosen += [i for i, ok in enumerate(informative) if not ok][:target - filled]
        chosen.sort()  # data order
        batch = whole.select([i * g + k for i in chosen for k in range(g)])
        return batch, {"dynamic_sampling/rounds": float(rounds),
                       "dynamic_sampling/groups_sampled": float(len(informative)),
                       "dynamic_sampling/groups_dropped": float(len(informative) - target),
                       "dynamic_sampling/filled_ratio": filled / max(target, 1)}

    @torch.no_grad()
    def eval_loss(self, run: RunParts, evaluator) -> float:
        """The objective on an eval set, as transformers' eval_loss: `num_generations_eval` (else G)
        samples of every eval prompt, scored, group-relative advantages, the loss without a
        gradient (on-policy, so every ratio is 1; the KL term when beta > 0)."""
        cfg = self.config
        g = cfg.num_generations_eval or cfg.num_generations
        rows = list(range(len(evaluator.prompt_ids)))
        with run.comm.guard("evaluation"), run.generation_context():
            params = run.sampling_params(cfg.seed + 7_919)
            rollout = run.score(evaluator.sampler(run.engine).sample(evaluator.prompts, rows, g, params),
                                evaluator.prompts, group_size=g)
        advantages = group_advantages(rollout.rewards, g, scale_rewards=cfg.scale_rewards,
                                      estimator=cfg.advantage_estimator) if g > 1 else torch.zeros(len(rollout))
        mbs = make_micro_batches(rollout, cfg.per_device_eval_batch_size * g, advantages=advantages,
                                 pad_id=run.pad_id, device=run.device, mask_truncated=cfg.mask_truncated_completions,
                                 packed=run.plan.packed)
        add_fixed_logprobs(run, mbs)
        num_items = sum(mb.completion_mask.sum() for mb in mbs)
        was_training = run.model.training
        run.model.eval()
        try:
            total = 0.0
            for mb in mbs:
                logps = run.forward(mb)[0]
                loss, _ = self.objective(logps, None, mb.advantages, mb.completion_mask, ref_logps=mb.ref_logps,
                                         num_items_in_batch=num_items, num_sequences=float(len(rollout)))
                total += float(loss) / (len(mbs) if self.local_means else 1)
        finally:
            run.model.train(was_training)
        return total

    def sync_reference(self, run: RunParts, global_step: int) -> None:
        """TR-DPO's reference update (TRL's sync_ref_model): every ref_model_sync_steps optimizer
        steps, ref = alpha * policy + (1 - alpha) * ref."""
        cfg = self.config
        if not cfg.sync_ref_model or global_step % cfg.ref_model_sync_steps:
            return
        alpha = cfg.ref_model_mixup_alpha
        with torch.no_grad():
            mine = dict(run.model.named_parameters())
            for name, ref in run.ref_model.named_parameters():
                ref.mul_(1.0 - alpha).add_(mine[name].to(ref.dtype), alpha=alpha)

    def accumulate_gradients(self, run: RunParts, micro_batches, num_items, num_sequences,
                             divisor: int, accumulation: int, events: Events = NO_EVENTS) -> dict[str, torch.Tensor]:
        """Forward + backward of every micro-batch; the loss normalisers cover the whole accumulated,
        all-rank batch, so the summed gradient equals the whole batch's (see algos.losses)."""
        cfg = self.config
        run.model.train()
        totals: dict[str, torch.Tensor] = {}
        want_entropy = cfg.top_entropy_quantile < 1.0 or self.entropy.enabled
        gather = run.comm.gather_values if run.world_size > 1 else None
        for i, mb in enumerate(micro_batches):
            sync = run.no_sync() if i < len(micro_batches) - 1 else nullcontext()
            with sync, run.autocast():
                # through run.train_forward (a DDP/FSDP2-wrapped module), so the gradients are
                # averaged over ranks exactly once, in this backward
                out = run.forward(mb, with_entropy=want_entropy,
                                  **({"router_aux": True} if self.router_aux_coef is not None else {}))
                logps, entropy = out[0], out[1]
                is_weights = None
                if run.plan.sampler_differs and cfg.corrects_sampler():
                    level, mode = cfg.vllm_importance_sampling_mode.split("_")
                    base = mb.old_logps if mb.old_logps is not None else logps.detach()
                    is_weights = rollout_correction_weights(base, mb.sampling_logps, mb.completion_mask, level=level,
                                                            mode=mode, cap=cfg.vllm_importance_sampling_clip_max,
                                                            floor=cfg.vllm_importance_sampling_clip_min)
                # the threshold over this micro-batch of every rank (TRL's)
                entropy_mask = (top_entropy_mask(entropy.detach(), mb.completion_mask, cfg.top_entropy_quantile,
                                                 gather=gather)
                                if cfg.top_entropy_quantile < 1.0 else None)
                loss, stats = self.objective(
                    logps, mb.old_logps, mb.advantages, mb.completion_mask, ref_logps=mb.ref_logps,
                    num_items_in_batch=num_items / run.world_size, num_sequences=num_sequences / run.world_size,
                    is_weights=is_weights, entropy_mask=entropy_mask,
                    sampling_logps=mb.sampling_logps if run.plan.sampler_differs else None)
                loss = loss / divisor
                if entropy is not None:  # computed for the entropy mask or bonus: logged as TRL does
                    stats["entropy"] = (entropy.detach() * mb.completion_mask).sum() / mb.completion_mask.sum().clamp(min=1)
                if self.entropy.enabled:
                    loss, bonus_stats = self.entropy.apply(loss, entropy, mb.completion_mask, entropy_mask,
                                                           accumulation)
                    stats.update(bonus_stats)
                if self.router_aux_coef is not None:  # (0 on the other ranks' padding micro-batches)
                    aux = out[-1] * (1.0 if i < accumulation else 0.0)
                    loss = loss + self.router_aux_coef * aux / accumulation
                    stats["aux_loss"] = aux.detach()
            loss.backward()
            if i < len(micro_batches) - 1:
                events.substep_end()
            weight = mb.completion_mask.sum().detach()
            totals["loss"] = totals.get("loss", 0.0) + loss.detach()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v.detach() * weight
            totals["_tokens"] = totals.get("_tokens", 0.0) + weight
        tokens = totals.pop("_tokens").clamp(min=1)
        return {k: (v if k == "loss" else v / tokens) for k, v in totals.items()}


@dataclass
class EntropyBonus:
    """TRL's entropy bonus: ``loss - coef * H``, ``H`` the mean token entropy of a micro-batch over
    the tokens the policy term trains on, divided by the accumulation steps. Adaptive
    (`use_adaptive_entropy`): the bonus applies only while the last step's all-rank mean entropy is
    at or below `entropy_target` (none before the first measurement), and after each optimizer step
    `coef` moves by `entropy_coef_delta` (up at or below the target, down above), within
    [entropy_coef_min, entropy_coef_max]."""

    coef: float = 0.0
    adaptive: bool = False
    target: float = 0.2
    delta: float = 0.005
    low: float = 0.0
    high: float = 1.0
    last_entropy: float = float("inf")
    window: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg) -> "EntropyBonus":
        return cls(coef=cfg.entropy_coef, adaptive=cfg.use_adaptive_entropy, target=cfg.entropy_target,
                   delta=cfg.entropy_coef_delta, low=cfg.entropy_coef_min, high=cfg.entropy_coef_max)

    @property
    def enabled(self) -> bool:
        return self.coef != 0.0 or self.adaptive

    def apply(self, loss, entropy, mask, entropy_mask, accumulation: int):
        kept = mask.bool() if entropy_mask is None else mask.bool() & entropy_mask
        h = entropy_bonus(entropy, kept)
        coef = self.coef if not self.adaptive or self.last_entropy <= self.target else 0.0
        if self.adaptive:
            stats = torch.stack([torch.where(kept, entropy.detach(), 0.0).sum(), kept.sum().to(entropy.dtype)])
            self.window = stats if self.window is None else self.window + stats
        return loss - coef * h / accumulation, {"entropy_coef": torch.tensor(float(self.coef)),
                                                 "policy_loss": loss.detach()}

    def end_of_optimizer_step(self, run: RunParts, stats: dict) -> None:
        if not self.adaptive or self.window is None:
            return
        total = run.comm.global_sum(self.window)
        world = float(total[0] / total[1].clamp(min=1.0))
        self.coef = (min(self.coef + self.delta, self.high) if world <= self.target
                     else max(self.coef - self.delta, self.low))
        self.last_entropy, self.window = world, None

    def load(self, state: LoopState) -> None:
        saved = state.algorithm.get("entropy")
        if self.adaptive and saved is not None:
            self.coef, self.last_entropy = float(saved["coef"]), float(saved["last_entropy"])

    def save(self, state: LoopState) -> None:
        if self.adaptive:
            state.algorithm["entropy"] = {"coef": self.coef, "last_entropy": self.last_entropy}


def add_fixed_logprobs(run: RunParts, micro_batches: list[MicroBatch]) -> None:
    """Logprobs that stay fixed through the update passes, as the plan says: the old policy's
    (only when num_iterations > 1; the sampler's when they are the same) and the reference's."""
    plan = run.plan
    if plan.old_logps == "current" and plan.reference == "none":
        return
    with torch.no_grad():
        for mb in micro_batches:
            if plan.old_logps == "sampler":
                mb.old_logps = mb.sampling_logps
            elif plan.old_logps == "recomputed":
                mb.old_logps = run.forward(mb)[0]
            if plan.reference != "none":
                with run.reference_context() as ref_forward:
                    mb.ref_logps = ref_forward(mb, temperature=run.temperature, **run.forward_kwargs())[0]


# --------------------------------------------------------------------------------------------
# after every step
# --------------------------------------------------------------------------------------------

def vanished_advantages(rewards: torch.Tensor, advantages: torch.Tensor, g: int) -> str | None:
    """A warning when the step's rewards cannot give the policy a signal: none at all (every
    function returned None), non-finite totals (a reward times its weight overflowed), or groups
    whose rewards differ but whose advantages all came out 0 (rewards so large that the group
    statistics overflow float32)."""
    if rewards.numel() and bool(torch.isnan(rewards).all()):
        return ("every reward function returned None for every completion of this step: no advantage, nothing to "
                "learn from. Check what the reward functions receive (`grpokit rewards test`).")
    finite = torch.isfinite(rewards) | torch.isnan(rewards)  # NaN = no reward applied (by design)
    if not bool(finite.all()):
        return (f"{int((~finite).sum())} weighted reward totals are +-inf (a reward times its weight overflowed "
                "float32); scale the rewards or the reward_weights down.")
    groups, adv = torch.nan_to_num(rewards, nan=0.0).view(-1, g), advantages.view(-1, g)
    spread = groups_with_signal(rewards, g)  # at least two valid rewards that differ
    dead = spread & (adv.abs().amax(1) == 0)
    if bool(dead.any()):
        big = float(groups[dead].abs().max())
        return (f"{int(dead.sum())} of {len(groups)} groups have differing rewards but all-zero advantages "
                f"(rewards up to {big:.3g} overflow the group statistics in float32); scale the rewards down.")
    return None


def end_of_step(run: RunParts, state: LoopState, metrics: dict[str, float], out: StepOutput,
                asked: Requests = NOTHING_ASKED, events: Events = NO_EVENTS) -> dict:
    """Metrics to the trackers, a few samples, the console line, evaluation and checkpoint when
    due or `asked` (by a listener at step_end; every rank does what any rank was asked). Eval
    metrics join `metrics`. Returns what happened: {"logged", "evaluated", "saved"}."""
    cfg, tracker, step = run.config, run.tracker, state.global_step
    if run.world_size > 1:  # the same decisions on every rank: evaluation and saving are collective
        bits = run.comm.global_max(int(asked.log) | int(asked.evaluate) << 1 | int(asked.save) << 2)
        asked = Requests(log=bool(bits & 1), evaluate=bool(bits & 2), save=bool(bits & 4))
    logging_step = step % cfg.logging_steps == 0 or asked.log
    happened: dict[str, Any] = {"logged": logging_step, "evaluated": {}, "saved": None}
    tracker.log(step, metrics)
    tracker.update_progress(step, metrics)
    if out.rollout is not None and cfg.log_completions and (logging_step or step == 1):
        rows = sample_rows(out.rollout, out.per_sample, cfg.num_completions_to_print)
        # at logging steps two are printed: the first and one that scored differently, if any
        other = next((i for i, r in enumerate(rows) if r["reward"] != rows[0]["reward"]), None)
        if other is not None:
            rows.insert(1, rows.pop(other))
        tracker.log_completions(step, rows, print_rows=(2 if other is not None else 1) if logging_step else 0)
    if logging_step:
        tracker.write(_format_line(step, metrics))
        events.logged(run, state, metrics)
    due = cfg.eval_strategy == "steps" and (step % (cfg.eval_steps or cfg.logging_steps) == 0
                                            or step >= run.total_steps)
    if (due or asked.evaluate) and run.evaluation.evaluator is not None:
        happened["evaluated"] = run.log_eval(step, on_batch=events.prediction_step)
        metrics.update(happened["evaluated"])
        events.evaluated(run, state, happened["evaluated"])
    elif asked.evaluate:
        tracker.write(f"step {step}: a callback asked to evaluate (control.should_evaluate), but there is no eval "
                      "set: pass eval_dataset= (or set dataset_test_split).")
    if (cfg.save_strategy == "steps" and (step % cfg.save_steps == 0 or step >= run.total_steps)) or asked.save:
        happened["saved"] = save_run_checkpoint(run, checkpoint_state(run, state)) or os.path.join(cfg.output_dir,
                                                                                       f"checkpoint-{step}")
        events.saved(run, state)
    return happened


def step_metrics(run: RunParts, out: StepOutput, phase: dict, state: LoopState) -> dict[str, float]:
    """Everything logged for one step, reduced across ranks once."""
    local: dict[str, Any] = {}
    rollout = out.rollout
    if rollout is not None:
        # model-written tokens only (tool and environment output is not the model's length), as TRL
        lengths = torch.tensor([len(c) if rollout.segments is None else sum(rollout.trained_mask(i))
                                for i, c in enumerate(rollout.completion_ids)], dtype=torch.float32)
        local.update({
            "reward": torch.nanmean(rollout.rewards), "reward_std": _nanstd(rollout.rewards),
            "completions/mean_length": lengths.mean(), "completions/max_length": lengths.max(),
            "completions/min_length": lengths.min(), "completions/clipped_ratio": rollout.truncated.float().mean(),
            "completions/nonfinite_ratio": (rollout.nonfinite.float().mean() if rollout.nonfinite is not None
                                            else torch.tensor(0.0)),
        })
        for j, name in enumerate(rollout.reward_names):
            local[f"rewards/{name}/mean"] = torch.nanmean(rollout.rewards_per_func[:, j])
            local[f"rewards/{name}/std"] = _nanstd(rollout.rewards_per_func[:, j])
    if "advantage" in out.per_sample:
        local["advantage_abs"] = out.per_sample["advantage"].abs().mean()
    for k in out.step_stats[-1] if out.step_stats else []:
        local[k] = torch.stack([torch.as_tensor(s[k], dtype=torch.float32).cpu() for s in out.step_stats]).mean()
    for k, v in out.extra.items():
        local[k] = v
    metrics = run.comm.reduce_metrics(local) if local else {}
    if rollout is not None:  # all ranks: the mean length over ranks x every rank's completions
        metrics["completions/tokens"] = metrics["completions/mean_length"] * len(rollout) * run.world_size
        metrics.update(run.comm.mean_over_ranks(rollout.logged_metrics))  # a reward's log_metric(name, value)
        metrics.update({k: float(v) for k, v in rollout.reward_stats.items() if k not in metrics and _is_number(v)})
    if rollout is not None and rollout.tool_stats is not None:
        metrics.update(tool_metrics(run, rollout.tool_stats))
    metrics.update(run.pipeline.metrics())
    metrics.update(phase)
    metrics["time/step"] = sum(v for k, v in phase.items() if k.startswith("time/"))
    metrics["memory/peak_rss_gb"] = memory.lifetime_peak_gb("rss")
    if torch.cuda.is_available() and run.device.type == "cuda":
        metrics["memory/peak_cuda_gb"] = memory.lifetime_peak_gb("cuda", run.device)
    metrics["learning_rate"] = run.scheduler.get_last_lr()[0]
    metrics["skipped_steps"] = float(state.skipped_steps)
    metrics["samples"] = float(state.samples_seen)
    metrics["epoch"] = state.epoch + state.cursor / max(1, len(run.train))
    return metrics


def tool_metrics(run: RunParts, stats: ToolStats) -> dict[str, float]:
    """Multi-turn metrics over every rank (TRL's tools/call_frequency: calls per completion;
    tools/failure_frequency: failed calls per call), and grpokit's: timeouts and malformed calls
    (per call and per completion), model turns per completion."""
    sums = stats.sums()
    turns, calls, failures, timeouts, malformed, n = run.comm.global_sum(torch.tensor(
        [sums["turns"], sums["tool_calls"], sums["tool_failures"], sums["tool_timeouts"], sums["malformed_calls"],
         float(len(stats))])).tolist()
    return {"tools/call_frequency": calls / n, "tools/failure_frequency": failures / calls if calls else 0.0,
            "tools/timeout_frequency": timeouts / calls if calls else 0.0, "tools/malformed_frequency": malformed / n,
            "turns/mean": turns / n}


def sample_rows(rollout: Rollout, per_sample: dict[str, torch.Tensor], limit: int | None) -> list[dict[str, Any]]:
    """The first `limit` samples as rows of the completions table."""
    n = len(rollout.completions) if limit is None else min(limit, len(rollout.completions))
    rows = []
    for i in range(n):
        row = {"row": rollout.row_index[i], "prompt": rollout.prompts[i], "completion": rollout.completions[i],
               "reward": _num(rollout.rewards[i])}
        row.update({name: _num(col[i]) for name, col in per_sample.items()})
        row.update({name: col[i] for name, col in rollout.logged_columns.items()})  # a reward's log_extra
        for j, name in enumerate(rollout.reward_names):
            row[name] = _num(rollout.rewards_per_func[i, j])
        rows.append(row)
    return rows


def _format_line(step: int, m: dict[str, float]) -> str:
    keys = ("reward", "loss", "kl", "entropy", "completions/mean_length", "completions/tokens", "grad_norm",
            "time/step")
    return f"step {step}: " + "  ".join(f"{k.split('/')[-1]}={m[k]:.4g}" for k in keys if k in m)


class timed:
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


def _num(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)
