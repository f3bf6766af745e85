"""DPO (and IPO) on preference pairs, on grpokit's engine, rewards, data, tracking and evaluation.

Two sources of pairs, chosen by the training data:

- offline: a preference dataset with columns prompt / chosen / rejected (TRL's format, standard
  strings or conversational message lists). A step takes `per_device_train_batch_size *
  gradient_accumulation_steps` pairs (TRL's DPO meaning: the batch counts pairs).
- online: a prompt dataset (or a built-in task) and reward functions. A step samples G completions
  per prompt exactly as GRPO does, scores them, and pairs each group's best completion (chosen) with
  its worst (rejected); groups without a spread give no pair. The other G - 2 samples are not
  trained on: that is DPO's pairwise limit the comparison measures.

One step:  pairs -> reference sequence logprobs (no gradient; LoRA: adapter off, else a frozen copy)
           -> policy sequence logprobs -> loss (algos.dpo_loss: sigmoid or ipo) -> one optimizer step.

Sequence logprobs are taken at temperature 1 (DPO's implicit reward is log pi / pi_ref of the policy
itself, whatever temperature sampled the online pairs); sums for sigmoid, token means for ipo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from grpokit.algos import DPO_AVERAGE_LOGPS, DPO_LOSSES, best_worst_pairs, dpo_loss, sequence_logps
from grpokit.baselines.common import AlgoConfig, parameter_counts, reference_logprobs
from grpokit.config import config_field, one_of
from grpokit.core.batch import make_micro_batches
from grpokit.core.events import NO_EVENTS, Events
from grpokit.core.loop import LoopState, StepOutput, sample_and_score, timed, train_loop
from grpokit.core.run import RunParts, build_run
from grpokit.facade import RunFacade
from grpokit.trajectory import Trajectories


@dataclass(init=False)
class DPOConfig(AlgoConfig):
    """The fields every algorithm uses (model, data, sampling, optimizer, logging) plus TRL
    DPOConfig's `beta` (the DPO temperature, not GRPO's KL coefficient), `loss_type` (DPO's
    losses) and `label_smoothing`."""

    beta: float = config_field(0.1, "DPO temperature: scales the implicit reward log pi/pi_ref (TRL's default 0.1).")
    loss_type: str = config_field("sigmoid", "DPO loss: sigmoid (DPO) | ipo (IPO, on token-mean logprobs).")
    label_smoothing: float = config_field(0.0, "Conservative DPO: probability e that a pair's label is flipped "
                                               "(sigmoid only).")

    EQUIVALENTS: ClassVar[dict[str, str]] = {
        "epsilon": "DPO has no ratio to clip.", "epsilon_high": "DPO has no ratio to clip.",
        "kl_estimator": "DPO's KL to the reference is implicit (beta).",
        "scale_rewards": "DPO uses only the order of the rewards within a group.",
        "advantage_estimator": "DPO uses only the best and worst of a group.",
        "num_iterations": "DPO makes one optimizer step per batch of pairs.",
    }

    def validate(self) -> None:
        super().validate()
        need = self.need
        need(self.loss_type in DPO_LOSSES, one_of("loss_type", self.loss_type, sorted(DPO_LOSSES)))
        need(self.beta > 0, "beta must be > 0 (it scales the implicit reward; 0.1 is TRL's default).")
        need(0 <= self.label_smoothing < 0.5 and (not self.label_smoothing or self.loss_type == "sigmoid"),
             "label_smoothing must be in [0, 0.5), and 0 unless loss_type='sigmoid'.")


def _no_reward(prompts, completions, **kwargs):
    raise ValueError("this DPO run trains on a preference dataset and has no reward function to score "
                     "completions with; pass reward_funcs= (or use a built-in task) to evaluate it.")


class DPOTrainer(RunFacade):
    """`DPOTrainer(model=..., args=DPOConfig(...), train_dataset=..., eval_dataset=...,
    processing_class=..., peft_config=..., reward_funcs=...)` then `.train()`.

    With a train_dataset holding "chosen" and "rejected" columns the pairs come from it (TRL's
    DPOTrainer); otherwise they are built online from sampled groups scored by `reward_funcs` (or
    the built-in task's rewards). The reference is the base with the LoRA adapter off, else a
    frozen copy of the initial policy."""

    def __init__(self, model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, reward_funcs=None, optimizers=(None, None), **kwargs):
        self._take_args(DPOConfig, args, kwargs)
        cfg = self.args
        self.offline = _is_preference_data(train_dataset, cfg)
        if self.offline and cfg.remove_unused_columns:
            raise ValueError("DPOConfig: remove_unused_columns=True would drop the chosen/rejected columns; set it to False.")
        if self.offline and reward_funcs is None and not cfg.reward_funcs:
            if eval_dataset is not None or cfg.dataset_test_split:
                raise ValueError("DPOTrainer: evaluating on a held-out set needs reward_funcs= to decide what is "
                                 "correct (a preference dataset has no reward function of its own).")
            reward_funcs = [_no_reward]
        # offline: a step takes per_device_train_batch_size * gradient_accumulation_steps pairs (rows)
        run = build_run(cfg, model=model, reward_funcs=reward_funcs, train_dataset=train_dataset,
                        eval_dataset=eval_dataset, tokenizer=processing_class, peft_config=peft_config,
                        optimizers=optimizers, needs_reference=True,
                        rows_per_step_factor=cfg.num_generations if self.offline else 1)
        cfg.check_single_process(run.comm.world_size)
        self.pairs: list[tuple[list[int], list[int]]] | None = None
        if self.offline:
            cols = run.train.columns
            self.pairs = [tokenize_pair(run.train.prompts[i], cols["chosen"][i], cols["rejected"][i],
                                        run.tokenizer, cfg.max_completion_length, row=i)
                          for i in range(len(run.train))]
        self.parts: RunParts = run
        self.param_counts = parameter_counts(run)
        self._init_surface(None, eval_dataset)

    def summary(self) -> str:
        c, run = self.args, self.parts
        ref = "base model with the adapter off (LoRA)" if run.is_peft else "frozen copy of the initial model"
        if self.offline:
            source = (f"  DPO on {len(run.train)} preference pairs; "
                      f"{c.per_device_train_batch_size * c.gradient_accumulation_steps} pairs per step")
        else:
            per_step = c.per_device_train_batch_size * c.gradient_accumulation_steps
            source = (f"  online DPO: per step {per_step // c.num_generations} prompts x {c.num_generations} = "
                      f"{per_step} completions, one (best, worst) pair per group with a reward spread")
        return "\n".join(run.summary().splitlines()[:2] + [
            source + f"; {run.total_steps} steps, one optimizer step each",
            f"  loss_type={c.loss_type}, beta={c.beta}, label_smoothing={c.label_smoothing}, lr={c.learning_rate}; "
            f"reference: {ref}",
        ])

    def train(self, resume_from_checkpoint: str | bool | None = None) -> dict:
        """Run the DPO loop; returns the final metrics."""
        run = self._start_training()
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else self.args.resume_from_checkpoint
        run.tracker.begin(resuming=bool(resume))
        run.tracker.log(0, {k: float(v) for k, v in self.param_counts.items()})
        final = train_loop(run, DPO(self.args, self.pairs), resume_from_checkpoint=resume, summary=self.summary(),
                           resume_command=getattr(self, "resume_command", None), events=self.surface)
        return self.surface.output(final)


def _is_preference_data(train_dataset, cfg) -> bool:
    if train_dataset is None and cfg.dataset_name is None:
        return False
    if train_dataset is None or isinstance(train_dataset, str):
        from grpokit.data import load_dataset_spec

        train_dataset = load_dataset_spec(train_dataset or cfg.dataset_name, split=cfg.dataset_train_split,
                                          config_name=cfg.dataset_config)
    columns = set(train_dataset.column_names)
    if ("chosen" in columns) != ("rejected" in columns):
        raise ValueError(f"DPOTrainer: a preference dataset needs both 'chosen' and 'rejected' columns; it has {sorted(columns)}.")
    return "chosen" in columns


def tokenize_pair(prompt, chosen, rejected, tokenizer, max_len: int, row: int = 0) -> tuple[list[int], list[int]]:
    """Completion token ids of a (chosen, rejected) pair, each cut to `max_len` tokens.

    Standard format: the text tokenized without special tokens, then EOS (as a sampled completion
    ends). Conversational: prompt + answer rendered with the chat template, minus the rendered
    prompt (so the template's end-of-turn tokens are included)."""
    from grpokit.data import render_prompt

    def ids(answer):
        if isinstance(answer, str):
            out = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                out = out + [tokenizer.eos_token_id]
        else:
            head = render_prompt(prompt, tokenizer)
            full = tokenizer.apply_chat_template(list(prompt) + list(answer), tokenize=False)
            if not full.startswith(head):
                raise ValueError(f"row {row}: the chat template renders prompt + answer differently from the prompt "
                                 "alone, so the answer's tokens cannot be separated.")
            out = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        if not out:
            raise ValueError(f"row {row}: an empty chosen/rejected completion.")
        return list(out[:max_len])

    return ids(chosen), ids(rejected)


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------

class DPO:
    """DPO's step on the shared loop: pairs from the dataset (offline) or from sampled groups."""

    def __init__(self, cfg: DPOConfig, pairs: list[tuple[list[int], list[int]]] | None):
        self.cfg, self.pairs = cfg, pairs

    def step(self, run: RunParts, rows: list[int], state: LoopState, phase: dict,
             events: Events = NO_EVENTS) -> StepOutput:
        if self.pairs is not None:
            return offline_dpo_step(run, self.cfg, self.pairs, rows, phase, events)
        return online_dpo_step(run, self.cfg, rows, state, phase, events)


def online_dpo_step(run: RunParts, cfg: DPOConfig, rows: list[int], state: LoopState, phase: dict,
                    events: Events = NO_EVENTS) -> StepOutput:
    rollout = sample_and_score(run, rows, state, phase)
    chosen, rejected = best_worst_pairs(rollout.rewards, cfg.num_generations)
    # the role a sample plays, for the completions table: +1 chosen, -1 rejected, 0 not trained on
    preference = torch.zeros(len(rollout))
    preference[chosen], preference[rejected] = 1.0, -1.0
    order = torch.stack([chosen, rejected], 1).view(-1).tolist()   # c0, r0, c1, r1, ...
    pairs = rollout.select(order)
    stats, applied = _dpo_update(run, cfg, pairs, pairs_per_micro_batch=max(1, cfg.per_device_train_batch_size // 2),
                                 phase=phase, events=events)
    groups = len(rollout.completion_ids) // cfg.num_generations
    extra = {"dpo/pairs": float(len(chosen)), "dpo/frac_groups_without_pair": 1 - len(chosen) / groups}
    return StepOutput(rollout=rollout, step_stats=[stats], samples=len(rollout), extra=extra,
                      skipped=int(not applied), per_sample={"preference": preference})


def offline_dpo_step(run: RunParts, cfg: DPOConfig, pairs_ids, rows: list[int], phase: dict,
                     events: Events = NO_EVENTS) -> StepOutput:
    cols = run.train.columns
    n = 2 * len(rows)
    pairs = Trajectories(
        row_index=[r for r in rows for _ in (0, 1)], prompts=[run.train.prompts[r] for r in rows for _ in (0, 1)],
        completions=[cols[k][r] for r in rows for k in ("chosen", "rejected")],
        prompt_ids=[run.train.prompt_ids[r] for r in rows for _ in (0, 1)],
        completion_ids=[pairs_ids[r][j] for r in rows for j in (0, 1)],
        sampling_logps=[[0.0] * len(pairs_ids[r][j]) for r in rows for j in (0, 1)],
        truncated=torch.zeros(n, dtype=torch.bool),
        images=[run.train.vision[r] for r in rows for _ in (0, 1)] if run.train.vision is not None else None)
    stats, applied = _dpo_update(run, cfg, pairs, pairs_per_micro_batch=cfg.per_device_train_batch_size,
                                 phase=phase, events=events)
    return StepOutput(rollout=None, step_stats=[stats], samples=n,
                      extra={"dpo/pairs": float(len(rows))}, skipped=int(not applied))


def _dpo_update(run: RunParts, cfg: DPOConfig, pairs: Trajectories, *, pairs_per_micro_batch: int, phase: dict,
                events: Events = NO_EVENTS) -> tuple[dict[str, torch.Tensor], bool]:
    """One optimizer step on the pairs (rows 2k chosen, 2k+1 rejected); loss = mean over pairs.
    With no pair the optimizer step changes nothing (no gradient) but the schedule advances."""
    num_pairs = len(pairs.completion_ids) // 2
    totals: dict[str, torch.Tensor] = {}
    if num_pairs:
        micro_batches = make_micro_batches(pairs, 2 * pairs_per_micro_batch, pad_id=run.pad_id, device=run.device,
                                           mask_truncated=cfg.mask_truncated_completions)
        average = DPO_AVERAGE_LOGPS[cfg.loss_type]
        with timed(phase, "time/logprobs"), torch.no_grad():
            ref = []
            for mb in micro_batches:
                ref.append(sequence_logps(reference_logprobs(run, mb, temperature=1.0), mb.completion_mask,
                                          average=average))
        run.model.train()
        with timed(phase, "time/backward"):
            for i, (mb, ref_seq) in enumerate(zip(micro_batches, ref)):
                logps = sequence_logps(run.forward(mb, temperature=1.0)[0], mb.completion_mask, average=average)
                losses, r_chosen, r_rejected = dpo_loss(logps[0::2], logps[1::2], ref_seq[0::2], ref_seq[1::2],
                                                        beta=cfg.beta, loss_type=cfg.loss_type,
                                                        label_smoothing=cfg.label_smoothing)
                loss = losses.sum() / num_pairs
                loss.backward()
                if i < len(micro_batches) - 1:
                    events.substep_end()
                parts = {"loss": loss.detach(), "dpo/rewards_chosen": r_chosen.sum() / num_pairs,
                         "dpo/rewards_rejected": r_rejected.sum() / num_pairs,
                         "dpo/margin": (r_chosen - r_rejected).sum() / num_pairs,
                         "dpo/accuracy": (r_chosen > r_rejected).float().sum() / num_pairs,
                         "dpo/logps_chosen": logps[0::2].detach().sum() / num_pairs,
                         "dpo/logps_rejected": logps[1::2].detach().sum() / num_pairs}
                for k, v in parts.items():
                    totals[k] = totals.get(k, 0.0) + v
    with timed(phase, "time/optimizer"):
        applied, totals["grad_norm"] = run.optimizer_step(events)
    return totals, applied
