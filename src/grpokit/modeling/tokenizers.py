"""Loading a saved tokenizer as it was saved.

transformers v5's AutoTokenizer swaps in the model type's own tokenizer class for some model types
(a qwen2 folder gets Qwen2Tokenizer, whose byte-level pipeline replaces the saved one and drops the
spaces of grpokit's character tokenizer); a folder whose tokenizer_config.json names the generic
fast class is therefore loaded with that class, keeping the pipeline stored in tokenizer.json.
`grpokit.models.load_tokenizer` (policies) and `grpokit.rewards.model` (reward models) both load
through `load_pretrained_tokenizer`, so a reward model trained by `grpokit rm train` scores with
the tokenizer it was trained with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["declares_generic_fast_tokenizer", "load_pretrained_tokenizer"]


def declares_generic_fast_tokenizer(path: Path) -> bool:
    """A local dir whose tokenizer_config.json names the generic fast class (e.g. our char tokenizer)."""
    config = path / "tokenizer_config.json"
    if not (path.is_dir() and config.exists() and (path / "tokenizer.json").exists()):
        return False
    try:
        declared = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return False
    return declared in ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_pretrained_tokenizer(name_or_path: str | os.PathLike, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained(name_or_path)`, except that a folder declaring the generic fast
    class loads with `PreTrainedTokenizerFast` (see the module docstring), and a built-in model name
    or a `.gguf` file reads the GGUF file's tokenizer (grpokit.modeling.known)."""
    from grpokit.modeling.known import is_gguf, resolve_model

    folder, gguf = resolve_model(name_or_path)
    if is_gguf(gguf):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **gguf)
    if declares_generic_fast_tokenizer(Path(name_or_path).expanduser()):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(Path(name_or_path).expanduser()))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
