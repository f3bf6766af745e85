"""Model-based rewards: a sequence-classification reward model as a scorer, and a preference scorer.

`reward_model`: any `AutoModelForSequenceClassification` (hub id or local path) scores
prompt + completion; conversational rows are rendered with the reward model's chat template.
Batched (sorted by length, so padding stays small), on a chosen device, in inference mode.

`preference`: a preference probability for dialogue tasks, compared either with a reference
response column or with the other completions of the same prompt (the group):
  * mode="bt": with a scalar reward model, P(a beats b) = sigmoid((r(a) - r(b)) / temperature)
    (Bradley-Terry, the model reward models are trained with);
  * mode="pairwise": a classifier that reads both responses in one input (`pairwise_template`)
    and outputs the logit of "a is better"; made order-symmetric as
    (sigmoid(s(a, b)) + 1 - sigmoid(s(b, a))) / 2.
Against the group (a group reward: the runner passes one prompt's G completions), `strategy`
chooses the comparisons:
  * "all_pairs" (default): every ordered pair, G (G - 1) comparisons; a completion's reward is its
    mean win probability over the others, so each group's rewards sum to G/2;
  * "swiss": a Swiss tournament, ceil(log2 G) rounds, each pair met in both orders (G=16: 64
    comparisons instead of 240), and the reward is the Bradley-Terry strength fitted to the
    outcomes (`grpokit.rewards.judges.ranking`; mean 0 over the group).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from grpokit.rewards.text import completion_text, is_conversational

if TYPE_CHECKING:
    import torch

__all__ = ["RewardModelReward", "PreferenceReward", "resolve_device_dtype", "prepare_reward_tokenizer",
           "render_reward_input", "encode_reward_inputs", "reward_logits", "score_token_ids"]


def resolve_device_dtype(device: str, dtype: str | torch.dtype) -> tuple[torch.device, torch.dtype]:
    """("auto" | a device string, "auto" | a dtype name | a dtype) -> (device, dtype): auto is cuda when
    available, and bf16 on cuda, fp32 on cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved: torch.dtype
    if dtype == "auto":
        resolved = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    elif isinstance(dtype, str):
        resolved = getattr(torch, dtype)
    else:
        resolved = dtype
    return torch.device(device), resolved


def prepare_reward_tokenizer(tokenizer):
    """A reward model's tokenizer as scoring and `grpokit rm train` use it: a pad token (the EOS when
    there is none), truncation on the left (the completion's end is kept) and padding on the right
    (the positions of the real tokens do not depend on the batch). -> the same tokenizer."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("reward model: the tokenizer has neither a pad nor an eos token; give one.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.truncation_side = "left"
    tokenizer.padding_side = "right"
    return tokenizer


def render_reward_input(tokenizer, prompt: Any, completion: Any) -> tuple[str, bool]:
    """(text, has special tokens already) of one prompt + completion, the one rendering of a reward
    model's input (scoring here, training in grpokit.rm): a conversation (the prompt or the
    completion a list of messages) through the tokenizer's chat template, a string prompt becoming
    the user turn (none when it is empty) and a string completion the assistant turn; plain text
    is prompt + completion."""
    if is_conversational(prompt) or is_conversational(completion):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("reward model: conversational data but the reward model's tokenizer has no chat "
                             "template; pass reward_kwargs chat_template=... (a Jinja string).")
        if is_conversational(prompt):
            messages = list(prompt)
        else:
            messages = [] if prompt is None or prompt == "" or prompt == [] else \
                [{"role": "user", "content": str(prompt)}]
        messages += list(completion) if is_conversational(completion) else \
            [{"role": "assistant", "content": completion_text(completion)}]
        return tokenizer.apply_chat_template(messages, tokenize=False), True
    return f"{'' if prompt is None else prompt}{completion_text(completion)}", False


def encode_reward_inputs(tokenizer, texts: Sequence[tuple[str, bool]], max_length: int | None) -> list[list[int]]:
    """Token ids of rendered inputs (`render_reward_input`), at most `max_length` each, cut on the left
    (the tokenizer of `prepare_reward_tokenizer`)."""
    return [tokenizer(t, add_special_tokens=not templated, truncation=max_length is not None,
                      max_length=max_length)["input_ids"] for t, templated in texts]


def reward_logits(model, tokenizer, seqs: Sequence[list[int]], device, label_index: int = 0) -> torch.Tensor:
    """One forward of a sequence classifier over token-id sequences, right-padded by the tokenizer
    (`prepare_reward_tokenizer`) -> logit `label_index` of each, float32 (with gradients when enabled)."""
    batch = tokenizer.pad({"input_ids": list(seqs)}, return_tensors="pt")
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, label_index].float()


def score_token_ids(model, tokenizer, seqs: Sequence[list[int]], batch_size: int, device,
                    label_index: int = 0) -> list[float]:
    """The reward (logit `label_index`) of each token-id sequence, in batches of similar length
    (sorted, so padding stays small), in inference mode with the model in eval mode; the order of
    `seqs` kept. The one scoring of RewardModelReward and of `grpokit rm train`'s evaluation."""
    import torch

    was_training = model.training
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                values = reward_logits(model, tokenizer, [seqs[i] for i in idx], device, label_index)
                for i, value in zip(idx, values.cpu().tolist()):
                    out[i] = value
    finally:
        model.train(was_training)
    return out


