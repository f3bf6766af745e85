"""Data and evaluation of grpokit's SFT (grpokit.sft.trainer): (prompt, completion) pairs tokenized with the
prompt rendered as in GRPO, padded batches with completion-only labels, and a greedy / pass@k check
on a task's held-out split."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from grpokit.sft.config import SFTConfig


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _completion_ids(prompt, completion, prompt_text: str, tokenizer, chat_template_kwargs=None) -> list[int]:
    """Token ids of the completion, ending with EOS (a conversational one: at its last EOS)."""
    if isinstance(completion, str):
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    else:  # conversational: render prompt + completion and keep what follows the prompt (as TRL)
        full = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False,
                                             **(chat_template_kwargs or {}))
        if not full.startswith(prompt_text):
            raise ValueError("the chat template of prompt + completion does not start with the prompt's rendering")
        ids = tokenizer(full[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
        if ends:  # what the template writes after the last turn's EOS is not the model's
            ids = ids[: ends[-1] + 1]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = [*ids, tokenizer.eos_token_id]
    return ids


def tokenize_pairs(prompts, completions, tokenizer, max_length: int | None,
                   chat_template_kwargs: dict | None = None) -> list[tuple[list[int], int]]:
    """(input_ids, prompt_length) per example, truncated to max_length; `chat_template_kwargs`
    (e.g. a tool task's `tools`) reach the chat template."""
    from grpokit.data.loading import encode_prompt, render_prompt

    examples = []
    kw = chat_template_kwargs
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = encode_prompt(prompt, tokenizer, kw)
        ids = prompt_ids + _completion_ids(prompt, completion, render_prompt(prompt, tokenizer, kw), tokenizer, kw)
        if max_length is not None:
            ids = ids[:max_length]
        examples.append((ids, min(len(prompt_ids), len(ids))))
    return examples


def collate(examples, pad_token_id: int, completion_only_loss: bool):
    """Right-padded input_ids, attention_mask and labels (-100 on padding and, optionally, the prompt)."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), -100, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        n = len(ids)
        input_ids[row, :n] = torch.tensor(ids)
        attention_mask[row, :n] = 1
        start = prompt_len if completion_only_loss else 0
        labels[row, start:n] = input_ids[row, start:n]
    return input_ids, attention_mask, labels


def num_label_tokens(ids: list[int], prompt_len: int, completion_only_loss: bool) -> int:
    """Tokens that carry a label after the one-position shift (matches collate)."""
    start = prompt_len if completion_only_loss else 0
    return len(ids) - max(start, 1)


def load_sft_data(cfg: SFTConfig, tokenizer):
    """(prompts, completions, task or None)."""
    if cfg.task is not None:
        from grpokit.data.tasks import get_task

        task = get_task(cfg.task, **cfg.task_kwargs)
        if task.reference_completion is None:
            raise ValueError(f"task {cfg.task!r} has no reference completions to fine-tune on")
        rows = task.train_dataset.to_list()
        return [r["prompt"] for r in rows], [task.reference_completion(r) for r in rows], task
    from grpokit.data.loading import load_dataset_spec

    dataset = load_dataset_spec(cfg.dataset_name, split=cfg.dataset_train_split, config_name=cfg.dataset_config)
    missing = [c for c in ("prompt", "completion") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"SFT needs a prompt-completion dataset; {cfg.dataset_name!r} lacks {missing} "
            f"(columns: {dataset.column_names})"
        )
    if len(dataset) == 0:
        raise ValueError(f"dataset {cfg.dataset_name!r} is empty")
    return list(dataset["prompt"]), list(dataset["completion"]), None


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_on_task(
    model,
    tokenizer,
    dataset,
    is_correct,
    *,
    num_samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy and pass@num_samples on `dataset`, with plain HF `generate`.

    A measurement helper (not the fast rollout engine): pure temperature sampling (no top-k/top-p),
    pass@k = fraction of prompts with at least one correct sample among k, sample_accuracy = mean
    correctness of all samples. Returns {"greedy_accuracy", "pass@k", "sample_accuracy"}.
    """
    from grpokit.data.loading import encode_prompt

    was_training = model.training
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    rows = dataset.to_list()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    greedy_hits, any_hits, sample_hits = 0, 0, 0
    common = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        top_k=None,
        top_p=None,
    )
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            encoded = tokenizer.pad(
                {"input_ids": [encode_prompt(r["prompt"], tokenizer) for r in chunk]}, return_tensors="pt"
            )
            input_ids = encoded["input_ids"].to(device)
            attention_mask = encoded["attention_mask"].to(device)
            width = input_ids.shape[1]
            greedy = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **common)
            texts = tokenizer.batch_decode(greedy[:, width:], skip_special_tokens=True)
            greedy_hits += sum(bool(is_correct(t, **r)) for t, r in zip(texts, chunk, strict=True))
            if num_samples > 0:
                sampled = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=temperature,
                    num_return_sequences=num_samples,
                    **common,
                )
                texts = tokenizer.batch_decode(sampled[:, width:], skip_special_tokens=True)
                for i, row in enumerate(chunk):
                    hits = [bool(is_correct(t, **row)) for t in texts[i * num_samples : (i + 1) * num_samples]]
                    any_hits += any(hits)
                    sample_hits += sum(hits)
    finally:
        tokenizer.padding_side = old_side
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    n = max(len(rows), 1)
    metrics = {"greedy_accuracy": greedy_hits / n}
    if num_samples > 0:
        metrics[f"pass@{num_samples}"] = any_hits / n
        metrics["sample_accuracy"] = sample_hits / (n * num_samples)
    return metrics
