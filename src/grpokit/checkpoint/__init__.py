"""Atomic checkpoints and exact (bit-for-bit on CPU) resume.

A checkpoint is the directory ``<output_dir>/checkpoint-<step>``: ``model.safetensors`` (full
state_dict, tied tensors stored once) with the model's ``config.json``, so ``from_pretrained(path)``
works, or for a ``peft.PeftModel`` only ``adapter_model.safetensors`` + ``adapter_config.json``
(``PeftModel.from_pretrained(base, path)`` works); ``optimizer.pt``, ``scheduler.pt``;
``rng_state.pt`` (python, numpy, torch CPU/CUDA and named ``torch.Generator`` states);
``trainer_state.json`` (+ ``trainer_state_extra.pt`` for entries that are not JSON, e.g. tensors);
``training_config.json`` for :func:`check_resume_compatible`; tokenizer files; and ``COMPLETE``,
written last, with the step and the size and sha256 of every file. Loading verifies both: a
file that is missing, truncated or changed since the save is an error naming it.

Everything is written into ``<output_dir>/.tmp-checkpoint-<step>-<random>``, fsynced, and only
then renamed to its final name, so a crash never leaves a half-written checkpoint under a name
that :func:`find_latest_checkpoint` would return. Call :func:`save_checkpoint` from one process
per ``output_dir`` (the main process); it saves that process's RNG states.

Modules: ``files`` (names, listing, atomic file steps), ``save``, ``load``, ``compat`` (which
configuration changes forbid a resume).
"""

from grpokit.checkpoint.compat import RESUME_KEYS, check_resume_compatible
from grpokit.checkpoint.files import CheckpointError, find_latest_checkpoint, list_checkpoints
from grpokit.checkpoint.load import load_checkpoint, read_model_state
from grpokit.checkpoint.save import save_checkpoint

__all__ = ["CheckpointError", "RESUME_KEYS", "check_resume_compatible", "find_latest_checkpoint",
           "list_checkpoints", "load_checkpoint", "read_model_state", "save_checkpoint"]
