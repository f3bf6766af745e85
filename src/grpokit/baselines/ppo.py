"""PPO for language models, the RLHF recipe (Ziegler et al. 2019, InstructGPT; TRL's PPOTrainer),
on grpokit's engine, rewards, data, tracking and evaluation: the baseline GRPO replaces.

One step:  sample completions -> scalar scores from the reward functions
           -> old logprobs + values (policy) and reference logprobs, once, without gradients
           -> per-token rewards: -kl_coef * k1 on every token, + the score on the last one
           -> GAE advantages and returns over the completion tokens, advantages whitened
           -> num_ppo_epochs x num_mini_batches optimizer steps of clipped policy + clipped value loss

The critic is a value head: one `nn.Linear(hidden_size, 1)` on the policy's last hidden state (the
`AutoModelForCausalLMWithValueHead` design of OpenAI's lm-human-preferences and early TRL), not a
separate critic model. Why: one forward gives the logprobs and the values, so PPO costs one extra
vector of `hidden_size + 1` parameters instead of a second model's weights, activations and
optimizer state (doubling memory is exactly the cost GRPO is meant to remove, and a fair
comparison should not inflate it); it works unchanged with LoRA (the head trains next to the
adapter). The price: the value loss's gradient flows into the shared trunk (weighted by
`vf_coef`), which a separate critic avoids. The head starts at zero (V = 0), so the first
advantages are the whitened reward-to-go: PPO begins as REINFORCE with a batch baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from grpokit.algos import (
    KL_ESTIMATORS,
    aggregate_loss,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    kl_penalty,
    make_policy_loss,
    masked_mean,
    masked_whiten,
    ppo_token_rewards,
)
from grpokit.baselines.common import AlgoConfig, parameter_counts, reference_logprobs
from grpokit.config import config_field, one_of
from grpokit.core.batch import MicroBatch, make_micro_batches
from grpokit.core.forward import completion_logprobs
from grpokit.modeling.info import text_config
from grpokit.core.events import NO_EVENTS, Events
from grpokit.core.loop import LoopState, StepOutput, sample_and_score, timed, train_loop
from grpokit.core.run import RunParts, build_run
from grpokit.facade import RunFacade


@dataclass(init=False)
class PPOConfig(AlgoConfig):
    """The fields every algorithm uses (model, data, sampling, optimizer, logging) plus TRL
    PPOConfig's PPO fields. kl_estimator defaults to k1 and disable_dropout to True, as in TRL's
    PPOTrainer (dropout would make the old and new logprobs of the same weights differ)."""

    num_ppo_epochs: int = config_field(4, "PPO epochs: passes over each generated batch.")
    num_mini_batches: int = config_field(1, "Mini-batches per epoch, one optimizer step each; a step generates "
                                            "per_device_train_batch_size * gradient_accumulation_steps * "
                                            "num_mini_batches completions (TRL's meaning).")
    cliprange: float = config_field(0.2, "Clip range of the policy ratio: [1 - c, 1 + c].")
    cliprange_value: float = config_field(0.2, "Clip range of a value prediction around its sampling-time value.")
    vf_coef: float = config_field(0.1, "Weight of the value loss in the total loss.")
    kl_coef: float = config_field(0.05, "Per-token KL penalty to the reference, added to the reward (0: no reference).")
    kl_estimator: str = config_field("k1", "Estimator of the per-token KL in the reward: k1 | k2 | k3.")
    gamma: float = config_field(1.0, "Discount factor over completion tokens.")
    lam: float = config_field(0.95, "GAE lambda.")
    whiten_rewards: bool = config_field(False, "Whiten (scale only) the per-token rewards before GAE.")
    disable_dropout: bool = config_field(True, "Set every dropout probability of the policy to 0 (TRL's PPO "
                                               "default: the old and new logprobs of the same weights agree).")

    EQUIVALENTS: ClassVar[dict[str, str]] = {
        "epsilon": "PPO's clip range is cliprange.", "epsilon_high": "PPO clips symmetrically (cliprange).",
        "beta": "PPO's KL coefficient is kl_coef (the KL goes into the reward, per token).",
        "loss_type": "PPO averages over the tokens of a mini-batch.",
        "scale_rewards": "PPO whitens its GAE advantages (and rewards with whiten_rewards).",
        "advantage_estimator": "PPO uses GAE with a value head.",
        "importance_sampling_level": "PPO's ratio is per token.",
        "num_iterations": "PPO's passes over a batch are num_ppo_epochs.",
    }

    def validate(self) -> None:
        super().validate()
        need = self.need
        need(self.num_ppo_epochs >= 1, "num_ppo_epochs must be >= 1.")
        need(self.num_mini_batches >= 1, "num_mini_batches must be >= 1.")
        need(self.cliprange > 0 and self.cliprange_value > 0, "cliprange and cliprange_value must be > 0.")
        need(self.vf_coef >= 0 and self.kl_coef >= 0, "vf_coef and kl_coef must be >= 0.")
        need(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1].")
        need(self.kl_estimator in KL_ESTIMATORS, one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS))

    def loss_is_local_mean(self) -> bool:
        """No: the policy and value losses are token sums over a mini-batch's tokens (dapo's)."""
        return False


class ValueHead(torch.nn.Module):
    """V(s_t) = w . h_t + b on the policy's last hidden state h_t (float32), zero-initialised."""

    def __init__(self, hidden_size: int, device=None):
        super().__init__()
        self.summary = torch.nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        torch.nn.init.zeros_(self.summary.weight)
        torch.nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)


