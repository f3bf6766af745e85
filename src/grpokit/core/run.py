"""Everything a run needs, built and validated before the first step (`build_run`), and the small
operations the loop (grpokit.core.loop) calls on it (sample and score, optimizer step, eval,
checkpoint). Nothing here is changed after `build_run` returns: an algorithm that needs more
rows per step, more optimizer steps per step, a reference or extra trained parameters says so to
`build_run`.

Bad input fails here, with a message naming the field and the fix: config, dataset columns,
reward signatures, prompts longer than the context, missing chat template, empty dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit import distributed
from grpokit.config import GRPOConfig
from grpokit.core.events import NO_EVENTS, Events
from grpokit.core.forward import ForwardPlan, choose_forward_plan, unwrap
from grpokit.core.trajectory import EXTERNAL, MODEL, Rollout, Segment, Trajectories
from grpokit.core.vision import ImageFeatures
from grpokit.rollout import SamplingParams, capabilities_of, make_engine


class RewardContext:
    """What reward functions receive besides the data, as TRL gives it: `trainer_state` (the
    trainer's TrainerState, set by the trainer facade; None without one), `log_metric(name,
    value)` (a scalar, averaged over the step's calls, logged with the step) and
    `log_extra(column, values)` (a column of the completions table, one value per completion)."""

    def __init__(self):
        self.trainer_state = None
        self._metrics: dict[str, list[float]] = {}
        self._columns: dict[str, list] = {}

    def log_metric(self, name: str, value: float) -> None:
        self._metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values) -> None:
        self._columns.setdefault(str(column), []).extend(list(values))

    def extras(self) -> dict[str, Any]:
        return {"trainer_state": self.trainer_state, "log_metric": self.log_metric, "log_extra": self.log_extra}

    def take(self, n: int) -> tuple[dict[str, float], dict[str, list]]:
        """This step's logged metrics (means) and columns (padded with None to n values); cleared."""
        metrics = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
        columns = {k: (v + [None] * n)[:n] for k, v in self._columns.items()}
        self._metrics, self._columns = {}, {}
        return metrics, columns


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint, restored on resume."""

    global_step: int = 0        # optimizer steps made (GRPO), or steps (PPO/DPO: one batch each)
    epoch: int = 0              # dataset position: (epoch, cursor) in the seeded order of that epoch
    cursor: int = 0
    skipped_steps: int = 0      # optimizer steps skipped for a non-finite gradient
    samples_seen: int = 0       # completions (or pairs) consumed, all ranks
    algorithm: dict = dataclasses.field(default_factory=dict)
    """The algorithm's own state across steps (GRPO: the adaptive entropy coefficient, a synced
    reference's weights), saved with the checkpoint."""

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "algorithm"}
        if self.algorithm:
            out["algorithm"] = dict(self.algorithm)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LoopState":
        ints = {f.name: int(d[f.name]) for f in dataclasses.fields(cls) if f.name in d and f.name != "algorithm"}
        return cls(**ints, algorithm=dict(d.get("algorithm") or {}))


class RunFacade:
    """What the TRL-style trainer classes share over their `RunParts` (`self.parts`): the model,
    the processing class, and transformers' Trainer surface (`state`, callbacks, `evaluate()`)."""

    parts: "RunParts"
    surface: Any = None

    def _init_surface(self, callbacks, eval_dataset) -> None:
        from grpokit.core.callbacks import TrainerSurface

        self.surface = TrainerSurface(self.parts, callbacks)
        self.eval_dataset = eval_dataset if eval_dataset is not None else self.parts.eval_dataset
        self.surface.init_end()

    @property
    def state(self):
        """transformers' `TrainerState`: global_step, epoch, log_history, max_steps, ..."""
        return self.surface.state

    def add_callback(self, callback) -> None:
        self.surface.add_callback(callback)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy accuracy on the eval set now, or on `eval_dataset` (one set or a mapping of named
        sets), as transformers' `Trainer.evaluate`: metrics named `<metric_key_prefix>/...`
        (`eval_<name>/...` per named set), and for GRPO `eval_loss` (`eval_<name>_loss`), the
        objective on G fresh samples of each eval prompt; they also go to the logs and
        `state.log_history`."""
        evaluator = self.parts.eval_fn if eval_dataset is None else self.parts.make_evaluator(eval_dataset)
        if evaluator is None:
            raise ValueError(f"{type(self).__name__}.evaluate(): there is no eval set; pass eval_dataset= (or "
                             "set dataset_test_split, or use a built-in task).")
        metrics = self.parts.log_eval(step=self.state.global_step, evaluator=evaluator,
                                      on_batch=self.surface.prediction_step)
        eval_loss = getattr(getattr(self, "algorithm", None), "eval_loss", None)
        if eval_loss is not None:  # transformers' eval_loss (eval_<name>_loss per named set): GRPO's loss there
            named = getattr(evaluator, "evaluators", None)
            for name, one in (named.items() if named else [(None, evaluator)]):
                metrics["eval_loss" if name is None else f"eval_{name}_loss"] = eval_loss(self.parts, one)
        if metric_key_prefix != "eval":
            metrics = {metric_key_prefix + k[len("eval"):] if k.startswith("eval") else k: v for k, v in metrics.items()}
        metrics = {k: v for k, v in metrics.items() if not ignore_keys or k.split("/")[-1] not in ignore_keys}
        self.state.log_history.append({**metrics, "step": self.state.global_step})
        return metrics

    @property
    def model(self):
        return self.parts.model

    @property
    def processing_class(self):
        return self.parts.processor if self.parts.processor is not None else self.parts.tokenizer

    def _take_args(self, config_cls, args, kwargs: dict) -> None:
        """`self.args`: `args`, or `config_cls()` when None; an unknown keyword argument or a config
        of another class is an error naming it."""
        owner = type(self).__name__
        if kwargs:
            raise TypeError(f"{owner} got unsupported arguments: {', '.join(sorted(kwargs))}")
        self.args = args if args is not None else config_cls()
        if not isinstance(self.args, config_cls):
            got = type(self.args)
            raise TypeError(f"{owner} needs a grpokit.{config_cls.__name__}, got {got.__module__}.{got.__qualname__} "
                            f"(from grpokit import {config_cls.__name__}: TRL's field names).")


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
    eval_fn: Any = None              # evaluation.Evaluator, NamedEvaluators (several eval sets) or None
    make_evaluator: Any = None       # eval dataset(s) -> an evaluator like eval_fn (Trainer.evaluate(eval_dataset))
    ref_model: Any = None
    is_peft: bool = False
    rank: int = 0
    world_size: int = 1
    pad_id: int = 0
    task_name: str | None = None
    streamed: bool = False           # the training rows came from a streaming IterableDataset
    model_name: str = ""
    notes: list[str] = field(default_factory=list)
    # the training forward (core.forward.completion_logprobs) as a module: DDP- or FSDP2-wrapped
    # under torchrun, so every logprob forward goes through it; `model` stays the user's model
    train_forward: Any = None
    ref_forward: Any = None          # the frozen reference copy's forward (beta > 0 without LoRA)
    strategy: str = "ddp"            # distributed_strategy in effect (ddp | fsdp2)
    plan: ForwardPlan | None = None  # how the training forward runs: build_run's choose_forward_plan
    extra_modules: tuple = ()        # trained with the policy (PPO's value head)
    reward_context: RewardContext = field(default_factory=RewardContext)  # trainer_state, log_metric, log_extra
    multiturn: Any = None            # grpokit.envs.MultiTurn: tools / environments (None: single-turn)
    rollout_func: Any = None         # TRL's rollout_func bound to its trainer: prompts -> dict (replaces sampling)
    vision: list | None = None       # per dataset row: its images' processor tensors (VisionInputs) or None
    image_features: Any = None       # grpokit.core.vision.ImageFeatures: each prompt's images encoded once a step
    processor: Any = None            # a vision-language model's processor (processing_class); tokenizer = its text part
    latest_step: tuple | None = None  # the latest step's (rollout, per-sample columns), for trainer._logs
    _generate_engine: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.train_forward is None:
            self.train_forward = distributed.TrainingForward(self.model)
        if self.ref_forward is None and self.ref_model is not None:
            self.ref_forward = distributed.TrainingForward(self.ref_model)

    def forward(self, mb, **kw):
        """The training forward of a micro-batch, as the plan says (logps, entropy[, values])."""
        return self.train_forward(mb, **{"temperature": self.temperature, **self.plan.forward_kwargs(), **kw})

    @property
    def num_train_rows(self) -> int:
        return len(self.prompt_ids)

    def begin(self, resume_from_checkpoint: str | bool | None) -> LoopState:
        """The loop's start: its state (fresh, or from the checkpoint)."""
        if self.multiturn is not None and self.multiturn.environments is not None:  # every row's environment exists
            self.multiturn.environments.check_rows(self.columns.get("environment", [None] * self.num_train_rows))
        with self.guard("checking output_dir"):  # rank 0 refuses to mix with another run's files: every rank stops
            self.tracker.begin(resuming=bool(resume_from_checkpoint))
        return self.resume(resume_from_checkpoint) if resume_from_checkpoint else LoopState()

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
        if not self.config.shuffle_dataset or self.streamed:  # a stream is read in its own order
            return list(range(n))
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    # ---- sampling and scoring ----
    @property
    def temperature(self) -> float:
        """The sampling temperature (generation_kwargs' over the field's): logprobs are taken at it."""
        return self.config.sampling()["temperature"]

    def sampling_params(self, seed: int | None, *, temperature: float | None = None) -> SamplingParams:
        s = self.config.sampling()  # the fields, with generation_kwargs over them
        return SamplingParams(max_tokens=s["max_completion_length"],
                              temperature=s["temperature"] if temperature is None else temperature,
                              top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"] or 0.0, stop=s["stop"],
                              repetition_penalty=s["repetition_penalty"], seed=seed)

    def sample(self, rows: list[int], seed: int, data=None, n: int | None = None) -> Trajectories:
        """G (or `n`) trajectories for each of `rows` (this rank's prompts; of `data`, an eval set's
        Evaluator, when given), sampled with `seed`: one completion each, or whole conversations
        with tools / environments (grpokit.envs), or what rollout_func returns."""
        g = n or self.config.num_generations
        src = data if data is not None else self
        params = self.sampling_params(seed)
        engine = self.rollout_engine()
        with self.generation_context():
            if self.rollout_func is not None and data is None:
                traj = self._sample_with_rollout_func(rows, g)
            elif self.multiturn is not None:
                row_dicts = [self.row(r) if data is None else data.rows[r] for r in rows]
                from grpokit.data import encode_prompt

                traj, _ = self.multiturn.rollout(
                    engine, row_dicts, g, params, max_tokens=params.max_tokens,
                    encode=lambda prompt, kw: encode_prompt(prompt, self.tokenizer, kw))
                traj = dataclasses.replace(traj, row_index=[rows[i] for i in traj.row_index])
            else:
                vision = self.vision if data is None else getattr(data, "vision", None)
                images = {}
                if vision is not None and self.image_features is not None:
                    self.image_features.clear()  # new weights since the last step
                    images = {"images": [vision[r] for r in rows], "image_features": self.image_features}
                outs = engine.generate([src.prompt_ids[r] for r in rows], n=g, params=params, **images)
                row_index = [rows[o.prompt_index] for o in outs]
                traj = Trajectories(
                    row_index=row_index, prompts=[src.prompts[r] for r in row_index],
                    completions=[[{"role": "assistant", "content": o.text}] if src.conversational else o.text
                                 for o in outs],
                    prompt_ids=[src.prompt_ids[r] for r in row_index],
                    completion_ids=[list(o.token_ids) for o in outs], sampling_logps=[list(o.logprobs) for o in outs],
                    truncated=torch.tensor([o.finish_reason == "length" for o in outs], dtype=torch.bool),
                    images=[vision[r] for r in row_index] if vision is not None else None)
        nonfinite = torch.tensor([not all(map(math.isfinite, lps)) for lps in traj.sampling_logps], dtype=torch.bool)
        if bool(nonfinite.any()) and self.config.on_nonfinite == "raise":
            raise FloatingPointError(f"{int(nonfinite.sum())} of {len(traj)} completions were sampled from NaN/inf "
                                     "logits (the model's weights or inputs are broken); set on_nonfinite='skip' "
                                     "to leave such samples out of the update instead.")
        return dataclasses.replace(traj, nonfinite=nonfinite) if bool(nonfinite.any()) else traj

    def row(self, r: int) -> dict:
        """Dataset row r as a dict (prompt and every other column)."""
        return {"prompt": self.prompts[r], **{k: v[r] for k, v in self.columns.items()}}

    def rollout_engine(self):
        """The engine `sample` uses: grpokit's, or transformers' generate through a replaced
        `model.generate` (see follow_model_generate)."""
        return self._generate_engine if self._generate_engine is not None else self.engine

    def follow_model_generate(self) -> None:
        """As TRL, which always samples through `model.generate`: when `generate` was replaced on
        the model instance (a wrapper of yours, a test's mock), the run samples through it
        (transformers' generate path), and the old policy's log-probs are then recomputed by the
        trainer (that generate's scores are not known to be the trainer's). Decided at the start of
        train(), before the summary, by the trainers."""
        caps = capabilities_of(self.engine)  # only an engine sampling the trainer's module itself, not through generate
        if caps.uses_model_generate or caps.sampler_differs_from_trainer or not _overrides_generate(self.model):
            self._generate_engine = None
            return
        if self._generate_engine is None:
            self._generate_engine = make_engine("hf-generate", self.model, self.tokenizer,
                                                generation_kwargs=self.config.extra_generation_kwargs())
            self.notes.append("rollout: the model's own generate() was replaced: sampling through it (transformers' "
                              "generate path) instead of grpokit's engine.")
        if self.plan is not None and self.plan.old_logps == "sampler":
            self.plan = dataclasses.replace(self.plan, old_logps="recomputed")

    def _sample_with_rollout_func(self, rows: list[int], g: int) -> Trajectories:
        """TRL's rollout_func: called with the step's prompts (each G times); returns prompt_ids,
        completion_ids and logprobs per completion, optionally env_mask (1 model token, 0 external)
        and extra fields, which reach the reward functions as columns."""
        row_index = [r for r in rows for _ in range(g)]
        prompts = [self.prompts[r] for r in row_index]
        out = self.rollout_func(prompts)
        required = {"prompt_ids", "completion_ids", "logprobs"}
        if not isinstance(out, dict) or required - set(out):
            missing = sorted(required - set(out)) if isinstance(out, dict) else sorted(required)
            raise ValueError(f"rollout_func must return keys {missing} in its output dict.")
        n = len(prompts)
        for key in required | ({"env_mask"} & set(out)):
            if out[key] is not None and len(out[key]) != n:
                raise ValueError(f"rollout_func returned {len(out[key])} {key} for {n} prompts (one per completion: "
                                 "each prompt comes G times).")
        completion_ids = [list(map(int, c)) for c in out["completion_ids"]]
        prompt_ids = [list(map(int, p)) for p in out["prompt_ids"]]
        vocab = unwrap(self.model).get_input_embeddings().num_embeddings
        for key, seqs in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
            bad = next(((i, t) for i, seq in enumerate(seqs) for t in seq if not 0 <= t < vocab), None)
            if bad is not None:
                raise ValueError(f"rollout_func returned token id {bad[1]} in {key}[{bad[0]}]; the model's vocabulary "
                                 f"has ids 0..{vocab - 1} (tokenize with the trainer's processing_class).")
        if out["logprobs"] is not None:
            for i, (lp, c) in enumerate(zip(out["logprobs"], completion_ids)):
                if len(lp) != len(c):
                    raise ValueError(f"rollout_func: logprobs[{i}] has {len(lp)} values for {len(c)} completion "
                                     "tokens (one log-prob per completion token).")
        logps = out["logprobs"] or [[0.0] * len(c) for c in completion_ids]
        segments = None
        if out.get("env_mask") is not None:
            segments = [_segments_of_mask(list(m), len(c), i) for i, (m, c) in enumerate(zip(out["env_mask"],
                                                                                            completion_ids))]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        eos = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id} | set(getattr(self.engine, "eos_ids", ()))
        extra = {k: list(v) for k, v in out.items() if k not in required | {"env_mask"}}
        return Trajectories(
            row_index=row_index, prompts=prompts,
            completions=[[{"role": "assistant", "content": t}] if self.conversational else t for t in texts],
            prompt_ids=prompt_ids, completion_ids=completion_ids,
            sampling_logps=[[float(x) for x in lp] for lp in logps],
            truncated=torch.tensor([not c or c[-1] not in eos for c in completion_ids], dtype=torch.bool),
            segments=segments, extra_columns=extra or None)

    def score(self, trajectories: Trajectories, data=None) -> Rollout:
        """The trajectories with their rewards (every reward function, weighted total, statistics);
        `data`: the eval set (an Evaluator) the trajectories' rows index."""
        if data is None:
            cols = {k: [v[r] for r in trajectories.row_index] for k, v in self.columns.items()}
        else:
            cols = {k: [data.rows[r][k] for r in trajectories.row_index] for k in data.rows[0] if k != "prompt"}
        cols.update(trajectories.extra_columns or {})
        extras = self.reward_context.extras()
        envs = self.multiturn.last_environments if self.multiturn is not None else None
        if envs:
            extras["environments"] = envs
        out = self.reward_runner(trajectories.prompts, trajectories.completions,
                                 completion_ids=trajectories.completion_ids, columns=cols, extras=extras)
        metrics, columns = self.reward_context.take(len(trajectories))
        return trajectories.scored(out.per_func, out.total, out.names, out.stats, metrics, columns)

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
        return applied, grad_norm

    def no_sync(self):
        return distributed.no_sync(self.train_forward)

    def guard(self, what: str):
        """If this phase raises on any rank, every rank raises naming it (distributed.rank_guard)."""
        return distributed.rank_guard(what, self.device if self.device.type == "cuda" else None)

    def autocast(self):
        return contextlib.nullcontext()

    def global_sum(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32, device=self.device).detach().clone()
        if self.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def gather_values(self, values: torch.Tensor) -> torch.Tensor:
        """The 1-D `values` of every rank, concatenated in rank order (ranks may hold different counts)."""
        if self.world_size == 1:
            return values
        values = values.detach().reshape(-1)
        longest = self.global_max(values.numel())
        padded = torch.zeros(longest, dtype=values.dtype, device=values.device)
        padded[:values.numel()] = values
        counts = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(self.world_size)]
        torch.distributed.all_gather(counts, torch.tensor([values.numel()], dtype=torch.int64, device=values.device))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([part[:int(n)] for part, n in zip(parts, counts)])

    def global_max(self, n: int) -> int:
        x = torch.tensor([int(n)], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return int(x)

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Means over the ranks that have each name (a reward may log a metric on some ranks only:
        the names are gathered first, so every rank reduces the same vector)."""
        if self.world_size == 1:
            return dict(values)
        names: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(names, sorted(values))
        union = sorted({n for ns in names for n in ns})
        if not union:
            return {}
        pairs = torch.tensor([[values.get(n, 0.0), 1.0 if n in values else 0.0] for n in union], device=self.device)
        torch.distributed.all_reduce(pairs)
        return {n: float(s / c) for n, (s, c) in zip(union, pairs.cpu().tolist()) if c}

    def reduce_metrics(self, local: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(local)
        vec = torch.stack([torch.as_tensor(local[k], dtype=torch.float32).detach().cpu().reshape(()) for k in keys])
        if self.world_size > 1:
            vec = vec.to(self.device)
            torch.distributed.all_reduce(vec)
            vec = (vec / self.world_size).cpu()
        return {k: float(v) for k, v in zip(keys, vec)}

    # ---- eval, checkpoints, end ----
    def log_eval(self, step: int, evaluator=None, on_batch=None) -> dict[str, float]:
        """Greedy accuracy on the eval set (or `evaluator`'s), logged; `on_batch()` after each batch."""
        evaluator = evaluator if evaluator is not None else self.eval_fn
        if evaluator is None:
            return {}
        with self.guard("evaluation"), self.generation_context():
            metrics = evaluator.greedy(self.engine, batch_size=self.config.per_device_eval_batch_size,
                                       on_batch=on_batch)
        self.tracker.log(step, metrics)
        self.tracker.write(f"eval @ step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2" and self.world_size > 1

    def save_checkpoint(self, state: LoopState) -> str | None:
        """Rank 0 writes; under FSDP2 every rank first takes part in gathering the full state, so
        the files are those of a one-process run (resumable on any number of ranks)."""
        from grpokit.checkpoint import save_checkpoint

        model_state = optim_state = None
        if self.sharded:
            model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        with self.guard("saving a checkpoint"):
            if self.rank != 0:
                return None
            return save_checkpoint(self.config.output_dir, state.global_step, model=self.model,
                                   optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=state.to_dict(),
                                   config=self._checkpoint_config(), tokenizer=self.tokenizer,
                                   save_total_limit=self.config.save_total_limit, model_state=model_state,
                                   optimizer_state=optim_state)

    def _checkpoint_config(self) -> dict:
        """The config saved with a checkpoint, plus the global batch: a run may resume on another
        number of ranks when per_device_train_batch_size * gradient_accumulation_steps * ranks is
        unchanged (gradient_accumulation_steps may then differ)."""
        c = self.config
        return {**c.to_dict(),
                "completions_per_step": c.per_device_train_batch_size * c.gradient_accumulation_steps * self.world_size}

    def resume(self, path: str | bool) -> LoopState:
        from grpokit.checkpoint import (RESUME_KEYS, CheckpointError, check_resume_compatible, find_latest_checkpoint,
                                        load_checkpoint)

        if path is True or path == "latest":
            path = find_latest_checkpoint(self.config.output_dir)
            if path is None:
                raise CheckpointError(f"resume_from_checkpoint=True but {self.config.output_dir} has no checkpoint.")
        keys = [k for k in RESUME_KEYS if k != "gradient_accumulation_steps"] + ["completions_per_step"]
        changed = check_resume_compatible(path, self._checkpoint_config(), keys,
                                          allowed=self.config.resume_allow_changes)
        if self.sharded:  # rank 0 reads the full weights and optimizer state, each rank keeps its shards
            from grpokit.checkpoint.files import OPTIMIZER_FILE
            from grpokit.checkpoint.load import read_model_state, torch_load

            model_state, optim_state = {}, {}
            if self.rank == 0:
                model_state = read_model_state(path, self.model)
                optim_state = torch_load(os.path.join(path, OPTIMIZER_FILE), "cpu")
            distributed.load_full_state(self.model, self.optimizer, model_state, optim_state, strict=not self.is_peft)
            state = load_checkpoint(path, model=None, optimizer=None, scheduler=self.scheduler)
        else:
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
        if changed:
            self._apply_changed_learning_rate()
            self.tracker.write(f"resuming with changed fields, no longer an exact continuation: {'; '.join(changed)}")
        self.engine.update_weights(self.model)
        self.tracker.write(f"resumed from {path} at step {state['global_step']}")
        return LoopState.from_dict(state)

    def _apply_changed_learning_rate(self) -> None:
        """The loaded schedule holds the checkpoint's base learning rate: rebase it on this run's
        (a no-op when it did not change), keeping the schedule's position."""
        base = getattr(self.scheduler, "base_lrs", None)
        if base is None or all(b == self.config.learning_rate for b in base[:1]):
            return
        import warnings

        self.scheduler.base_lrs = [self.config.learning_rate] * len(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_lr outside step(): wanted here
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def save_final(self, path: str, merge_lora: bool = False) -> str:
        """The trained model (adapter for LoRA) and tokenizer, written by rank 0 only; under FSDP2
        every rank takes part in gathering the full weights first."""
        from grpokit.models import save_model

        if not self.sharded:
            if self.rank == 0:  # a vision-language model's processor (its tokenizer included), else the tokenizer
                save_model(self.model, self.processor or self.tokenizer, path, merge_lora=merge_lora)
            return path
        if merge_lora:
            raise ValueError("merge_lora=True is not supported on a sharded (FSDP2) model: save without it, then "
                             "in one process load the adapter with grpokit.models.load_model(path) and save "
                             "it with grpokit.models.save_model(model, tokenizer, out, merge_lora=True).")
        full, _ = distributed.full_state(self.model, None)
        with self.guard("saving the model"):
            if self.rank == 0:
                os.makedirs(path, exist_ok=True)
                self.model.save_pretrained(path, state_dict=full)
                (self.processor or self.tokenizer).save_pretrained(path)
        return path

    def finish(self) -> None:
        self.save_final(os.path.join(self.config.output_dir, "final"))
        self.tracker.close(plot=self.config.plot)
        if self.multiturn is not None:
            self.multiturn.close()

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
            f"  per step: {completions // g} prompts x G={g} = {completions} completions on {w} rank(s)"
            f"{f' ({self.strategy})' if w > 1 else ''}, "
            f"{c.gradient_accumulation_steps} micro-batch(es) of {c.per_device_train_batch_size}; "
            f"<= {completions * c.max_completion_length:,} completion tokens",
            f"  {self.total_steps} optimizer steps; loss_type={c.loss_type}, epsilon={c.epsilon}/"
            f"{c.epsilon_high if c.epsilon_high is not None else c.epsilon}, beta={c.beta}, lr={c.learning_rate}, "
            f"scale_rewards={c.scale_rewards}",
        ] + [f"  {line}" for line in self.plan.describe()]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


# --------------------------------------------------------------------------------------------

def build_run(cfg: GRPOConfig, *, model=None, reward_funcs=None, train_dataset=None, eval_dataset=None,
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
    group), in `RunParts.extra_modules`. `forward_plan`
    overrides parts of the training forward's plan (core.forward.choose_forward_plan).
    `tools`, `environment_factory` (TRL's): multi-turn rollouts (grpokit.envs); `rollout_func(prompts)`
    -> TRL's dict (prompt_ids, completion_ids, logprobs, [env_mask], extra columns) replaces sampling."""
    from grpokit import data, models
    from grpokit.rewards import RewardRunner, load_reward_funcs

    _seed_everything(cfg.seed)
    rank, world = distributed.init_distributed(use_cpu=cfg.use_cpu, timeout_s=cfg.ddp_timeout)  # torchrun
    device = distributed.device_for(cfg.use_cpu)
    notes: list[str] = []

    # data and task
    task = None
    if tools is None and cfg.tools:  # the command line's 'module:function' paths
        from grpokit.rewards.registry import import_path

        tools = [t if callable(t) else import_path(str(t), "tool") for t in cfg.tools]
    if environment_factory is None and cfg.environment_factory:
        from grpokit.rewards.registry import import_path

        environment_factory = import_path(str(cfg.environment_factory), "environment_factory")
    if train_dataset is None and cfg.dataset_name is None and cfg.task is None and environment_factory is not None:
        train_dataset = _environment_placeholder(cfg, environment_factory, rows_per_step_factor)
    if train_dataset is None and cfg.dataset_name is None and cfg.task is None:
        raise ValueError("`train_dataset` is required: pass train_dataset= (a datasets.Dataset with a 'prompt' column), "
                         "or set dataset_name (a hub id or a local file) or task (a built-in task: "
                         f"{', '.join(data.TASKS)}).")
    if train_dataset is None and cfg.dataset_name is None:
        task = data.get_task(cfg.task, seed=cfg.seed, num_train=cfg.task_num_train,
                             num_eval=cfg.task_num_eval)
        train_dataset, eval_dataset = task.train_dataset, eval_dataset if eval_dataset is not None else task.eval_dataset
    elif cfg.task is not None:
        raise ValueError("GRPOConfig: set either task (a built-in dataset) or dataset_name/train_dataset, not both.")
    if isinstance(train_dataset, str) or (train_dataset is None and cfg.dataset_name):
        name = train_dataset if isinstance(train_dataset, str) else cfg.dataset_name
        train_dataset = data.load_dataset_spec(name, split=cfg.dataset_train_split, config_name=cfg.dataset_config,
                                               streaming=cfg.dataset_streaming)
        if eval_dataset is None and cfg.dataset_test_split:
            eval_dataset = data.load_dataset_spec(name, split=cfg.dataset_test_split, config_name=cfg.dataset_config,
                                                  streaming=cfg.dataset_streaming)
    streamed = _is_iterable_dataset(train_dataset)
    if streamed:
        train_dataset = _rows_of_stream(train_dataset, cfg, rows_per_step_factor, distributed.world_size(),
                                        updates_per_batch)
    if environment_factory is not None and "prompt" not in train_dataset.column_names:
        # as TRL: rows that only pick an environment get an empty user turn; reset() supplies the prompt
        train_dataset = train_dataset.add_column("prompt", [[{"role": "user", "content": ""}]] * len(train_dataset))
    if cfg.remove_unused_columns:  # as TRL: the prompt and its images
        train_dataset = train_dataset.select_columns(
            ["prompt"] + [c for c in ("image", "images") if c in train_dataset.column_names])

    # model and tokenizer
    if task is not None and tools is None and environment_factory is None:  # a tool task's own
        tools, environment_factory = task.tools, task.environment_factory
    starter = models.starter_model_path(task.name if task is not None else None)
    model_ref = model if model is not None else (cfg.model_name_or_path or starter)
    if not isinstance(model_ref, str) and tokenizer is None:
        # as TRL: the processing class of the model's own name (the id or path it was loaded from)
        tokenizer = (getattr(model_ref, "name_or_path", None)
                     or getattr(getattr(model_ref, "config", None), "_name_or_path", None))
        if not tokenizer:
            raise ValueError("GRPOTrainer: model is a loaded model with no name to load its tokenizer from; pass the "
                             "tokenizer as processing_class=.")
    model_name = model_ref if isinstance(model_ref, str) else type(model_ref).__name__
    if isinstance(model_ref, str) and model_ref == starter:
        model_name = f"grpokit starter model ({os.path.basename(starter)})"
    init_kwargs = dict(cfg.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = _checked_quantization(quantization_config, model_ref, peft_config, cfg)
    # TRL's model_init_kwargs dtype (e.g. `--dtype bfloat16`) wins over the bf16 default
    dtype = init_kwargs.pop("dtype", None) or init_kwargs.pop("torch_dtype", None) or _pick_dtype(cfg, device, notes)
    policy = models.load_model(model_ref, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                               **init_kwargs)
    from grpokit.core.vision import is_vision_model
    from grpokit.data import vision as data_vision

    has_images = any(c in train_dataset.column_names for c in data_vision.IMAGE_COLUMNS)
    vlm = is_vision_model(unwrap(policy))
    processor = None
    source = tokenizer if tokenizer is not None else model_ref
    if vlm and isinstance(source, str | os.PathLike) and str(source) not in ("char", "char-chat"):
        processor = data_vision.load_processor(str(source), trust_remote_code=cfg.trust_remote_code)
    elif data_vision.is_processor(source):
        processor = source
    if has_images and not vlm:
        raise ValueError(f"the dataset has images (column {'images' if 'images' in train_dataset.column_names else 'image'}"
                         f"), but {model_name} is a text-only model ({type(unwrap(policy)).__name__}): use a "
                         "vision-language model (AutoModelForImageTextToText), or drop the image column.")
    if has_images:
        data_vision.check_processor(processor if processor is not None else source, model_name)
    tok = models.load_tokenizer(processor.tokenizer if processor is not None else source)
    multiturn = None
    if tools or environment_factory is not None:
        from grpokit.envs import MultiTurn

        if rollout_func is not None:
            raise ValueError("GRPOTrainer: rollout_func drives generation itself; it cannot be combined with tools= or "
                             "environment_factory= (call your tools inside rollout_func).")
        multiturn = MultiTurn(tools=tools, environment_factory=environment_factory, tokenizer=tok,
                              max_iterations=cfg.max_tool_calling_iterations, tool_timeout=cfg.tool_timeout,
                              chat_template_kwargs=cfg.chat_template_kwargs, processor=processor)
        notes.append(multiturn.describe())
    for warning in _objective_warnings(cfg):  # in the summary, and logged now (before step 1), as TRL warns
        notes.append(warning)
        logging.getLogger(__name__).warning(warning)
    if cfg.dataloader_num_workers and streamed:  # as TRL: a stream is read by one worker (groups stay whole)
        logging.getLogger(__name__).warning(f"a streaming train_dataset is read in order by one reader: "
                                            f"dataloader_num_workers={cfg.dataloader_num_workers} is set to 0.")
        cfg.dataloader_num_workers = 0
    if cfg.dataloader_num_workers:
        notes.append(f"note: dataloader_num_workers={cfg.dataloader_num_workers} has nothing to parallelise here: every "
                     "prompt is tokenized before step 1 and read from memory.")
    if cfg.cast_lm_head_to_fp32:
        models.cast_lm_head_to_fp32(policy)
    if cfg.disable_dropout:
        for m in policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if peft_config is None and cfg.use_peft:
        from peft import LoraConfig

        targets = cfg.lora_target_modules
        if vlm:  # the adapter in the language model; the vision tower stays frozen
            from grpokit.core.vision import language_model_lora_targets

            targets = language_model_lora_targets(unwrap(policy), targets)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
    if cfg.freeze_vision_tower:
        if not vlm:
            raise ValueError(f"GRPOConfig: freeze_vision_tower=True, but {model_name} is not a vision-language model "
                             "(it has no vision tower); leave freeze_vision_tower=False.")
        from grpokit.core.vision import vision_parameters

        for _, p in vision_parameters(unwrap(policy)):
            p.requires_grad_(False)
        notes.append("vision tower and projector frozen (freeze_vision_tower): image features once per step")
    is_peft = peft_config is not None or hasattr(policy, "disable_adapter")
    if peft_config is not None:
        policy = models.apply_lora(policy, peft_config)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if is_peft and hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()

    # prompts: rendered, tokenized, checked against the context
    max_ctx = getattr(getattr(policy, "config", None), "max_position_embeddings", None)
    tools_of_row = None
    if multiturn is not None:
        envs_col = train_dataset["environment"] if "environment" in train_dataset.column_names else None
        tools_of_row = lambda i: multiturn.row_tools({"environment": envs_col[i] if envs_col else None})  # noqa: E731
    vision = None
    if has_images:
        if multiturn is not None or rollout_func is not None or cfg.use_vllm:
            what = "tools / environment_factory" if multiturn is not None else (
                "rollout_func" if rollout_func is not None else "use_vllm=True")
            raise ValueError(f"images with {what} are not supported yet: train on images with grpokit's own "
                             "single-turn rollout.")
    if processor is not None and multiturn is None:  # a VLM's prompts through its processor (its chat template)
        prompt_ids, vision = data_vision.encode_rows(train_dataset, processor, max_prompt_length=cfg.max_prompt_length,
                                                     chat_template_kwargs=cfg.chat_template_kwargs)
        vision = vision if any(v is not None for v in vision) else None
    else:
        prompt_ids = data.validate_prompts(train_dataset, tok, max_prompt_length=cfg.max_prompt_length,
                                           chat_template_kwargs=cfg.chat_template_kwargs, tools_of_row=tools_of_row)
    conversational = data.is_conversational(train_dataset[0])
    if multiturn is not None and not conversational:
        raise ValueError("tools / environment_factory need conversational prompts (a list of {'role', 'content'} "
                         "messages per row), so that tool calls and results are turns of a conversation.")
    prompts = list(train_dataset["prompt"])
    columns = {c: list(train_dataset[c]) for c in train_dataset.column_names if c != "prompt"}
    if max_ctx:
        longest = max(map(len, prompt_ids))
        if longest + cfg.max_completion_length > max_ctx:
            raise ValueError(f"the longest prompt ({longest} tokens) + max_completion_length "
                             f"({cfg.max_completion_length}) exceeds the model's context of {max_ctx} tokens: "
                             f"set max_completion_length={max_ctx - longest} or less (or max_prompt_length).")

    # rewards: resolved and checked against the dataset's columns
    funcs = reward_funcs if reward_funcs is not None else (cfg.reward_funcs or (task.reward_funcs if task else None))
    env_funcs = multiturn.reward_funcs() if multiturn is not None else []
    if not funcs and not env_funcs:
        raise ValueError("No reward source provided: pass reward_funcs= (callables, reward model ids or paths, "
                         "registry names or 'module:function'), set reward_funcs in the config, or give an "
                         "environment_factory whose environment defines a `get_reward` method.")
    task_funcs = task is not None and funcs is task.reward_funcs
    funcs = [] if not funcs else (list(funcs) if isinstance(funcs, (list, tuple)) else [funcs])
    weights = cfg.reward_weights if cfg.reward_weights is not None else (task.reward_weights if task_funcs else None)
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions.")
    if env_funcs:  # an environment's get_reward: an extra reward, weight 1, after the trainer's (as TRL)
        weights = (list(weights) if weights is not None else [1.0] * len(funcs)) + [1.0] * len(env_funcs)
        funcs = funcs + env_funcs
    runner = RewardRunner(load_reward_funcs(list(funcs), reward_kwargs=cfg.reward_kwargs), weights=weights,
                          timeout=cfg.reward_timeout, on_error=cfg.reward_on_error,
                          num_workers=cfg.reward_num_workers)
    runner.check_signature(columns=set(train_dataset.column_names), more_columns_later=rollout_func is not None)

    # generation engine, reference, optimizer, schedule
    engine = _make_rollout_engine(cfg, policy, tok, notes)
    if vision is not None and not capabilities_of(engine).images:
        raise ValueError(f"images are sampled by grpokit's engine or transformers' generate, not by "
                         f"{type(engine).__name__}; use the default engine.")
    needs_reference = cfg.beta > 0 if needs_reference is None else needs_reference
    if cfg.sync_ref_model and is_peft:
        raise ValueError("sync_ref_model=True with a LoRA (PEFT) model: the reference is the base model with the "
                         "adapter off, there is no separate copy to sync (as in TRL). Use sync_ref_model=False, or "
                         "full fine-tuning.")
    if cfg.sync_ref_model and world > 1 and cfg.distributed_strategy == "fsdp2":
        raise ValueError("sync_ref_model=True is not supported with distributed_strategy=fsdp2 yet; use ddp.")
    ref_model = None
    if needs_reference and not is_peft:
        ref_model = models.load_reference_model(policy)
        if cfg.cast_lm_head_to_fp32:  # the copied head's forward must use the copy's weights
            models.cast_lm_head_to_fp32(ref_model)
    optimizer, scheduler = optimizers
    # several ranks: the training forward wrapped in DDP or FSDP2 (which replaces the parameters
    # by shards, so the optimizer is made after it)
    if world > 1 and cfg.distributed_strategy == "fsdp2":
        if optimizer is not None:
            raise ValueError("distributed_strategy='fsdp2' shards the parameters, so an optimizer made before "
                             "cannot be used: leave optimizers=(None, None) to let grpokit build it.")
        if cfg.use_vllm:
            raise ValueError("distributed_strategy='fsdp2' with use_vllm=True is not supported; use ddp.")
    train_forward = distributed.wrap_for_training(policy, cfg.distributed_strategy, device)
    ref_forward = (distributed.wrap_for_training(ref_model, cfg.distributed_strategy, device, frozen=True)
                   if ref_model is not None else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    if optimizer is None:
        # "adamw_torch_fused" (the default, as in transformers for torch >= 2.8): torch's fused
        # kernel, on CPU too (5x faster than the per-tensor loop on the starter model)
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                      fused=(cfg.optim == "adamw_torch_fused" and device.type in ("cpu", "cuda")) or None)
    extra_modules = tuple(make_extra_modules(policy, device)) if make_extra_modules is not None else ()
    for extra in extra_modules:
        optimizer.add_param_group({"params": list(extra.parameters())})
    prompts_per_step = _prompts_per_step(cfg, rows_per_step_factor)
    total_steps = _total_steps(cfg, len(prompt_ids), prompts_per_step * world, updates_per_batch)
    if scheduler is None:
        from transformers import get_scheduler

        k = optimizer_steps_per_step
        warmup = cfg.warmup_steps * k if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * total_steps * k)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps * k)

    from grpokit.evaluation import build_evaluator
    from grpokit.tracking import Tracker

    def make_evaluator(dataset):  # one eval set or named ones (a DatasetDict is a dict); streams read whole
        if _is_iterable_dataset(dataset):
            dataset = _rows_of_stream(dataset, None, 1, 1)
        elif isinstance(dataset, dict):
            dataset = {name: _rows_of_stream(ds, None, 1, 1) if _is_iterable_dataset(ds) else ds
                       for name, ds in dataset.items()}
        return build_evaluator(dataset, tok, task=task, reward_runner=runner, config=cfg, multiturn=multiturn,
                               processor=processor)

    eval_fn = make_evaluator(eval_dataset) if eval_dataset is not None else None
    if cfg.eval_strategy == "steps" and eval_fn is None:
        raise ValueError("eval_strategy='steps' but there is nothing to evaluate on: pass eval_dataset= (or set "
                         "dataset_test_split, or use a built-in task), or set eval_strategy='no'.")
    plan = choose_forward_plan(cfg, policy, engine, world_size=world, is_peft=is_peft, needs_reference=needs_reference,
                               overrides=forward_plan, external_sampler=rollout_func is not None)
    if rollout_func is not None:
        uses = {"sampler": "its log-probs stand in for the old policy's (forward_plan old_logps='sampler': declared "
                           "the trainer's own)",
                "recomputed": "the old policy's log-probs come from the trainer's forward",
                "current": "on-policy, the old policy's log-probs are the current ones"}[plan.old_logps]
        if cfg.use_vllm and cfg.vllm_importance_sampling_correction:
            uses += "; its log-probs feed the importance-sampling correction"
        notes.append(f"rollout: rollout_func (yours) samples the completions; {uses}.")
    tracker = Tracker(cfg.output_dir, report_to=tuple(cfg.report_to) or ("jsonl",), config=cfg.to_dict(),
                      total_steps=total_steps, is_main_process=rank == 0, run_name=cfg.run_name,
                      disable_progress=cfg.disable_tqdm, overwrite=cfg.overwrite_output_dir)
    return RunParts(config=cfg, model=policy, tokenizer=tok, device=device, prompts=prompts, prompt_ids=prompt_ids,
                    columns=columns, conversational=conversational, reward_runner=runner, engine=engine,
                    optimizer=optimizer, scheduler=scheduler, tracker=tracker, total_steps=total_steps,
                    prompts_per_step=prompts_per_step, eval_dataset=eval_dataset, eval_fn=eval_fn, streamed=streamed,
                    make_evaluator=make_evaluator,
                    ref_model=ref_model, is_peft=is_peft, rank=rank, world_size=world,
                    pad_id=tok.pad_token_id, task_name=task.name if task else None, model_name=model_name,
                    notes=notes, train_forward=train_forward, ref_forward=ref_forward, multiturn=multiturn,
                    rollout_func=rollout_func, vision=vision, processor=processor,
                    image_features=ImageFeatures() if vlm else None,
                    strategy=cfg.distributed_strategy, extra_modules=extra_modules, plan=plan)


def _prompts_per_step(cfg: GRPOConfig, rows_per_step_factor: int) -> int:
    """Prompts one rank samples per step: its completions per step over G, times the algorithm's factor."""
    completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return completions // cfg.num_generations * rows_per_step_factor


def _overrides_generate(model) -> bool:
    """Whether `generate` is set on the model instance itself (or its PEFT base model's)."""
    models = [model] + ([model.get_base_model()] if hasattr(model, "get_base_model") else [])
    return any("generate" in vars(m) for m in models)


def _segments_of_mask(mask: list, length: int, i: int) -> list:
    """rollout_func's env_mask (1 = model token, 0 = tool / environment) as segments."""
    if len(mask) != length:
        raise ValueError(f"rollout_func: env_mask[{i}] has {len(mask)} values for {length} completion tokens.")
    out, start = [], 0
    for t in range(1, length + 1):
        if t == length or bool(mask[t]) != bool(mask[start]):
            out.append(Segment(start, t, MODEL if mask[start] else EXTERNAL))
            start = t
    return out


def _environment_placeholder(cfg: GRPOConfig, environment_factory, rows_per_step_factor: int):
    """TRL's environment-owned data: no train_dataset, reset() gives each prompt, max_steps the
    length; the rows are one step's worth of empty user turns."""
    import datasets

    if isinstance(environment_factory, dict):
        raise ValueError("A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an "
                         "`environment` column to route each example to its environment. Provide a dataset, or "
                         "pass a single environment factory.")
    if cfg.max_steps <= 0:
        raise ValueError("When training without a `train_dataset` (the environment owns the data and returns the "
                         "prompt from `reset()`), `max_steps` must be set to a positive value to define the training "
                         "length. Set it via `GRPOConfig(max_steps=...)`.")
    rows = max(1, _prompts_per_step(cfg, rows_per_step_factor))
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * rows})


def _objective_warnings(cfg: GRPOConfig) -> list[str]:
    """Combinations TRL warns about, said in the summary before step 1."""
    out = []
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        out.append(f"warning: importance_sampling_level='sequence' with loss_type='{cfg.loss_type}' sums per-token "
                   "contributions, which weights each sequence by its completion length instead of optimizing "
                   "GSPO's per-sequence objective; loss_type='grpo' gives the GSPO paper's setup.")
    if cfg.loss_type == "luspo" and cfg.importance_sampling_level != "sequence":
        out.append("warning: loss_type='luspo' is meant with importance_sampling_level='sequence' (the paper's setup).")
    if cfg.loss_type == "vespo" and cfg.importance_sampling_level != "token":
        out.append("warning: loss_type='vespo' computes its sequence weights itself; importance_sampling_level "
                   "should be 'token' (the default).")
    if cfg.loss_type == "cispo" and cfg.epsilon_high is None:
        out.append(f"note: loss_type='cispo' caps the importance weight at epsilon={cfg.epsilon} when epsilon_high is "
                   "unset (TRL's meaning); ScaleRL's recipe sets epsilon_high=5.0.")
    return out


def _checked_quantization(quantization_config, model_ref, peft_config, cfg):
    """TRL's `quantization_config` (QLoRA): the model is loaded quantized here, so it must be a
    name; the quantized weights are frozen, so a LoRA adapter must be trained on them."""
    import importlib.util

    if not isinstance(model_ref, str):
        raise ValueError("quantization_config is applied when the model is loaded: pass the model's id or path, "
                         "not a loaded model (or quantize it yourself).")
    method = getattr(quantization_config, "quant_method", "")
    method = str(getattr(method, "value", method)).lower()
    if "bitsandbytes" in method and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("quantization_config (bitsandbytes) needs the bitsandbytes package and, for 4/8-bit "
                         "training, a CUDA GPU: pip install bitsandbytes.")
    if peft_config is None and not cfg.use_peft:
        raise ValueError("quantization_config: quantized weights cannot be trained; pass peft_config= (a LoRA "
                         "config) or use_peft=True to train an adapter on them (QLoRA).")
    return quantization_config


def _make_rollout_engine(cfg: GRPOConfig, policy, tok, notes: list[str]):
    """The engine named by `rollout_engine` (vLLM for TRL's `use_vllm`); for "hf", grpokit's HFEngine
    when it can hold the model's state and honour every sampling setting, else transformers' generate
    (said in the summary)."""
    from grpokit.rollout import needs_generate

    extra = cfg.extra_generation_kwargs()
    if cfg.rollout_engine != "hf":  # hf-generate, vllm, or one registered with register_engine
        return make_engine(cfg.rollout_engine, policy, tok, max_batch_tokens=cfg.max_batch_tokens,
                           generation_kwargs=extra)
    why = needs_generate(policy) or (f"generation_kwargs {', '.join(sorted(extra))} need transformers' generate"
                                     if extra else None)
    if why:
        notes.append(f"rollout: transformers' generate ({why}); slower than grpokit's engine.")
        return make_engine("hf-generate", policy, tok, generation_kwargs=extra)
    return make_engine("hf", policy, tok, max_batch_tokens=cfg.max_batch_tokens)


def _is_iterable_dataset(ds) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(ds, datasets.IterableDataset)


def _rows_of_stream(stream, cfg: GRPOConfig | None, rows_per_step_factor: int, world: int, updates_per_batch: int = 1):
    """A streaming `datasets.IterableDataset` as the rows the run reads, in stream order: for
    training the first `steps * prompts per step * ranks` (transformers' Trainer needs max_steps for
    a stream, so does this), for evaluation the whole stream."""
    from itertools import islice

    import datasets

    if cfg is None:
        rows = list(stream)
    else:
        if cfg.max_steps <= 0:
            raise ValueError("train_dataset is a streaming IterableDataset, whose length is unknown: set max_steps "
                             "(as transformers' Trainer requires).")
        prompts = _prompts_per_step(cfg, rows_per_step_factor)
        batches = math.ceil(cfg.max_steps / (max(cfg.num_iterations, 1) * updates_per_batch))
        rows = list(islice(iter(stream), batches * prompts * world))
    if not rows:
        raise ValueError("the streaming dataset yielded no rows.")
    return datasets.Dataset.from_list(rows)


def _total_steps(cfg: GRPOConfig, num_rows: int, global_prompts_per_step: int, updates_per_batch: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    rounds = math.ceil(cfg.num_train_epochs * num_rows / global_prompts_per_step)
    return max(1, rounds * cfg.num_iterations * updates_per_batch)


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
