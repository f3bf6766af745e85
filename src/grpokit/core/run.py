"""A run: what it is made of (`RunParts`, a frozen record built once) and the composition root
that builds it (`build_run`) from the set-up builders (core.setup). Nothing is trained or
written before `build_run` returns, and nothing in the record is replaced afterwards; what
changes during training lives in the loop's state (core.loop.LoopState).

The record's few methods are the run-level operations the loop and the algorithms call: sample
(the sampler chosen at start-up, with the non-finite check), score, the training forward as the
plan says, the reference's forward, the optimizer step, evaluation, the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit import distributed
from grpokit.config import TrainingConfig
from grpokit.core import setup
from grpokit.core.events import NO_EVENTS, Events
from grpokit.core.forward import ForwardPlan, choose_forward_plan, completion_logprobs
from grpokit.modeling.info import unwrap
from grpokit.pipeline import InlinePipeline, make_pipeline
from grpokit.data.prompts import PromptSet
from grpokit.rewards.scoring import Scorer
from grpokit.rollout import SamplingParams, capabilities_of
from grpokit.samplers import Sampler, choose_sampler
from grpokit.trajectory import Rollout, Trajectories


@dataclass(frozen=True)
class DataOrder:
    """Which rows each step takes: a seeded permutation per epoch (the stream's own order for a
    stream, or with shuffle_dataset off); the position is (epoch, cursor). Every rank walks the
    same global order and takes its own slice, so groups never cross ranks."""

    num_rows: int
    prompts_per_step: int      # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True

    def next_rows(self, epoch: int, cursor: int) -> tuple[list[int], int, int]:
        """This rank's rows for the next step, and the new (epoch, cursor)."""
        need = self.prompts_per_step * self.world_size
        rows: list[int] = []
        while len(rows) < need:
            order = self.epoch_order(epoch)
            take = order[cursor:cursor + need - len(rows)]
            rows += take
            cursor += len(take)
            if cursor >= len(order):
                epoch, cursor = epoch + 1, 0
        mine = rows[self.rank * self.prompts_per_step:(self.rank + 1) * self.prompts_per_step]
        return mine, epoch, cursor

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()


