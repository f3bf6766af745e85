"""Held-out evaluation: greedy accuracy and pass@k of a policy on a prompt dataset.

Correctness comes from the task's `is_correct` when the data is a built-in task, else from the
reward functions: a completion is correct when its total reward reaches `correct_threshold`
(default 1.0, the value the rule-based rewards give a right answer)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from grpokit.data.prompts import PromptSet
from grpokit.rollout import SamplingParams
from grpokit.samplers import MultiTurnSampler, Sampler, SingleTurnSampler
from grpokit.trajectory import Trajectories


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for n samples with c correct.
    e.g. n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class Evaluator:
    """An eval set's prompts and how a completion is judged; samples through the run's samplers
    (grpokit.samplers: single-turn, or multi-turn with the run's tools / environments)."""

    prompts: PromptSet
    max_tokens: int
    stop: list[str]
    is_correct: Callable[..., bool] | None = None
    reward_runner: Any = None
    correct_threshold: float = 1.0
    multiturn: Any = None               # grpokit.envs.MultiTurn: conversations with tools / environments
    encode: Callable | None = None      # (prompt, chat_template_kwargs) -> ids, for multi-turn prompts
    without_tools: "Evaluator | None" = None   # the same prompts with no tools offered (eval/accuracy_without_tools)

    @property
    def prompt_ids(self) -> list[list[int]]:
        return self.prompts.prompt_ids

    @classmethod
    def build(cls, dataset, tokenizer, *, task=None, reward_runner=None, config=None, max_prompt_length=None,
              multiturn=None, processor=None):
        from grpokit import data
        from grpokit.data import vision as data_vision

        max_len = config.max_prompt_length if config is not None else max_prompt_length
        kwargs = config.chat_template_kwargs if config is not None else None
        tools_of_row = None
        if multiturn is not None:
            tools_of_row = lambda i: multiturn.row_tools(dict(dataset[i]))  # noqa: E731
        vision = None
        if any(c in dataset.column_names for c in data_vision.IMAGE_COLUMNS) and processor is None:
            raise ValueError("eval_dataset has an image column, but the model is not a vision-language model "
                             "(it has no processor to put images in its prompts).")
        if processor is not None and multiturn is None:  # a VLM's prompts through its processor, as in training
            prompt_ids, vision = data_vision.encode_rows(dataset, processor, max_prompt_length=max_len,
                                                         chat_template_kwargs=kwargs)
            vision = vision if any(v is not None for v in vision) else None
        else:
            prompt_ids = data.validate_prompts(dataset, tokenizer, max_prompt_length=max_len,
                                               chat_template_kwargs=kwargs, tools_of_row=tools_of_row)
        rows = [dict(r) for r in dataset]
        without = None
        if multiturn is not None and multiturn.environments is None and task is not None:  # a built-in tool task
            without = cls.build(dataset, tokenizer, task=task, reward_runner=reward_runner, config=config,
                                max_prompt_length=max_prompt_length)
        return cls(prompts=PromptSet.from_rows(rows, prompt_ids, conversational=data.is_conversational(rows[0]),
                                               vision=vision),
                   without_tools=without, max_tokens=config.max_completion_length if config is not None else 256,
                   stop=list(config.stop) if config is not None else [],
                   is_correct=task.is_correct if task is not None else None, reward_runner=reward_runner,
                   multiturn=multiturn, encode=lambda p, kw: data.encode_prompt(p, tokenizer, kw))

    def sampler(self, engine) -> Sampler:
        """How this eval set is sampled with `engine`: whole conversations with the run's tools, or
        one completion."""
        if self.multiturn is not None:
            assert self.encode is not None
            return MultiTurnSampler(engine=engine, multiturn=self.multiturn, encode=self.encode)
        return SingleTurnSampler(engine=engine)

    def _correct(self, traj: Trajectories, n: int) -> list[bool]:
        """Whether each completion is right; `n`: completions per prompt (a group reward sees them
        together)."""
        rows = traj.row_index
        if self.is_correct is not None:
            return [bool(self.is_correct(c, **{k: v for k, v in self.prompts.row(r).items() if k != "prompt"}))
                    for r, c in zip(rows, traj.completions)]
        extras = {"environments": traj.environments} if traj.environments else None
        out = self.reward_runner(traj.prompts, traj.completions, completion_ids=None,
                                 columns=self.prompts.columns_of(rows), extras=extras, group_size=n)
        return [bool(v >= self.correct_threshold) for v in torch.nan_to_num(out.total, nan=0.0).tolist()]

    def greedy(self, engine, batch_size: int = 256, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        """Greedy decoding of every prompt (whole conversations with tools): eval/accuracy and
        eval/mean_length (model tokens); `on_batch()` after each batch of prompts."""
        params = SamplingParams(max_tokens=self.max_tokens, temperature=0.0, stop=self.stop, seed=0)
        sampler = self.sampler(engine)
        correct, lengths = [], []
        for start in range(0, len(self.prompt_ids), batch_size):
            ids = list(range(start, min(start + batch_size, len(self.prompt_ids))))
            traj = sampler.sample(self.prompts, ids, 1, params)
            correct += self._correct(traj, 1)
            lengths += [sum(traj.trained_mask(j)) for j in range(len(traj))]  # model tokens
            if on_batch is not None:
                on_batch()
        out = {"eval/accuracy": sum(correct) / len(correct), "eval/mean_length": sum(lengths) / len(lengths)}
        if self.without_tools is not None:  # the contrast: the same model, no tool offered
            out["eval/accuracy_without_tools"] = self.without_tools.greedy(engine, batch_size)["eval/accuracy"]
        return out

    def pass_at(self, engine, *, n: int, ks: tuple[int, ...], temperature: float = 1.0, seed: int = 0,
                batch_size: int = 32, top_p: float = 1.0, top_k: int = 0) -> dict[str, float]:
        """Sample n completions per prompt; unbiased pass@k for each k <= n, and mean accuracy."""
        params = SamplingParams(max_tokens=self.max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                stop=self.stop, seed=seed)
        sampler = self.sampler(engine)
        totals = {k: 0.0 for k in ks if k <= n}
        frac = 0.0
        for start in range(0, len(self.prompt_ids), batch_size):
            ids = list(range(start, min(start + batch_size, len(self.prompt_ids))))
            ok = self._correct(sampler.sample(self.prompts, ids, n, params), n)
            for j in range(len(ids)):
                c = sum(ok[j * n:(j + 1) * n])
                frac += c / n
                for k in totals:
                    totals[k] += pass_at_k(n, c, k)
        m = len(self.prompt_ids)
        return {"eval/sample_accuracy": frac / m, **{f"eval/pass@{k}": v / m for k, v in totals.items()}}


@dataclass
class NamedEvaluators:
    """Several eval sets (TRL's `eval_dataset={"name": ds, ...}` or a `DatasetDict`): each set's
    metrics under `eval_<name>/...` (transformers' prefix `eval_<name>`)."""

    evaluators: dict[str, Evaluator]

    @classmethod
    def build(cls, datasets: dict, tokenizer, **kwargs) -> "NamedEvaluators":
        if not datasets:
            raise ValueError("eval_dataset is an empty mapping; give at least one named eval set.")
        return cls({str(name): Evaluator.build(ds, tokenizer, **kwargs) for name, ds in datasets.items()})

    def greedy(self, engine, batch_size: int = 256, on_batch: Callable[[], None] | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, evaluator in self.evaluators.items():
            for key, value in evaluator.greedy(engine, batch_size=batch_size, on_batch=on_batch).items():
                out[key.replace("eval/", f"eval_{name}/", 1)] = value
        return out


def build_evaluator(eval_dataset, tokenizer, **kwargs):
    """An `Evaluator` for one eval set, `NamedEvaluators` for a mapping of them (dict, DatasetDict)."""
    if isinstance(eval_dataset, dict):  # datasets.DatasetDict is a dict
        return NamedEvaluators.build(eval_dataset, tokenizer, **kwargs)
    return Evaluator.build(eval_dataset, tokenizer, **kwargs)
