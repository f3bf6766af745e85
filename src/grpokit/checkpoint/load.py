"""Reading a checkpoint back: completeness and fit checks, weights, optimizer / scheduler, RNG states."""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Mapping

import torch
from safetensors.torch import load_file

from grpokit.checkpoint.files import (ALIASES_KEY, ADAPTER_FILE, MARKER, MODEL_FILE, OPTIMIZER_FILE, RNG_FILE,
                                      SCHEDULER_FILE, STATE_EXTRA_FILE, STATE_FILE, HASH, CheckpointError, as_numpy, file_digest,
                                      unwrap_model,
                                      find_latest_checkpoint, list_checkpoints)


def load_checkpoint(path, *, model, optimizer=None, scheduler=None,
                    generators: Mapping | None = None, map_location="cpu") -> dict:
    """Restore a checkpoint in place and return its trainer state (without ``"generators"``).

    Restores the model weights (the adapter only for a ``PeftModel``; ``model=None``: the caller
    restores them, e.g. FSDP2 from :func:`read_model_state`), the optimizer and
    scheduler when given, the python / numpy / torch RNG states, and the state of each
    ``torch.Generator`` in ``generators`` ({name: generator}, names as saved). Raises
    :class:`CheckpointError` when the checkpoint is missing, incomplete, or does not fit.
    """
    path = os.fspath(path)
    check_complete(path)
    if model is not None:
        _load_model(model, path)
    if optimizer is not None:
        _load_into(optimizer, path, OPTIMIZER_FILE, map_location, "optimizer")
    if scheduler is not None:
        _load_into(scheduler, path, SCHEDULER_FILE, map_location, "scheduler")
    _restore_rng(torch_load(os.path.join(path, RNG_FILE), "cpu"), generators or {}, path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    extra = os.path.join(path, STATE_EXTRA_FILE)
    if os.path.exists(extra):
        state.update(torch_load(extra, map_location))
    return state


def check_complete(path: str, *, content: bool = True) -> None:
    """The checkpoint at `path` is complete (its marker exists) and every file it lists is there
    with its size and, when `content` (at load), its recorded content hash; else CheckpointError
    naming each file that differs. Markers written before hashes were recorded hold sizes only."""
    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        available = [os.path.basename(p) for p in list_checkpoints(parent)]
        raise CheckpointError(f"no checkpoint at {path}; available in {parent}: {available or 'none'}")
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        inside = list_checkpoints(path)
        if inside:
            raise CheckpointError(
                f"{path} is an output directory, not a checkpoint; latest checkpoint: {inside[-1]}"
            )
        latest = find_latest_checkpoint(os.path.dirname(os.path.abspath(path)))
        raise CheckpointError(
            f"checkpoint at {path} is incomplete (no {MARKER} marker): the save was probably "
            f"interrupted; latest complete checkpoint: {latest or 'none'}"
        )
    with open(marker, encoding="utf-8") as f:
        sizes = json.load(f).get("files", {})
    bad = []
    for name, entry in sizes.items():
        size, digest = (entry, None) if isinstance(entry, int) else (entry.get("size"), entry.get(HASH))
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            bad.append(f"{name} (missing)")
        elif os.path.getsize(file) != size:
            bad.append(f"{name} ({os.path.getsize(file)} bytes, expected {size})")
        elif content and digest is not None and file_digest(file) != digest:
            bad.append(f"{name} (its content changed since the save: {HASH} differs)")
    if bad:
        raise CheckpointError(f"checkpoint at {path} is incomplete or corrupt: {', '.join(bad)}; resume from an "
                              "earlier checkpoint (resume_from_checkpoint=<path>) or restore this one from a copy")


def _read_weights(file: str) -> dict:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(ALIASES_KEY, "{}"))
    tensors = load_file(file, device="cpu")
    for dropped, kept in aliases.items():
        tensors[dropped] = tensors[kept]
    return tensors


def _weights_file(model, path: str) -> tuple[str, bool]:
    model, peft = unwrap_model(model)
    file = os.path.join(path, ADAPTER_FILE if peft else MODEL_FILE)
    if not os.path.isfile(file):
        other = MODEL_FILE if peft else ADAPTER_FILE
        kind = "a PEFT model" if peft else "a model without PEFT adapters"
        found = f"; it holds {other}" if os.path.isfile(os.path.join(path, other)) else ""
        raise CheckpointError(f"checkpoint at {path} has no {os.path.basename(file)} for {kind}{found}")
    return file, peft


def read_model_state(path, model) -> dict:
    """The checkpoint's weights under ``model``'s own ``state_dict`` names (a PeftModel's adapter
    keys mapped to its module names), checked against the model's names and (global) shapes; for
    loaders that place the tensors themselves (FSDP2: ``distributed.load_full_state``)."""
    path = os.fspath(path)
    check_complete(path)
    file, peft = _weights_file(model, path)
    saved = _read_weights(file)
    model, _ = unwrap_model(model)
    current = model.state_dict()
    names = list(current)
    if peft:
        from peft import get_peft_model_state_dict

        index = {n: torch.tensor(i) for i, n in enumerate(names)}  # the save-time renaming, inverted
        renamed = get_peft_model_state_dict(model, state_dict=index, adapter_name=model.active_adapter)
        to_model = {k: names[int(v)] for k, v in renamed.items()}
        expected = {k: current[to_model[k]] for k in to_model}
        _check_weights(saved, expected, file)
        return {to_model[k]: v for k, v in saved.items()}
    _check_weights(saved, current, file)
    return saved


def _load_model(model, path: str) -> None:
    file, peft = _weights_file(model, path)
    model, _ = unwrap_model(model)
    saved = _read_weights(file)
    if peft:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapter = model.active_adapter
        expected = get_peft_model_state_dict(model, adapter_name=adapter)
    else:
        expected = model.state_dict()
    _check_weights(saved, expected, file)
    if peft:
        set_peft_model_state_dict(model, saved, adapter_name=adapter)
    else:
        model.load_state_dict(saved, strict=True)


def _check_weights(saved: Mapping, expected: Mapping, file: str) -> None:
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in saved and saved[k].shape != expected[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(
            f"weights in {file} do not match the model ({'; '.join(problems)}); "
            "was the checkpoint written for another model or LoRA configuration?"
        )


def torch_load(file: str, map_location):
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # unpickling refused or corrupt file
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def _load_into(obj, path: str, name: str, map_location, what: str) -> None:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint at {path} has no {what} state ({name})")
    try:
        obj.load_state_dict(torch_load(file, map_location))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{what} state in {file} does not fit the {what}: {exc}") from exc


def _restore_rng(state: dict, generators: Mapping, path: str) -> None:
    missing = [name for name in generators if str(name) not in state.get("generators", {})]
    if missing:
        raise CheckpointError(
            f"checkpoint at {path} has no state for generator(s) {missing}; "
            f"saved: {sorted(state.get('generators', {}))}"
        )
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    np = as_numpy()
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        saved, here = state["cuda"], torch.cuda.device_count()
        if len(saved) != here:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(saved)} devices, "
                          f"this process sees {here}; restoring the first {min(len(saved), here)}", stacklevel=2)
        for index, rng in enumerate(saved[:here]):
            torch.cuda.set_rng_state(rng, index)
    for name, gen in generators.items():
        gen.set_state(state["generators"][str(name)])


def _tuples(value):
    """Lists back to tuples (random.setstate wants its nested tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
