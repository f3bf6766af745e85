"""Atomic checkpoints and exact (bit-for-bit on CPU) resume.

A checkpoint is the directory ``<output_dir>/checkpoint-<step>``: ``model.safetensors`` (full
state_dict, tied tensors stored once) with the model's ``config.json``, so ``from_pretrained(path)``
works, or for a ``peft.PeftModel`` only ``adapter_model.safetensors`` + ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` works); ``optimizer.pt``, ``scheduler.pt``;
``rng_state.pt`` (python, numpy, torch CPU/CUDA and named ``torch.Generator`` states);
``trainer_state.json`` (+ ``trainer_state_extra.pt`` for entries that are not JSON, e.g. tensors);
``training_config.json`` for :func:`check_resume_compatible`; tokenizer files; and ``COMPLETE``,
written last, with the step and the size of every file.

Everything is written into ``<output_dir>/.tmp-checkpoint-<step>-<random>``, fsynced, and only
then renamed to its final name, so a crash never leaves a half-written checkpoint under a name
that :func:`find_latest_checkpoint` would return. Call :func:`save_checkpoint` from one process
per ``output_dir`` (the main process); it saves that process's RNG states.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Mapping

import torch

from grpokit.tracking import plain as _plain
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "RESUME_KEYS", "check_resume_compatible", "find_latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "read_model_state", "save_checkpoint"]

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
STATE_FILE = "trainer_state.json"
STATE_EXTRA_FILE = "trainer_state_extra.pt"
CONFIG_FILE = "training_config.json"
_ALIASES_KEY = "grpokit_aliases"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")

# Fields that change the math or the data order: a resumed run must not differ in any of them.
# Fields such as max_steps, output_dir, logging_steps or save_steps may differ.
RESUME_KEYS = (
    "model_name_or_path", "model_name", "model", "revision", "torch_dtype", "dtype",
    "dataset", "dataset_name", "dataset_config", "dataset_path", "dataset_split",
    "dataset_train_split", "data_files", "task", "task_num_train", "shuffle_dataset",
    "system_prompt", "chat_template", "seed", "data_seed", "world_size", "bf16", "disable_dropout",
    "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
    "generation_batch_size", "steps_per_generation", "num_iterations",
    "max_prompt_length", "max_completion_length", "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "stop",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm",
    "loss_type", "beta", "epsilon", "epsilon_high", "delta", "dual_clip", "importance_sampling_level",
    "sapo_temperature_pos", "sapo_temperature_neg", "scale_rewards", "advantage_estimator",
    "reward_funcs", "reward_kwargs", "reward_weights", "reward_on_error", "kl_estimator",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_cap",
    "mask_truncated_completions", "top_entropy_quantile",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model / configuration."""


# ----------------------------------------------------------------------------- listing


def list_checkpoints(output_dir) -> list[str]:
    """Complete checkpoints under ``output_dir``, oldest step first.

    Directories without the ``COMPLETE`` marker and ``.tmp-*`` / ``.old-*`` directories left by
    an interrupted save are ignored.
    """
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CKPT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def find_latest_checkpoint(output_dir) -> str | None:
    """Path of the complete checkpoint with the highest step under ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- saving


def save_checkpoint(output_dir, step: int, *, model, optimizer=None, scheduler=None,
                    trainer_state: Mapping | None = None, config=None, tokenizer=None,
                    save_total_limit: int | None = None, model_state: Mapping | None = None,
                    optimizer_state: Mapping | None = None) -> str:
    """Atomically write ``<output_dir>/checkpoint-<step>`` and return its path.

    ``trainer_state`` may hold ``"generators": {name: torch.Generator}``; their states are saved
    with the RNG states and restored by :func:`load_checkpoint` (``generators=``). With
    ``save_total_limit`` only that many newest checkpoints are kept (older ones are deleted).
    A checkpoint with the same step is replaced; if anything fails, nothing is left behind
    and the exception propagates. ``model_state`` / ``optimizer_state``: full state dicts
    gathered by the caller (FSDP2, see grpokit.distributed.full_state) instead of
    ``model.state_dict()`` / ``optimizer.state_dict()``; the files are the same either way.
    """
    step = int(step)
    os.makedirs(output_dir, exist_ok=True)
    _remove_leftovers(output_dir)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{secrets.token_hex(4)}")
    os.makedirs(tmp)
    try:
        state = dict(trainer_state or {})
        generators = state.pop("generators", None) or {}
        _save_model(model, tmp, model_state)
        if optimizer is not None:
            torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                       os.path.join(tmp, OPTIMIZER_FILE))
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE))
        torch.save(_rng_state(generators), os.path.join(tmp, RNG_FILE))
        _save_trainer_state(state, step, tmp)
        _write_json(os.path.join(tmp, CONFIG_FILE), _plain(config or {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        sizes = {os.path.relpath(os.path.join(root, n), tmp): os.path.getsize(os.path.join(root, n))
                 for root, _, names in os.walk(tmp) for n in names}
        _write_json(os.path.join(tmp, MARKER), {"step": step, "files": sizes})
        _fsync_tree(tmp)
        _move_into_place(tmp, final, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None and save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            if os.path.abspath(old) != os.path.abspath(final):
                shutil.rmtree(old, ignore_errors=True)
    return final


def _unwrap(model):
    """The model inside DDP / torch.compile wrappers, and whether it is a ``peft.PeftModel``."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    from grpokit.models import is_peft_model

    return model, is_peft_model(model)