class _Scorer:
    """A loaded sequence classifier: texts -> one float each (logit `label_index`)."""

    def __init__(self, model_name_or_path, device="auto", dtype="auto", batch_size=16, max_length=None,
                 label_index=0, trust_remote_code=False, tokenizer=None, chat_template=None):
        from transformers import AutoModelForSequenceClassification

        from grpokit.modeling.tokenizers import load_pretrained_tokenizer  # as saved (AutoTokenizer's
        # model-type class would read grpokit's character tokenizer without its spaces)

        self.device, dtype = resolve_device_dtype(device, dtype)
        if isinstance(model_name_or_path, str):
            model = AutoModelForSequenceClassification.from_pretrained(
                model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            model = model_name_or_path
        tok = tokenizer if tokenizer is not None else \
            model_name_or_path if isinstance(model_name_or_path, str) else model.config._name_or_path
        if isinstance(tok, str):
            tok = load_pretrained_tokenizer(tok, trust_remote_code=trust_remote_code)
        prepare_reward_tokenizer(tok)  # pad token; left truncation keeps the completion's end; right padding
        if model.config.pad_token_id is None:  # the classifier pools at the last non-pad token
            model.config.pad_token_id = tok.pad_token_id
        if chat_template is not None:
            tok.chat_template = chat_template
        if not 0 <= label_index < model.config.num_labels:
            raise ValueError(f"reward model: label_index={label_index} but the model has "
                             f"{model.config.num_labels} labels.")
        self.model = model.to(self.device).eval()
        self.tokenizer, self.batch_size, self.label_index = tok, int(batch_size), label_index
        limit = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
        self.max_length = min(max_length or limit, limit)

    def render(self, prompt: Any, completion: Any) -> tuple[str, bool]:
        """(text, has special tokens already) for one prompt + completion (`render_reward_input`)."""
        return render_reward_input(self.tokenizer, prompt, completion)

    def score(self, texts: list[tuple[str, bool]]) -> list[float]:

        encoded = encode_reward_inputs(self.tokenizer, texts, self.max_length)
        return score_token_ids(self.model, self.tokenizer, encoded, self.batch_size, self.device, self.label_index)


class RewardModelReward:
    """The reward model's score of prompt + completion (its logit `label_index`, default 0).

    model_name_or_path: hub id or local path of an AutoModelForSequenceClassification (or a loaded model).
    device: "auto" (cuda if available), "cpu", "cuda:1", ...; dtype: "auto" (bf16 on cuda, fp32 on cpu).
    batch_size, max_length: batching and truncation (left: the completion's end is kept).
    chat_template: override the tokenizer's template for conversational rows.
    """

    use_process_pool = False  # one model in this process, on the chosen device

    def __init__(self, model_name_or_path, device: str = "auto", dtype: str = "auto", batch_size: int = 16,
                 max_length: int | None = None, label_index: int = 0, trust_remote_code: bool = False,
                 tokenizer=None, chat_template: str | None = None):
        self.__name__ = "reward_model"
        self.scorer = _Scorer(model_name_or_path, device, dtype, batch_size, max_length, label_index,
                              trust_remote_code, tokenizer, chat_template)

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None, **columns) -> list[float]:
        return self.scorer.score([self.scorer.render(p, c) for p, c in zip(prompts, completions)])


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _group_key(prompt: Any) -> str:
    return json.dumps(prompt, sort_keys=True, default=str) if not isinstance(prompt, str) else prompt


