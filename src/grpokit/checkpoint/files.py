"""Checkpoint folder layout and the file-system steps that make saving atomic: names, listing,
fsync, rename into place, clean-up after a crashed save."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil

import torch

MARKER = "COMPLETE"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng_state.pt"
STATE_FILE = "trainer_state.json"
STATE_EXTRA_FILE = "trainer_state_extra.pt"
CONFIG_FILE = "training_config.json"
ALIASES_KEY = "grpokit_aliases"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model / configuration."""


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


def unwrap_model(model):
    """The model inside DDP / torch.compile wrappers, and whether it is a ``peft.PeftModel``."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    from grpokit.models import is_peft_model

    return model, is_peft_model(model)


def as_numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


HASH = "sha256"
"""Content hash recorded per file in the COMPLETE marker and checked at resume: a file changed on
disk after the save (bit rot, a partial copy, a wrong file of the same size) is refused, naming
it. hashlib's sha256 uses the CPU's SHA extensions where present (see docs/checkpoints.md for
what it costs)."""


def file_digest(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file under `directory`."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, directory)] = {"size": os.path.getsize(path), HASH: file_digest(path)}
    return out


def write_json(path: str, obj) -> None:
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


def fsync_tree(directory: str) -> None:
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def move_into_place(tmp: str, final: str, output_dir: str) -> None:
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


def remove_leftovers(output_dir: str) -> None:
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