def _save_model(model, directory: str, full_state: Mapping | None = None) -> None:
    """The adapter of a PeftModel (+ adapter_config.json), else the full state_dict (+ config.json)."""
    model, peft = _unwrap(model)
    if peft:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=None if full_state is None else dict(full_state),
                                          adapter_name=model.active_adapter)
        file = ADAPTER_FILE
    else:
        state, file = (model.state_dict() if full_state is None else full_state), MODEL_FILE
    tensors, aliases = _dedupe(state)
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases)}
    save_file(tensors, os.path.join(directory, file), metadata=metadata)
    if peft:
        model.peft_config[model.active_adapter].save_pretrained(directory)
    elif hasattr(getattr(model, "config", None), "save_pretrained"):
        model.config.save_pretrained(directory)


def _dedupe(state: Mapping) -> tuple[dict, dict]:
    """Store each shared tensor once (safetensors refuses shared memory).

    Returns ``(tensors, aliases)`` where ``aliases[dropped_name] = kept_name`` for entries that are
    the very same view of the same storage (tied weights); other overlapping views are copied.
    """
    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, tensor in state.items():
        tensor = tensor.detach()
        view = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if tensor.numel() and view in seen:
            aliases[name] = seen[view]
            continue
        seen[view] = name
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        shared = tensor.numel() and storage in storages
        storages.add(storage)
        tensor = tensor.to("cpu")
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        elif shared:
            tensor = tensor.clone()
        tensors[name] = tensor
    return tensors, aliases


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _rng_state(generators: Mapping) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = _numpy()
    if np is not None:  # stored as a tensor: torch.load(weights_only=True) refuses numpy arrays
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {str(name): gen.get_state() for name, gen in generators.items()}
    return state


def _save_trainer_state(state: dict, step: int, directory: str) -> None:
    """JSON-serialisable entries to trainer_state.json, the rest to trainer_state_extra.pt."""
    plain, extra = {"step": step}, {}
    for key, value in state.items():
        try:
            json.dumps(value)
            plain[key] = value
        except (TypeError, ValueError):
            extra[key] = value
    _write_json(os.path.join(directory, STATE_FILE), plain)
    if extra:
        file = os.path.join(directory, STATE_EXTRA_FILE)
        torch.save(extra, file)
        try:  # fail now, not at resume time
            torch.load(file, weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"trainer_state entries {sorted(extra)} are neither JSON-serialisable nor readable "
                f"by torch.load(weights_only=True) (tensors, numbers, lists, dicts): {exc}"
            ) from exc




