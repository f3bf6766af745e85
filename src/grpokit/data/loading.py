"""Datasets in, prompt token ids out: loading, TRL's two prompt formats, validation before step one.

A dataset row has a "prompt" and any other columns (answer, tests, ...) which are handed to the
reward functions by name. The prompt is either

- standard: a string, used as is, or
- conversational (TRL's meaning): a list of {"role", "content"} messages, rendered with the
  tokenizer's chat template and a generation prompt.

Prompts are tokenized with the tokenizer's own special tokens for standard strings (e.g. Llama's
BOS) and without them for rendered chat templates (the template already contains them), so that a
prompt never gets a second BOS.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "encode_prompt",
    "is_conversational",
    "load_dataset_spec",
    "render_prompt",
    "validate_prompts",
]

# file suffix -> datasets' packaged builder
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix.lower() in _BUILDERS


def load_dataset_spec(name_or_path: Any, split: str = "train", config_name: str | None = None,
                      streaming: bool = False):
    """Load one split of a dataset as a `datasets.Dataset` (`streaming=True`: a hub dataset or a
    data-files folder as a `datasets.IterableDataset`, read as far as the run needs).

    name_or_path:
        - a `datasets.Dataset` (returned as is) or `DatasetDict` (its `split` is taken);
        - a local file: .json / .jsonl / .csv / .parquet / .arrow, read with datasets' builders; a
          single file holds one split, returned whatever `split` names (slices such as
          "train[:100]" work);
        - a local directory: written by `Dataset.save_to_disk`, or holding data files (split names
          are inferred from file names, e.g. train.jsonl / test.jsonl);
        - anything else is a hub dataset name, e.g. "openai/gsm8k" with config_name="main".
    Raises FileNotFoundError for a path that does not exist and ValueError naming the available
    splits for an unknown split.
    """
    import datasets

    if isinstance(name_or_path, datasets.Dataset):
        return name_or_path
    if isinstance(name_or_path, datasets.DatasetDict):
        return _pick_split(name_or_path, split, str(name_or_path))
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"expected a dataset name, a path or a datasets.Dataset, got {type(name_or_path).__name__}")

    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if streaming and not path.is_file() and not (path / "dataset_info.json").exists():
        if _looks_like_path(name) and not path.exists():
            raise FileNotFoundError(f"dataset file {name!r} does not exist")
        return datasets.load_dataset(name, name=config_name, split=split, streaming=True)
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"cannot read {name!r}: unknown file type {path.suffix!r}; use one of {sorted(_BUILDERS)}"
            )
        split_match = re.match(r"[\w.-]+", split)
        base_split = split_match.group(0) if split_match else "train"
        if path.stat().st_size == 0:
            raise ValueError(f"dataset file {name!r} is empty: it needs one row per line (JSONL) or a header "
                             "and rows (CSV), with a 'prompt' column.")
        try:
            loaded = datasets.load_dataset(builder, data_files={base_split: str(path)}, split=split)
        except (StopIteration, datasets.exceptions.DatasetGenerationError, ValueError) as e:
            if isinstance(e, ValueError) and "corresponds to no data" not in str(e):
                raise
            raise ValueError(f"dataset file {name!r} has no rows: it needs a 'prompt' column with one prompt per "
                             "row.") from None
        if len(loaded) == 0:
            raise ValueError(f"dataset file {name!r} has no rows: it needs a 'prompt' column with one prompt per row.")
        return loaded
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, name)
            return loaded
        return _load_with_split_check(str(path), config_name, split)
    if _looks_like_path(name):
        raise FileNotFoundError(f"dataset file {name!r} does not exist")
    return _load_with_split_check(name, config_name, split)


def _pick_split(dataset_dict, split: str, name: str):
    base_match = re.match(r"[\w.-]+", split)
    base = base_match.group(0) if base_match else split
    if base not in dataset_dict:
        raise ValueError(f"dataset {name!r} has no split {split!r}; available splits: {sorted(dataset_dict)}")
    if base == split:
        return dataset_dict[split]
    # a slice like "train[:100]" on an in-memory DatasetDict
    return dataset_dict[base].select(range(_slice_stop(split, len(dataset_dict[base]))))


def _slice_stop(split: str, n: int) -> int:
    m = re.fullmatch(r"[\w.-]+\[:(\d+)\]", split)
    if not m:
        raise ValueError(f"only slices of the form 'name[:N]' are supported here, got {split!r}")
    return min(int(m.group(1)), n)


def _load_with_split_check(name: str, config_name: str | None, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ValueError as err:
        if "split" in str(err).lower():
            raise ValueError(f"dataset {name!r} has no split {split!r}: {err}") from err
        raise


def is_conversational(example: dict[str, Any]) -> bool:
    """True when the example is in TRL's conversational format.

    As in TRL: the first of the keys "prompt", "chosen", "rejected", "completion", "messages" present
    holds a list whose first element is a dict with "role" and "content".
    """
    for key in ("prompt", "chosen", "rejected", "completion", "messages"):
        if key in example:
            value = example[key]
            return (
                isinstance(value, list)
                and len(value) > 0
                and isinstance(value[0], dict)
                and "role" in value[0]
                and "content" in value[0]
            )
    return False


def _is_message_list(prompt: Any) -> bool:
    return is_conversational({"prompt": prompt})


def _no_chat_template_error(tokenizer) -> ValueError:
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return ValueError(
        f"the prompts are conversational (lists of role/content messages) but tokenizer {name!r} has no chat "
        "template. Fix: set one (tokenizer.chat_template = '...' or pass a tokenizer that has one, e.g. an "
        "-Instruct model's), or give the prompts as plain strings (standard format)."
    )


def render_prompt(prompt: str | Sequence[dict[str, Any]], tokenizer,
                  chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The text the model is prompted with.

    A standard prompt (str) is returned as is. A conversational prompt is rendered with the
    tokenizer's chat template: with the generation prompt when the last message is the user's
    (or system's), continuing the final message when it is the assistant's (as TRL does);
    `chat_template_kwargs` (e.g. ``{"enable_thinking": False}``) reach the template.
    """
    if isinstance(prompt, str):
        return prompt
    if not _is_message_list(prompt):
        raise TypeError(
            "a prompt must be a string or a list of {'role': ..., 'content': ...} messages, "
            f"got {type(prompt).__name__}: {str(prompt)[:80]!r}"
        )
    if getattr(tokenizer, "chat_template", None) is None:
        raise _no_chat_template_error(tokenizer)
    last_is_assistant = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        list(prompt),
        tokenize=False,
        add_generation_prompt=not last_is_assistant,
        continue_final_message=last_is_assistant,
        **(chat_template_kwargs or {}),
    )