def logprobs_and_values(run: RunParts, value_head: ValueHead, mb: MicroBatch):
    """One forward of the policy: per-token logprobs [B, C] of the completion tokens and values
    [B, C] of the states before them: the training forward (core.forward.completion_logprobs, as
    the run's plan says) with the value head read off the same hidden states."""
    logps, _, values = completion_logprobs(run.model, mb, temperature=run.temperature, value_head=value_head,
                                           **run.forward_kwargs())
    return logps, values


@dataclass
class _Targets:
    """Per micro-batch, fixed through the PPO epochs."""

    old_values: torch.Tensor   # [B, C]
    advantages: torch.Tensor   # [B, C] whitened GAE advantages
    returns: torch.Tensor      # [B, C]


class PPOTrainer(RunFacade):
    """`PPOTrainer(model=..., reward_funcs=..., args=PPOConfig(...), train_dataset=..., eval_dataset=...,
    processing_class=..., peft_config=...)` then `.train()`; the same arguments as GRPOTrainer.
    The value head is `trainer.value_head` (saved as final/value_head.pt)."""

    def __init__(self, model=None, reward_funcs=None, args: PPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        self._take_args(PPOConfig, args, kwargs)
        cfg = self.args
        # the PPO parts of the run: a value head trained with the policy, a reference for the KL in
        # the reward, num_mini_batches x the prompts and num_ppo_epochs x num_mini_batches optimizer
        # steps per step (the LR schedule spans them)
        run = build_run(cfg, model=model, reward_funcs=reward_funcs, train_dataset=train_dataset,
                        eval_dataset=eval_dataset, tokenizer=processing_class, peft_config=peft_config,
                        rows_per_step_factor=cfg.num_mini_batches,
                        optimizer_steps_per_step=cfg.num_ppo_epochs * cfg.num_mini_batches,
                        needs_reference=cfg.kl_coef > 0,
                        make_extra_modules=lambda policy, device: [ValueHead(text_config(policy).hidden_size,
                                                                             device=device)])
        cfg.check_single_process(run.comm.world_size)
        self.value_head: ValueHead = run.extra_modules[0]
        self.parts: RunParts = run
        self._init_surface(None, eval_dataset)
        self.param_counts = parameter_counts(run, [self.value_head])

    def summary(self) -> str:
        c, run = self.args, self.parts
        per_step = c.per_device_train_batch_size * c.gradient_accumulation_steps * c.num_mini_batches
        ref = ("base model with the adapter off (LoRA)" if run.is_peft else "frozen copy of the initial model") \
            if c.kl_coef > 0 else "none (kl_coef=0)"
        head = run.summary().splitlines()[:2]
        return "\n".join(head + [
            f"  PPO: per step {per_step // c.num_generations} prompts x {c.num_generations} = {per_step} completions; "
            f"{c.num_ppo_epochs} epochs x {c.num_mini_batches} mini-batch(es) = "
            f"{c.num_ppo_epochs * c.num_mini_batches} optimizer steps per step; {run.total_steps} steps",
            f"  cliprange={c.cliprange}, cliprange_value={c.cliprange_value}, vf_coef={c.vf_coef}, "
            f"kl_coef={c.kl_coef} ({c.kl_estimator} per token, in the reward), gamma={c.gamma}, lam={c.lam}, "
            f"lr={c.learning_rate}",
            f"  value head: Linear({self.value_head.summary.in_features}, 1) on the last hidden state, "
            f"{self.param_counts['params/extra_trainable']:,} parameters; reference: {ref}",
        ])

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Run the PPO loop; returns the final metrics."""
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        if resume:
            raise ValueError("PPOTrainer: resuming is not supported yet (checkpoints hold the policy, not the "
                             "value head); start a new run from the checkpoint's weights instead.")
        run = self._start_training()
        run.tracker.log(0, {k: float(v) for k, v in self.param_counts.items()})
        final = train_loop(run, PPO(self.args, self.value_head), summary=self.summary(), events=self.surface,
                           resume_command=None)  # PPO cannot resume yet: an interrupt only saves
        if run.comm.rank == 0:
            torch.save(self.value_head.state_dict(), os.path.join(self.args.output_dir, "final", "value_head.pt"))
        return self.surface.output(final)


# --------------------------------------------------------------------------------------------
# One PPO step
# --------------------------------------------------------------------------------------------

class PPO:
    """PPO's step on the shared loop; `max_steps` counts steps (one generated batch each)."""

    def __init__(self, cfg: PPOConfig, value_head: ValueHead):
        self.cfg, self.value_head = cfg, value_head
        # the clipped surrogate, bound once: a token sum over the mini-batch (dapo's), clip range cliprange
        self.policy_objective = make_policy_loss("dapo", epsilon=cfg.cliprange)

    def step(self, run: RunParts, rows: list[int], state: LoopState, phase: dict,
             events: Events = NO_EVENTS) -> StepOutput:
        return ppo_step(run, self, rows, state, phase, events)


def ppo_step(run: RunParts, ppo: PPO, rows: list[int], state: LoopState, phase: dict,
             events: Events = NO_EVENTS) -> StepOutput:
    cfg, value_head = ppo.cfg, ppo.value_head
    step = state.global_step
    rollout = sample_and_score(run, rows, state, phase)
    # the per-token advantages are PPO's own (_Targets); the micro-batches carry none
    micro_batches = make_micro_batches(rollout, cfg.per_device_train_batch_size, pad_id=run.pad_id,
                                       device=run.device, mask_truncated=cfg.mask_truncated_completions)
    with timed(phase, "time/logprobs"):
        targets, extra = _targets(run, cfg, value_head, rollout, micro_batches)
    # the sequence's mean whitened advantage, for the completions table and advantage_abs
    advantage = torch.cat([
        (t.advantages * mb.completion_mask).sum(-1).cpu() / mb.completion_mask.sum(-1).clamp(min=1).cpu()
        for t, mb in zip(targets, micro_batches)])

    per_mini = len(micro_batches) // cfg.num_mini_batches
    order_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    step_stats, skipped = [], 0
    for _ in range(cfg.num_ppo_epochs):
        order = torch.randperm(len(micro_batches), generator=order_gen).tolist()
        for k in range(cfg.num_mini_batches):
            chunk = order[k * per_mini:(k + 1) * per_mini]
            with timed(phase, "time/backward"):
                stats = _accumulate(run, ppo, [micro_batches[i] for i in chunk], [targets[i] for i in chunk],
                                    events)
            with timed(phase, "time/optimizer"):
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                stats["ppo/value_grad_norm"] = torch.nn.utils.clip_grad_norm_(value_head.parameters(), max_norm)
                if not torch.isfinite(stats["ppo/value_grad_norm"]):
                    value_head.zero_grad(set_to_none=True)
                applied, stats["grad_norm"] = run.optimizer_step(events)
            skipped += 0 if applied else 1
            step_stats.append(stats)
    return StepOutput(rollout=rollout, step_stats=step_stats, samples=len(rollout), extra=extra, skipped=skipped,
                      per_sample={"advantage": advantage})


def _pad_rows(parts: list[torch.Tensor], micro_batches: list[MicroBatch], width: int) -> torch.Tensor:
    """Micro-batch tensors [B_i, C_i] -> one [N, width] tensor (0 beyond each C_i)."""
    out = parts[0].new_zeros((sum(x.shape[0] for x in parts), width))
    for x, mb in zip(parts, micro_batches):
        out[mb.rows, :x.shape[1]] = x
    return out


@torch.no_grad()
def _targets(run: RunParts, cfg: PPOConfig, value_head: ValueHead, rollout,
             micro_batches) -> tuple[list[_Targets], dict]:
    """Old logprobs and values, reference logprobs, token rewards, GAE and whitening, over the whole
    generated batch (the statistics of whitening are the batch's, not a micro-batch's)."""
    old_v = []
    for mb in micro_batches:
        mb.old_logps, values = logprobs_and_values(run, value_head, mb)
        old_v.append(values)
        if cfg.kl_coef > 0:
            mb.ref_logps = reference_logprobs(run, mb, temperature=run.temperature)
    width = max(mb.completion_ids.shape[1] for mb in micro_batches)
    mask = _pad_rows([mb.completion_mask for mb in micro_batches], micro_batches, width)
    values = _pad_rows(old_v, micro_batches, width)
    old_logps = _pad_rows([mb.old_logps.float() for mb in micro_batches], micro_batches, width)
    if cfg.kl_coef > 0:
        ref_logps = _pad_rows([mb.ref_logps.float() for mb in micro_batches], micro_batches, width)
        kl = torch.where(mask.bool(), kl_penalty(old_logps, ref_logps, cfg.kl_estimator), 0.0)
    else:
        kl = torch.zeros_like(values)
    scores = torch.nan_to_num(rollout.rewards.to(values.device, torch.float32), nan=0.0)
    rewards = ppo_token_rewards(scores, kl, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    whitened = masked_whiten(advantages, mask)
    targets = [_Targets(old_values=values[mb.rows, :mb.completion_ids.shape[1]],
                        advantages=whitened[mb.rows, :mb.completion_ids.shape[1]],
                        returns=returns[mb.rows, :mb.completion_ids.shape[1]]) for mb in micro_batches]
    extra = {
        "kl": float(masked_mean(kl, mask)),                       # per token, sampling policy vs reference
        "ppo/kl_sequence": float(kl.sum(-1).mean()),
        "ppo/score_mean": float(scores.mean()),
        "ppo/rlhf_reward": float((scores - cfg.kl_coef * kl.sum(-1)).mean()),
        "ppo/values_mean": float(masked_mean(values, mask)),
        "ppo/returns_mean": float(masked_mean(returns, mask)),
        "ppo/advantages_mean_raw": float(masked_mean(advantages, mask)),
        "ppo/explained_variance": float(explained_variance(values, returns, mask)),
    }
    return targets, extra


def _accumulate(run: RunParts, ppo: PPO, micro_batches, targets,
                events: Events = NO_EVENTS) -> dict[str, torch.Tensor]:
    """Forward + backward of one mini-batch (its micro-batches); losses are token means over the
    whole mini-batch, so the summed gradient is the mini-batch's."""
    cfg, value_head = ppo.cfg, ppo.value_head
    run.model.train()
    num_items = sum(mb.completion_mask.sum() for mb in micro_batches).clamp(min=1)
    totals: dict[str, torch.Tensor] = {}
    for i, (mb, tg) in enumerate(zip(micro_batches, targets)):
        logps, values = logprobs_and_values(run, value_head, mb)
        pg_loss, pstats = ppo.policy_objective(logps, mb.old_logps, tg.advantages, mb.completion_mask,
                                               num_items_in_batch=num_items)
        vf_tokens, vf_clipped = clipped_value_loss(values, tg.old_values, tg.returns,
                                                   cliprange_value=cfg.cliprange_value)
        vf_loss = aggregate_loss(vf_tokens, mb.completion_mask, "dapo", num_items_in_batch=num_items)
        (pg_loss + cfg.vf_coef * vf_loss).backward()
        if i < len(micro_batches) - 1:
            events.substep_end()
        active = mb.completion_mask.bool()
        parts = {
            "loss": (pg_loss + cfg.vf_coef * vf_loss).detach(),
            "ppo/policy_loss": pg_loss.detach(), "ppo/value_loss": vf_loss.detach(),
            "ppo/value_clipfrac": torch.where(active, vf_clipped, False).sum() / num_items,
            "ppo/approx_kl": torch.where(active, 0.5 * (logps.detach() - mb.old_logps) ** 2, 0.0).sum() / num_items,
            "clip_ratio/region_mean": pstats["clip_ratio/region_mean"] * active.sum() / num_items,
            "ratio_mean": pstats["ratio_mean"] * active.sum() / num_items,
        }
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v
    return totals