class PreferenceReward:
    """Probability that the completion is preferred: to the reference response in `reference_column`,
    or (reference_column=None) on average to the other completions of its prompt.

    mode: "bt" (scalar reward model, Bradley-Terry) or "pairwise" (a classifier over both
    responses, formatted by `pairwise_template` with {prompt}, {a} and {b}).
    Other keyword arguments are those of `reward_model`.
    """

    use_process_pool = False

    def __init__(self, model_name_or_path, reference_column: str | None = None, mode: str = "bt",
                 temperature: float = 1.0, pairwise_template: str | None = None, strategy: str = "all_pairs",
                 alpha: float = 0.1, **model_kwargs):
        if strategy not in ("all_pairs", "swiss"):
            raise ValueError(f"preference: strategy={strategy!r}; use all_pairs or swiss.")
        if mode not in ("bt", "pairwise"):
            raise ValueError(f"preference: mode={mode!r}; use bt or pairwise.")
        if mode == "pairwise" and not pairwise_template:
            raise ValueError("preference: mode='pairwise' needs pairwise_template, e.g. "
                             "'{prompt}\\n[A] {a}\\n[B] {b}'.")
        if temperature <= 0:
            raise ValueError(f"preference: temperature must be > 0, got {temperature}.")
        self.__name__ = "preference"
        self.reference_column, self.mode, self.temperature = reference_column, mode, float(temperature)
        self.pairwise_template = pairwise_template
        self.strategy, self.alpha = strategy, float(alpha)
        self.scores_groups = reference_column is None  # compared within the group: the runner passes whole groups
        self.scorer = _Scorer(model_name_or_path, **model_kwargs)

    def check_columns(self, columns: set[str]) -> None:
        if self.reference_column is not None and self.reference_column not in columns:
            raise ValueError(f"reference_column {self.reference_column!r} is not a dataset column "
                             f"(columns: {sorted(columns)}).")

    def _win_probs(self, prompt, pairs: list[tuple[Any, Any]]) -> list[float]:
        """P(a beats b) for each (a, b) sharing `prompt`."""
        if self.mode == "bt":  # each distinct response is scored once
            rendered = [(self.scorer.render(prompt, a), self.scorer.render(prompt, b)) for a, b in pairs]
            distinct = list(dict.fromkeys(t for pair in rendered for t in pair))
            r = dict(zip(distinct, self.scorer.score(distinct)))
            return [_sigmoid((r[a] - r[b]) / self.temperature) for a, b in rendered]
        p = completion_text(prompt) if is_conversational(prompt) else str(prompt)
        assert self.pairwise_template is not None  # mode="pairwise" requires it (checked in __init__)
        fmt = self.pairwise_template.format
        texts = [(fmt(prompt=p, a=completion_text(a), b=completion_text(b)), False) for a, b in pairs]
        texts += [(fmt(prompt=p, a=completion_text(b), b=completion_text(a)), False) for a, b in pairs]
        s = self.scorer.score(texts)
        n = len(pairs)
        return [(_sigmoid(s[k] / self.temperature) + 1 - _sigmoid(s[n + k] / self.temperature)) / 2 for k in range(n)]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids=None, **columns) -> list[float | None]:
        n = len(completions)
        if self.reference_column is not None:
            refs = columns[self.reference_column]
            out: list[float | None] = [None] * n
            todo = [i for i in range(n) if refs[i] is not None]
            for i, prob in zip(todo, self._batched(prompts, [(completions[i], refs[i]) for i in todo], todo)):
                out[i] = prob
            return out
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(_group_key(p), []).append(i)
        out = [0.5] * n  # alone in its group: no one to compare with
        for rows in groups.values():
            if len(rows) < 2:
                continue
            if self.strategy == "swiss":
                for i, theta in zip(rows, self._tournament(prompts[rows[0]], [completions[i] for i in rows])):
                    out[i] = theta
                continue
            pairs = [(i, j) for i in rows for j in rows if i != j]
            probs = self._batched(prompts, [(completions[i], completions[j]) for i, j in pairs], [i for i, _ in pairs])
            wins: dict[int, list[float]] = {}
            for (i, _), prob in zip(pairs, probs):
                wins.setdefault(i, []).append(prob)
            for i, ps in wins.items():
                out[i] = sum(ps) / len(ps)
        return out

    def _tournament(self, prompt, group: list) -> list[float]:
        """Bradley-Terry strengths of one group's completions from a Swiss tournament."""
        from grpokit.rewards.judges.ranking import bradley_terry, play_tournament

        played = play_tournament(len(group), lambda pairs: self._win_probs(prompt, [(group[a], group[b])
                                                                                   for a, b in pairs]))
        return bradley_terry(len(group), played.outcomes, self.alpha)

    def _batched(self, prompts, pairs, rows) -> list[float]:
        """Win probabilities for pairs whose prompts are prompts[rows[k]]; one scorer pass per prompt."""
        by_prompt: dict[str, list[int]] = {}
        for k, r in enumerate(rows):
            by_prompt.setdefault(_group_key(prompts[r]), []).append(k)
        out = [0.0] * len(pairs)
        for ks in by_prompt.values():
            for k, prob in zip(ks, self._win_probs(prompts[rows[ks[0]]], [pairs[k] for k in ks])):
                out[k] = prob
        return out