@dataclass(frozen=True)
class RunParts:
    """Everything a run is made of, built and checked by `build_run`."""

    config: TrainingConfig
    comm: distributed.Collectives        # rank, world size, device, the reductions over ranks
    train: PromptSet                     # the training rows
    order: DataOrder                     # which rows each step takes
    model: Any                           # the policy (the user's model object; LoRA applied)
    tokenizer: Any
    processor: Any                       # a vision-language model's processor (its tokenizer is `tokenizer`)
    model_name: str
    is_peft: bool
    ref_model: Any                       # the frozen reference copy (beta > 0 without LoRA), else None
    # the training forward (core.forward.completion_logprobs) as a module: DDP- or FSDP2-wrapped
    # under torchrun, so every logprob forward goes through it; `model` stays the user's model
    train_forward: Any
    ref_forward: Any                     # the frozen reference copy's forward, or None
    plan: ForwardPlan                    # how the training forward runs
    engine: Any                          # the rollout engine (sampling, evaluation, weight sync)
    sampler: Sampler                     # how a step samples (single-turn, multi-turn, rollout_func)
    scorer: Scorer                       # the reward functions and what they are given
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    tracker: Any
    evaluation: setup.Evaluation
    multiturn: Any = None                # grpokit.envs.MultiTurn (tools / environments), or None
    image_features: Any = None           # a VLM's image features, encoded once a step (modeling.vision.ImageFeatures)
    pipeline: Any = field(default_factory=InlinePipeline)  # where rollouts are sampled (grpokit.pipeline:
                                                           # here, or by a generation worker process)
    extra_modules: tuple = ()            # trained with the policy (PPO's value head)
    strategy: str = "ddp"                # distributed_strategy in effect (ddp | fsdp2)
    task_name: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    # ---- the parts' facts ----
    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def device(self) -> torch.device:
        return self.comm.device

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2" and self.comm.world_size > 1

    @property
    def temperature(self) -> float:
        """The sampling temperature (generation_kwargs' over the field's): logprobs are taken at it."""
        return self.config.sampling()["temperature"]

    # ---- sampling and scoring ----
    def sampling_params(self, seed: int | None) -> SamplingParams:
        s = self.config.sampling()  # the fields, with generation_kwargs over them
        return SamplingParams(max_tokens=s["max_completion_length"], temperature=s["temperature"], top_p=s["top_p"],
                              top_k=s["top_k"], min_p=s["min_p"] or 0.0, stop=s["stop"],
                              repetition_penalty=s["repetition_penalty"], seed=seed)

    def sampling_seed(self, global_step: int, round_: int = 0) -> int:
        """The sampling seed of a step: `seed + 1_000_003 * global_step + world_size * round_ + rank`
        (round_: dynamic sampling's extra rounds), so a resumed run samples what the straight run did."""
        return self.config.seed + 1_000_003 * global_step + self.world_size * round_ + self.comm.rank

    def sample(self, rows: list[int], seed: int) -> Trajectories:
        """G trajectories for each of `rows` (this rank's training rows), sampled with `seed`, where
        the pipeline samples (here, or by the generation worker)."""
        return self.pipeline.sample(self, rows, seed)

    def sample_here(self, rows: list[int], seed: int) -> Trajectories:
        """`sample` in this process. Samples whose sampler logprobs are NaN/inf are flagged (never
        trained on), or raise."""
        with self.generation_context():
            traj = self.sampler.sample(self.train, rows, self.config.num_generations, self.sampling_params(seed))
        nonfinite = torch.tensor([not all(map(math.isfinite, lps)) for lps in traj.sampling_logps], dtype=torch.bool)
        if bool(nonfinite.any()) and self.config.on_nonfinite == "raise":
            raise FloatingPointError(f"{int(nonfinite.sum())} of {len(traj)} completions were sampled from NaN/inf "
                                     "logits (the model's weights or inputs are broken); set on_nonfinite='skip' "
                                     "to leave such samples out of the update instead.")
        return dataclasses.replace(traj, nonfinite=nonfinite) if bool(nonfinite.any()) else traj

    def score(self, trajectories: Trajectories, prompts: PromptSet | None = None,
              group_size: int | None = None) -> Rollout:
        """The trajectories with their rewards; `prompts`: the rows they index (default: training's);
        `group_size`: samples per prompt (default num_generations)."""
        return self.scorer.score(trajectories, self.train if prompts is None else prompts,
                                 group_size or self.config.num_generations)

    # ---- forwards ----
    def forward_kwargs(self) -> dict[str, Any]:
        """What every forward of this run passes besides the micro-batch: the plan's choices and
        the step's image-feature cache (owned here, cleared by the sampler at each step)."""
        return {**self.plan.forward_kwargs(), "image_features": self.image_features}

    def forward(self, mb, **kw):
        """The training forward of a micro-batch, as the plan says (logps, entropy[, values])."""
        return self.train_forward(mb, **{"temperature": self.temperature, **self.forward_kwargs(), **kw})

    def generation_context(self):
        """FSDP2: every parameter gathered while generating (see distributed.full_parameters)."""
        return distributed.full_parameters(self.train_forward)

    @contextlib.contextmanager
    def reference_context(self):
        """The reference policy's logprob forward: the training forward with the adapter off
        (LoRA), else the frozen copy's."""
        if self.is_peft:
            from grpokit.models import reference_logits_context

            with reference_logits_context(self.model):
                yield self.train_forward
        else:
            yield self.ref_forward

    def no_sync(self):
        return distributed.no_sync(self.train_forward)

    def autocast(self):
        return contextlib.nullcontext()

    # ---- optimisation ----
    def optimizer_step(self, events: Events = NO_EVENTS) -> tuple[bool, torch.Tensor]:
        """Clip, check, step (events: pre_optimizer_step after the clip, optimizer_step after the
        step, before the gradients are zeroed, as transformers' Trainer). A non-finite gradient
        norm skips the update (or raises)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.detach().float().cpu()
        applied = bool(torch.isfinite(grad_norm))
        if not applied and self.config.on_nonfinite == "raise":
            raise FloatingPointError(f"non-finite gradient norm ({float(grad_norm)}); set on_nonfinite='skip' "
                                     "to skip such steps instead.")
        events.pre_optimizer_step()
        if applied:
            self.optimizer.step()
        events.optimizer_step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if applied:
            self.engine.update_weights(self.model)
        self.pipeline.weights_changed(self)
        return applied, grad_norm

    # ---- evaluation, the end ----
    def log_eval(self, step: int, evaluator=None, on_batch=None) -> dict[str, float]:
        """Greedy accuracy on the eval set (or `evaluator`'s), logged; `on_batch()` after each batch."""
        evaluator = evaluator if evaluator is not None else self.evaluation.evaluator
        if evaluator is None:
            return {}
        # an engine's state between calls (its drafter's memory) is the training's: evaluation leaves it as it was
        kept = self.engine.state_dict() if capabilities_of(self.engine).keeps_state else None
        try:
            with self.comm.guard("evaluation"), self.generation_context():
                metrics = evaluator.greedy(self.engine, batch_size=self.config.per_device_eval_batch_size,
                                           on_batch=on_batch)
        finally:
            if kept is not None:
                self.engine.load_state_dict(kept)
        self.tracker.log(step, metrics)
        self.tracker.write(f"eval @ step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    def finish(self) -> None:
        """The final model, the plot, the tools' workers."""
        import os

        from grpokit.checkpoint.runs import save_final_model

        save_final_model(self, os.path.join(self.config.output_dir, "final"))
        self.tracker.close(plot=self.config.plot)
        if self.multiturn is not None:
            self.multiturn.close()

    def summary(self) -> str:
        c = self.config
        g, w = c.num_generations, self.comm.world_size
        completions = c.per_device_train_batch_size * c.gradient_accumulation_steps * w
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        lines = [
            f"grpokit: {self.model_name} on {self.device} ({next(self.model.parameters()).dtype}), "
            f"{n_train:,} trainable of {n_all:,} parameters{' (LoRA)' if self.is_peft else ''}",
            f"  data: {len(self.train)} prompts{f' (task {self.task_name})' if self.task_name else ''}; "
            f"rewards: {', '.join(self.scorer.runner.names)}",
            f"  per step: {completions // g} prompts x G={g} = {completions} completions on {w} rank(s)"
            f"{f' ({self.strategy})' if w > 1 else ''}, "
            f"{c.gradient_accumulation_steps} micro-batch(es) of {c.per_device_train_batch_size}; "
            f"<= {completions * c.max_completion_length:,} completion tokens",
            f"  {self.total_steps} optimizer steps; {c.objective_summary()}",
        ] + [f"  {line}" for line in self.plan.describe()]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


# --------------------------------------------------------------------------------------------

def build_run(cfg: TrainingConfig, *, model=None, reward_funcs=None, train_dataset=None, eval_dataset=None,
              tokenizer=None, peft_config=None, optimizers=(None, None), quantization_config=None,
              rows_per_step_factor: int = 1, updates_per_batch: int = 1,
              optimizer_steps_per_step: int = 1, needs_reference: bool | None = None,
              make_extra_modules=None, forward_plan: dict | None = None, tools=None, environment_factory=None,
              rollout_func=None) -> RunParts:
    """Load and check everything; nothing is trained or written before this returns.

    GRPO with TRL's steps_per_generation: a step samples `rows_per_step_factor` generation
    batches' worth of prompts at once and makes `updates_per_batch` optimizer steps on them (per
    update pass); `total_steps` counts those optimizer steps.
    For the baselines: a step takes `rows_per_step_factor` times GRPO's prompts (PPO's
    mini-batches) and makes `optimizer_steps_per_step` optimizer steps (the LR schedule spans
    them); `needs_reference` (default: beta > 0) loads the reference; `make_extra_modules(policy,
    device)` makes modules trained with the policy (PPO's value head; their own optimizer parameter
    group), in `RunParts.extra_modules`. `forward_plan` overrides parts of the training forward's
    plan (core.forward.choose_forward_plan). `tools`, `environment_factory` (TRL's): multi-turn
    rollouts (grpokit.envs); `rollout_func(prompts)` -> TRL's dict (prompt_ids, completion_ids,
    logprobs, [env_mask], extra columns) replaces sampling."""
    from grpokit.tracking import Tracker

    _seed_everything(cfg.seed)
    rank, world = distributed.init_distributed(use_cpu=cfg.use_cpu, timeout_s=cfg.ddp_timeout)  # torchrun
    comm = distributed.Collectives(rank=rank, world_size=world, device=distributed.device_for(cfg.use_cpu))
    if world > 1 and cfg.distributed_strategy == "fsdp2" and cfg.use_vllm:
        raise ValueError("distributed_strategy='fsdp2' with use_vllm=True is not supported; use ddp.")
    pipeline = make_pipeline(cfg, rank=rank)
    if comm.device.type != "cpu" and not isinstance(pipeline, InlinePipeline):
        raise ValueError(f"max_staleness on {comm.device.type}: the generation worker is a process forked from the "
                         "trainer and samples on the CPU; on a GPU set max_staleness=None (docs/async.md says what a "
                         "GPU worker needs).")
    if world > 1 and cfg.distributed_strategy == "fsdp2" and not isinstance(pipeline, InlinePipeline):
        raise ValueError("max_staleness (a generation worker) with distributed_strategy='fsdp2' is not supported: "
                         "the worker needs whole weights; use ddp, or max_staleness=None.")
    if cfg.syncs_reference() and world > 1 and cfg.distributed_strategy == "fsdp2":
        raise ValueError("sync_ref_model=True is not supported with distributed_strategy=fsdp2 yet; use ddp.")
    sources = setup.resolve_sources(cfg, train_dataset, eval_dataset, tools=tools,
                                    environment_factory=environment_factory,
                                    rows_per_step_factor=rows_per_step_factor, updates_per_batch=updates_per_batch)
    dataset = sources.train_dataset
    image_column = next((c for c in ("images", "image") if c in dataset.column_names), None)
    needs_reference = cfg.penalises_reference() if needs_reference is None else needs_reference
    models = setup.load_models(cfg, model, tokenizer, task=sources.task, device=comm.device, image_column=image_column,
                               quantization_config=quantization_config, peft_config=peft_config,
                               needs_reference=needs_reference)
    multiturn = setup.build_multiturn(cfg, sources, models, rollout_func=rollout_func)
    notes = list(models.notes) + setup.run_notes(cfg, multiturn=multiturn, streamed=sources.streamed)
    elsewhere = ("tools / environment_factory" if multiturn is not None else
                 "rollout_func" if rollout_func is not None else "use_vllm=True" if cfg.use_vllm else None)
    train = setup.encode_prompts(cfg, dataset, models, multiturn, samples_elsewhere=elsewhere)
    runner = setup.build_rewards(cfg, reward_funcs, task=sources.task, multiturn=multiturn,
                                 columns=set(dataset.column_names), more_columns_later=rollout_func is not None)
    notes += runner.preflight()  # a judge's reliability gate: figures in the summary, or a refusal here
    engine = setup.build_engine(cfg, models, images=train.vision is not None, notes=notes)
    policy = models.policy
    # several ranks: the training forward wrapped in DDP or FSDP2 (which replaces the parameters
    # by shards, so the optimizer is made after it)
    train_forward = distributed.wrap_for_training(policy, cfg.distributed_strategy, comm.device,
                                                  fn=completion_logprobs)
    ref_forward = (distributed.wrap_for_training(models.ref_model, cfg.distributed_strategy, comm.device,
                                                 fn=completion_logprobs, frozen=True)
                   if models.ref_model is not None else None)
    extra_modules = tuple(make_extra_modules(policy, comm.device)) if make_extra_modules is not None else ()
    optim = setup.build_optimization(cfg, policy, optimizers, extra_modules=extra_modules, device=comm.device,
                                     world=world, num_rows=len(train), rows_per_step_factor=rows_per_step_factor,
                                     updates_per_batch=updates_per_batch,
                                     optimizer_steps_per_step=optimizer_steps_per_step)
    evaluation = setup.build_evaluation(cfg, sources.eval_dataset, tokenizer=models.tokenizer, task=sources.task,
                                        reward_runner=runner, multiturn=multiturn, processor=models.processor)
    plan = choose_forward_plan(cfg, policy, engine, world_size=world, is_peft=models.is_peft,
                               needs_reference=needs_reference, overrides=forward_plan,
                               external_sampler=rollout_func is not None,
                               tool_images=multiturn is not None and models.vlm)
    if rollout_func is not None:
        notes.append(_rollout_func_note(cfg, plan))
    if pipeline.describe():
        notes.append(pipeline.describe())
    image_features = None
    if models.vlm:
        from grpokit.modeling.vision import ImageFeatures

        image_features = ImageFeatures()
    sampler = choose_sampler(engine, multiturn=multiturn, rollout_func=rollout_func, tokenizer=models.tokenizer,
                             image_features=image_features,
                             vocab_size=unwrap(policy).get_input_embeddings().num_embeddings)
    tracker = Tracker(cfg.output_dir, report_to=tuple(cfg.report_to) or ("jsonl",), config=cfg.to_dict(),
                      total_steps=optim.total_steps, is_main_process=rank == 0, run_name=cfg.run_name,
                      disable_progress=cfg.disable_tqdm, overwrite=cfg.overwrite_output_dir)
    order = DataOrder(num_rows=len(train), prompts_per_step=optim.prompts_per_step, rank=rank, world_size=world,
                      seed=cfg.seed, shuffle=cfg.shuffle_dataset and not sources.streamed)
    return RunParts(config=cfg, comm=comm, train=train, order=order, model=policy, tokenizer=models.tokenizer,
                    processor=models.processor, model_name=models.name, is_peft=models.is_peft,
                    ref_model=models.ref_model, train_forward=train_forward, ref_forward=ref_forward, plan=plan,
                    engine=engine, sampler=sampler, scorer=Scorer(runner), optimizer=optim.optimizer,
                    scheduler=optim.scheduler, total_steps=optim.total_steps, tracker=tracker, evaluation=evaluation,
                    multiturn=multiturn, image_features=image_features, pipeline=pipeline,
                    extra_modules=extra_modules,
                    strategy=cfg.distributed_strategy, task_name=sources.task.name if sources.task else None,
                    notes=tuple(notes))


def _rollout_func_note(cfg: TrainingConfig, plan: ForwardPlan) -> str:
    """The summary's line on where a rollout_func's log-probs go."""
    uses = {"sampler": "its log-probs stand in for the old policy's (forward_plan old_logps='sampler': declared "
                       "the trainer's own)",
            "recomputed": "the old policy's log-probs come from the trainer's forward",
            "current": "on-policy, the old policy's log-probs are the current ones"}[plan.old_logps]
    if plan.sampler_differs and cfg.corrects_sampler():
        uses += "; its log-probs feed the importance-sampling correction"
    return f"rollout: rollout_func (yours) samples the completions; {uses}."


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