def encode_prompt(prompt: str | Sequence[dict[str, Any]], tokenizer,
                  chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """Token ids of a prompt: rendered with `render_prompt`, tokenized without adding a second BOS."""
    text = render_prompt(prompt, tokenizer, chat_template_kwargs)
    return _encode_rendered([text], [not isinstance(prompt, str)], tokenizer)[0]


def _encode_rendered(texts: list[str], templated: list[bool], tokenizer) -> list[list[int]]:
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, t in enumerate(templated) if t == flag]
        if not idx:
            continue
        # templated text already holds its special tokens; plain text gets the tokenizer's own
        ids = tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]
        for i, row in zip(idx, ids, strict=True):
            out[i] = list(row)
    return out  # type: ignore[return-value]


def validate_prompts(
    dataset,
    tokenizer,
    *,
    max_prompt_length: int | None,
    required_columns: Sequence[str] = (),
    chat_template_kwargs: dict[str, Any] | None = None,
    tools_of_row=None,
) -> list[list[int]]:
    """Check a prompt dataset before training and return every row's prompt token ids
    (conversational prompts rendered with `chat_template_kwargs`, and with the tools
    `tools_of_row(i)` in the template's `tools=` when given).

    Raises ValueError for: an empty dataset; no "prompt" column (the message lists the columns that
    exist); a missing required column (e.g. one a reward function reads); conversational prompts with a
    tokenizer that has no chat template; a prompt longer than `max_prompt_length` tokens (the message
    names the row index, its length and the limit; None disables the check).
    """
    columns = list(dataset.column_names)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: it has no rows to train on")
    if "prompt" not in columns:
        raise ValueError(
            f"the dataset has no 'prompt' column; its columns are {columns}. Rename the column holding the "
            "prompts, e.g. dataset.rename_column('question', 'prompt')"
        )
    missing = [c for c in required_columns if c not in columns]
    if missing:
        raise ValueError(
            f"the dataset lacks column(s) {missing} needed by the reward functions; its columns are {columns}"
        )
    prompts = dataset["prompt"]
    templated = [not isinstance(p, str) for p in prompts]
    if any(templated) and getattr(tokenizer, "chat_template", None) is None:
        raise _no_chat_template_error(tokenizer)
    texts = []
    for i, prompt in enumerate(prompts):
        kwargs = chat_template_kwargs
        if tools_of_row is not None:
            kwargs = {**(chat_template_kwargs or {}), "tools": tools_of_row(i) or None}
        try:
            texts.append(render_prompt(prompt, tokenizer, kwargs))
        except TypeError as err:
            raise ValueError(f"row {i}: {err}") from err
    ids = _encode_rendered(texts, templated, tokenizer)
    if max_prompt_length is not None:
        for i, row in enumerate(ids):
            if len(row) > max_prompt_length:
                raise ValueError(
                    f"prompt of row {i} is {len(row)} tokens long, over max_prompt_length={max_prompt_length}. "
                    "Raise max_prompt_length or filter/shorten the long prompts "
                    "(dataset.filter(lambda r: ...)); set max_prompt_length=None to disable this check."
                )
    return ids
