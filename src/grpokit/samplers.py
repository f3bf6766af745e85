"""The samplers: n trajectories for each of some rows of a `PromptSet`. One is chosen once at
start-up (`choose_sampler`): single-turn (one completion from the engine), multi-turn (whole
conversations with tools / environments, grpokit.envs) or TRL's `rollout_func` (the user
samples). Training and evaluation sample through the same classes and get `Trajectories`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from grpokit.data.prompts import PromptSet
from grpokit.rollout.sampling import SamplingParams
from grpokit.trajectory import EXTERNAL, MODEL, Segment, Trajectories


class Sampler(Protocol):
    """Samples `n` trajectories for each of `rows` (groups contiguous, in the order of `rows`)."""

    def sample(self, prompts: PromptSet, rows: list[int], n: int, params: SamplingParams) -> Trajectories: ...


@dataclass(frozen=True)
class SingleTurnSampler:
    """One completion per sample from the engine; a vision-language model's prompt images are
    encoded once a step into `image_features` (grpokit.modeling.vision.ImageFeatures), which the
    training forward reuses while the vision tower is frozen."""

    engine: Any
    image_features: Any = None

    def sample(self, prompts: PromptSet, rows: list[int], n: int, params: SamplingParams) -> Trajectories:
        vision = prompts.images_of(rows)
        images: dict[str, Any] = {}
        if vision is not None:
            images["images"] = vision
            if self.image_features is not None:
                self.image_features.clear()  # new weights since the last step
                images["image_features"] = self.image_features
        outs = self.engine.generate([prompts.prompt_ids[r] for r in rows], n=n, params=params, **images)
        row_index = [rows[o.prompt_index] for o in outs]
        return Trajectories(
            row_index=row_index, prompts=[prompts.prompts[r] for r in row_index],
            completions=[[{"role": "assistant", "content": o.text}] if prompts.conversational else o.text
                         for o in outs],
            prompt_ids=[prompts.prompt_ids[r] for r in row_index],
            completion_ids=[list(o.token_ids) for o in outs], sampling_logps=[list(o.logprobs) for o in outs],
            truncated=torch.tensor([o.finish_reason == "length" for o in outs], dtype=torch.bool),
            images=prompts.images_of(row_index))


@dataclass(frozen=True)
class MultiTurnSampler:
    """Whole conversations with tools / environments (`multiturn`: grpokit.envs.MultiTurn); each
    sample's environment rides with its trajectory for the rewards."""

    engine: Any
    multiturn: Any
    encode: Callable[[Any, dict], list[int]]   # (prompt, chat_template_kwargs) -> ids

    def sample(self, prompts: PromptSet, rows: list[int], n: int, params: SamplingParams) -> Trajectories:
        traj, envs = self.multiturn.rollout(self.engine, [prompts.row(r) for r in rows], n, params,
                                            max_tokens=params.max_tokens, encode=self.encode)
        return dataclasses.replace(traj, row_index=[rows[i] for i in traj.row_index], environments=envs or None)


@dataclass(frozen=True)
class RolloutFuncSampler:
    """TRL's `rollout_func(prompts) -> dict`: called with the prompts (each n times); returns
    prompt_ids, completion_ids and logprobs per completion, optionally env_mask (1 model token,
    0 external) and extra fields, which reach the reward functions as columns. Its ids are
    checked against the vocabulary, its log-prob lists against the completions."""

    rollout_func: Callable[[list], dict]
    decode: Callable[[list[list[int]]], list[str]]   # ids -> texts (special tokens skipped)
    eos_ids: frozenset[int]
    vocab_size: int

    def sample(self, prompts: PromptSet, rows: list[int], n: int, params: SamplingParams) -> Trajectories:
        row_index = [r for r in rows for _ in range(n)]
        texts_in = [prompts.prompts[r] for r in row_index]
        out = self.rollout_func(texts_in)
        required = {"prompt_ids", "completion_ids", "logprobs"}
        if not isinstance(out, dict) or required - set(out):
            missing = sorted(required - set(out)) if isinstance(out, dict) else sorted(required)
            raise ValueError(f"rollout_func must return keys {missing} in its output dict.")
        count = len(texts_in)
        for key in required | ({"env_mask"} & set(out)):
            if out[key] is not None and len(out[key]) != count:
                raise ValueError(f"rollout_func returned {len(out[key])} {key} for {count} prompts (one per "
                                 "completion: each prompt comes G times).")
        completion_ids = [list(map(int, c)) for c in out["completion_ids"]]
        prompt_ids = [list(map(int, p)) for p in out["prompt_ids"]]
        for key, seqs in (("prompt_ids", prompt_ids), ("completion_ids", completion_ids)):
            bad = next(((i, t) for i, seq in enumerate(seqs) for t in seq if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"rollout_func returned token id {bad[1]} in {key}[{bad[0]}]; the model's vocabulary "
                                 f"has ids 0..{self.vocab_size - 1} (tokenize with the trainer's processing_class).")
        if out["logprobs"] is not None:
            for i, (lp, c) in enumerate(zip(out["logprobs"], completion_ids)):
                if len(lp) != len(c):
                    raise ValueError(f"rollout_func: logprobs[{i}] has {len(lp)} values for {len(c)} completion "
                                     "tokens (one log-prob per completion token).")
        logps = out["logprobs"] or [[0.0] * len(c) for c in completion_ids]
        segments = None
        if out.get("env_mask") is not None:
            segments = [segments_of_mask(list(m), len(c), i)
                        for i, (m, c) in enumerate(zip(out["env_mask"], completion_ids))]
        texts = self.decode(completion_ids)
        extra = {k: list(v) for k, v in out.items() if k not in required | {"env_mask"}}
        return Trajectories(
            row_index=row_index, prompts=texts_in,
            completions=[[{"role": "assistant", "content": t}] if prompts.conversational else t for t in texts],
            prompt_ids=prompt_ids, completion_ids=completion_ids,
            sampling_logps=[[float(x) for x in lp] for lp in logps],
            truncated=torch.tensor([not c or c[-1] not in self.eos_ids for c in completion_ids], dtype=torch.bool),
            segments=segments, extra_columns=extra or None)


def segments_of_mask(mask: list, length: int, i: int) -> list[Segment]:
    """rollout_func's env_mask (1 = model token, 0 = tool / environment) as segments."""
    if len(mask) != length:
        raise ValueError(f"rollout_func: env_mask[{i}] has {len(mask)} values for {length} completion tokens.")
    out, start = [], 0
    for t in range(1, length + 1):
        if t == length or bool(mask[t]) != bool(mask[start]):
            out.append(Segment(start, t, MODEL if mask[start] else EXTERNAL))
            start = t
    return out


def choose_sampler(engine, *, multiturn=None, rollout_func=None, tokenizer=None, image_features=None,
                   vocab_size: int = 0) -> Sampler:
    """The sampler of a run, chosen once: rollout_func's, else multi-turn with tools /
    environments, else single-turn."""
    if rollout_func is not None:
        eos = {tokenizer.eos_token_id, tokenizer.pad_token_id} | set(getattr(engine, "eos_ids", ()))
        return RolloutFuncSampler(rollout_func=rollout_func,
                                  decode=lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True),
                                  eos_ids=frozenset(i for i in eos if i is not None), vocab_size=vocab_size)
    if multiturn is not None:
        from grpokit.data import encode_prompt

        return MultiTurnSampler(engine=engine, multiturn=multiturn,
                                encode=lambda prompt, kw: encode_prompt(prompt, tokenizer, kw))
    return SingleTurnSampler(engine=engine, image_features=image_features)
