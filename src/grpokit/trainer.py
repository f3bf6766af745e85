"""The TRL-style `GRPOTrainer`: build the run (grpokit.core.run), then the one loop
(grpokit.core.loop) with GRPO's step."""

from __future__ import annotations

import logging
import os
from typing import Callable

from grpokit.config import GRPOConfig
from grpokit.core.loop import GRPO, train_loop
from grpokit.checkpoint.runs import save_final_model
from grpokit.core.run import RunParts, build_run
from grpokit.core.setup import is_iterable_dataset
from grpokit.facade import RunFacade


def with_reward_tokenizers(reward_funcs, processing_classes):
    """TRL's `reward_processing_classes`: one tokenizer (or None) per reward function; a reward
    model with one is built with it (else it loads its own), a function must have None."""
    from grpokit.rewards.model import RewardModelReward
    from grpokit.rewards.registry import is_reward_model_spec, reward_model_name

    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    procs = list(processing_classes) if isinstance(processing_classes, (list, tuple)) else [processing_classes]
    if len(procs) != len(funcs):
        raise ValueError(f"GRPOTrainer: the number of reward_processing_classes ({len(procs)}) must match the number "
                         f"of reward_funcs ({len(funcs)}); give one per reward function (None for the functions).")
    out = []
    for i, (fn, proc) in enumerate(zip(funcs, procs)):
        if proc is None:
            out.append(fn)
        elif not is_reward_model_spec(fn):
            raise ValueError(f"GRPOTrainer: reward_processing_classes[{i}] is given, but reward_funcs[{i}] is not a "
                             "reward model (a model id, path or loaded sequence classifier).")
        else:
            reward = RewardModelReward(fn, tokenizer=proc)
            reward.__name__ = reward_model_name(fn)
            out.append(reward)
    return out


