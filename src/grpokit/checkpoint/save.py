"""Writing a checkpoint: into a temporary folder, fsynced, then renamed (see grpokit.checkpoint)."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from grpokit.checkpoint.files import (ALIASES_KEY, ADAPTER_FILE, CONFIG_FILE, MARKER, MODEL_FILE, OPTIMIZER_FILE,
                                      RNG_FILE, SCHEDULER_FILE, STATE_EXTRA_FILE, STATE_FILE, CheckpointError,
                                      fsync_tree, manifest, move_into_place, as_numpy, remove_leftovers, unwrap_model, write_json,
                                      list_checkpoints)
from grpokit.tracking import plain as _plain


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
    remove_leftovers(output_dir)
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
        write_json(os.path.join(tmp, CONFIG_FILE), _plain(config or {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
        write_json(os.path.join(tmp, MARKER), {"step": step, "files": manifest(tmp)})
        fsync_tree(tmp)
        move_into_place(tmp, final, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if save_total_limit is not None and save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            if os.path.abspath(old) != os.path.abspath(final):
                shutil.rmtree(old, ignore_errors=True)
    return final


def _save_model(model, directory: str, full_state: Mapping | None = None) -> None:
    """The adapter of a PeftModel (+ adapter_config.json), else the full state_dict (+ config.json)."""
    model, peft = unwrap_model(model)
    if peft:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, state_dict=None if full_state is None else dict(full_state),
                                          adapter_name=model.active_adapter)
        file = ADAPTER_FILE
    else:
        state, file = (model.state_dict() if full_state is None else full_state), MODEL_FILE
    tensors, aliases = _dedupe(state)
    metadata = {"format": "pt", ALIASES_KEY: json.dumps(aliases)}
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
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[tuple] = set()
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


def _rng_state(generators: Mapping) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = as_numpy()
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
    write_json(os.path.join(directory, STATE_FILE), plain)
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