def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _fsync_dir(path: str) -> None:
    try:  # not possible on every platform (Windows cannot open a directory)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _fsync_tree(directory: str) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def _move_into_place(tmp: str, final: str, output_dir: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then deleted."""
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f".old-{os.path.basename(final)}-{secrets.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_dir(output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(output_dir: str) -> None:
    """Clean up after a crashed save: delete ``.tmp-checkpoint-*`` directories, and put back a
    complete ``.old-checkpoint-<step>-*`` whose replacement never arrived (else delete it)."""
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        old = re.match(r"^\.old-(checkpoint-\d+)-[0-9a-f]+$", name)
        final = os.path.join(output_dir, old.group(1)) if old else None
        if final and not os.path.exists(final) and os.path.isfile(os.path.join(path, MARKER)):
            os.rename(path, final)
        elif old or name.startswith(".tmp-checkpoint-"):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


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
    _check_complete(path)
    if model is not None:
        _load_model(model, path)
    if optimizer is not None:
        _load_into(optimizer, path, OPTIMIZER_FILE, map_location, "optimizer")
    if scheduler is not None:
        _load_into(scheduler, path, SCHEDULER_FILE, map_location, "scheduler")
    _restore_rng(_torch_load(os.path.join(path, RNG_FILE), "cpu"), generators or {}, path)
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    extra = os.path.join(path, STATE_EXTRA_FILE)
    if os.path.exists(extra):
        state.update(_torch_load(extra, map_location))
    return state


def _check_complete(path: str) -> None:
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
    for name, size in sizes.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            bad.append(f"{name} (missing)")
        elif os.path.getsize(file) != size:
            bad.append(f"{name} ({os.path.getsize(file)} bytes, expected {size})")
    if bad:
        raise CheckpointError(f"checkpoint at {path} is incomplete or corrupt: {', '.join(bad)}")


def _read_weights(file: str) -> dict:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        aliases = json.loads((f.metadata() or {}).get(_ALIASES_KEY, "{}"))
    tensors = load_file(file, device="cpu")
    for dropped, kept in aliases.items():
        tensors[dropped] = tensors[kept]
    return tensors


def _weights_file(model, path: str) -> tuple[str, bool]:
    model, peft = _unwrap(model)
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
    _check_complete(path)
    file, peft = _weights_file(model, path)
    saved = _read_weights(file)
    model, _ = _unwrap(model)
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
    model, _ = _unwrap(model)
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


def _torch_load(file: str, map_location):
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
        obj.load_state_dict(_torch_load(file, map_location))
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
    np = _numpy()
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        saved, here = state["cuda"], torch.cuda.device_count()
        if len(saved) != here:
            warnings.warn(f"checkpoint has CUDA RNG states for {len(saved)} devices, "
                          f"this process sees {here}; restoring the first {min(len(saved), here)}")
        for index, rng in enumerate(saved[:here]):
            torch.cuda.set_rng_state(rng, index)
    for name, gen in generators.items():
        gen.set_state(state["generators"][str(name)])


def _tuples(value):
    """Lists back to tuples (random.setstate wants its nested tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------- compatibility


def _flatten(config, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _pick(flat: dict, key: str) -> dict:
    """Entries whose (dotted) name is ``key`` or ends with ``.key`` (nested configs)."""
    return {k: v for k, v in flat.items() if k == key or k.endswith("." + key)}


def check_resume_compatible(path, config, keys: Iterable[str] = RESUME_KEYS) -> None:
    """Raise :class:`CheckpointError` if ``config`` differs from the checkpoint's in ``keys``.

    ``keys`` are the fields that change the math or the data order (default
    :data:`RESUME_KEYS`); nested configs are matched by their last name. A field is compared
    only when both configurations have it, so a field added in a newer version of grpokit does
    not block resuming. The message names every differing field as ``field: old -> new``.
    """
    path = os.fspath(path)
    _check_complete(path)
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint at {path} has no {CONFIG_FILE} to check against")
    with open(file, encoding="utf-8") as f:
        old = _flatten(json.load(f))
    new = _flatten(_plain(config))
    diffs = []
    for key in keys:
        old_values, new_values = _pick(old, key), _pick(new, key)
        for name in sorted(old_values.keys() & new_values.keys()):
            if old_values[name] != new_values[name]:
                diffs.append(f"{name}: {old_values[name]!r} -> {new_values[name]!r}")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the configuration changed in fields that alter the "
            f"training ({'; '.join(diffs)}). Use the original values, or start a new run in "
            "another output_dir."
        )