class GRPOTrainer(RunFacade):
    """`GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
    eval_dataset=..., processing_class=..., peft_config=...)` then `.train()`, as in TRL.

    `model` is a hub id, a local path or a loaded model (`quantization_config`: a
    transformers quantization config such as BitsAndBytesConfig for QLoRA, applied when `model` is
    loaded here); `reward_funcs` one or a list of
    callables / registry names / "module:function" paths. Everything is validated here, before
    the first step; afterwards `trainer.model` is the trained model. `forward_plan` (grpokit's
    own) overrides parts of the training forward's plan, e.g. `{"packed": False}` (see
    grpokit.core.forward.choose_forward_plan)."""

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, callbacks=None,
                 optimizers=(None, None), reward_processing_classes=None, quantization_config=None,
                 tools=None, rollout_func=None, environment_factory=None, *,
                 forward_plan: dict | None = None, **kwargs):
        self._take_args(GRPOConfig, args, kwargs)
        if self.args.dataloader_num_workers and is_iterable_dataset(train_dataset):
            # as TRL's trainer: a stream is read by one worker, so groups stay whole
            logging.getLogger(__name__).warning(
                f"a streaming train_dataset is read in order by one reader: dataloader_num_workers="
                f"{self.args.dataloader_num_workers} is set to 0.")
            self.args = self.args.replace(dataloader_num_workers=0)
        if reward_processing_classes is not None:
            reward_funcs = with_reward_tokenizers(reward_funcs, reward_processing_classes)
        # TRL's attribute, called with the trainer (a user may replace it after construction)
        self.rollout_func: Callable[[list, "GRPOTrainer"], dict] | None = rollout_func
        self.parts: RunParts = build_run(
            self.args, model=model, reward_funcs=reward_funcs, train_dataset=train_dataset,
            eval_dataset=eval_dataset, tokenizer=processing_class, peft_config=peft_config,
            optimizers=optimizers, forward_plan=forward_plan, quantization_config=quantization_config,
            # TRL's steps_per_generation: one generation feeds this many optimizer steps
            rows_per_step_factor=self.args.updates_per_generation(),
            updates_per_batch=self.args.updates_per_generation(),
            tools=tools, environment_factory=environment_factory,
            rollout_func=self._call_rollout_func if rollout_func is not None else None,
        )
        self.algorithm = GRPO(self.parts)
        self._init_surface(callbacks, eval_dataset)

    def _call_rollout_func(self, prompts: list) -> dict:
        """TRL calls `rollout_func(prompts, trainer)`."""
        if self.rollout_func is None:
            raise ValueError("GRPOTrainer.rollout_func was set to None after construction; it samples this run.")
        return self.rollout_func(prompts, self)

    # ---- TRL's GRPOTrainer attributes ----
    @property
    def tools(self) -> list:
        """Every tool the model may call: the standalone `tools` and every environment's methods."""
        mt = self.parts.multiturn
        return list(mt.tools) if mt is not None else []

    @property
    def environments(self) -> list | None:
        """The environment of each completion of the last step (None without environment_factory)."""
        latest = self.surface.latest
        return latest[0].environments if latest is not None else None

    @property
    def _env_tools(self) -> dict:
        """{environment name: its tools} (TRL's attribute; None is the single factory's name)."""
        mt = self.parts.multiturn
        return dict(mt.environments.tools) if mt is not None and mt.environments is not None else {}

    @property
    def _environment_pool(self) -> dict:
        """{environment name: its reusable instances} (TRL's attribute)."""
        mt = self.parts.multiturn
        return mt.environments.pool if mt is not None and mt.environments is not None else {}

    @property
    def reward_func_names(self) -> list[str]:
        return list(self.parts.scorer.runner.names)

    @property
    def reward_weights(self):
        import torch

        return torch.tensor(self.parts.scorer.runner.weights, dtype=torch.float32)

    @property
    def ref_model(self):
        """The frozen reference (beta > 0 without LoRA; None otherwise, as in TRL)."""
        return self.parts.ref_model

    @property
    def reward_funcs(self) -> list:
        return list(self.parts.scorer.runner.funcs)

    @property
    def reward_processing_classes(self) -> list:
        """One per reward function: a reward model's tokenizer, None for a function (TRL's list)."""
        return [getattr(getattr(f, "scorer", None), "tokenizer", None) for f in self.reward_funcs]

    @property
    def aux_loss_enabled(self) -> bool:
        """Whether a mixture-of-experts router's load-balancing loss is added (output_router_logits)."""
        return self.algorithm.router_aux_coef is not None

    @property
    def entropy_coef(self) -> float:
        """The entropy bonus's coefficient now (it moves with use_adaptive_entropy)."""
        return self.algorithm.entropy.coef

    def get_high_entropy_mask(self, entropies, mask, threshold: float):
        """TRL's helper: tokens whose entropy is at or above the `threshold` quantile of the active
        tokens' (threshold = 1 - top_entropy_quantile), as a bool mask."""
        from grpokit.algos import top_entropy_mask

        return top_entropy_mask(entropies, mask, 1.0 - threshold)

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold):
        """TRL's helper: the off-policy sequence mask as a float [B, 1] (1 keep, 0 drop)."""
        from grpokit.algos import off_policy_keep

        return off_policy_keep(advantages, per_token_logps, sampling_per_token_logps, mask,
                               off_policy_threshold).to(mask.dtype)

    def train(self, resume_from_checkpoint: str | bool | None = None):
        """Run the loop; returns transformers' `TrainOutput(global_step, training_loss, metrics)`,
        `metrics` being the last step's (eval accuracy included) and the run's totals."""
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        run = self._start_training()
        final = train_loop(run, self.algorithm, resume_from_checkpoint=resume,
                           resume_command=getattr(self, "resume_command", None), events=self.surface)
        return self.surface.output(final)

    def save_model(self, output_dir: str | None = None, merge_lora: bool = False) -> str:
        """Writes on rank 0 only (every rank must call it under FSDP2: the weights are gathered)."""
        return save_final_model(self.parts, output_dir or os.path.join(self.args.output_dir, "final"),
                                merge_lora=merge_lora)


class AsyncGRPOTrainer(GRPOTrainer):
    """TRL's `AsyncGRPOTrainer`: GRPO with a generation worker process sampling ahead of the
    trainer (grpokit.pipeline; docs/async.md). `args` defaults to `AsyncGRPOConfig()`
    (max_staleness=4); any GRPOConfig with max_staleness set works too. TRL's `rollout_worker` and
    `weight_transfer` (a vLLM server and NCCL) are replaced by grpokit's worker and its
    shared-memory weight sync: passing them is an error."""

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), tools=None,
                 environment_factory=None, rollout_worker=None, weight_transfer=None, **kwargs):
        from grpokit.config import AsyncGRPOConfig

        for name, value in (("rollout_worker", rollout_worker), ("weight_transfer", weight_transfer)):
            if value is not None:
                raise TypeError(f"AsyncGRPOTrainer: {name}= is TRL's vLLM-server hook; grpokit's generation worker "
                                "and its shared-memory weight sync take its place: remove it.")
        args = args if args is not None else AsyncGRPOConfig()
        if isinstance(args, GRPOConfig) and args.max_staleness is None:
            raise ValueError("AsyncGRPOTrainer: args.max_staleness is None (synchronous generation); set it, e.g. "
                             "max_staleness=1, or use GRPOTrainer.")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers, tools=tools,
                         environment_factory=environment_factory, **kwargs)
