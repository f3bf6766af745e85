"""Whether a run may resume from a checkpoint: the fields that change the math or the data order."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from grpokit.checkpoint.files import CONFIG_FILE, CheckpointError
from grpokit.checkpoint.load import check_complete
from grpokit.tracking import plain as _plain

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
    "vllm_importance_sampling_cap", "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "mask_truncated_completions", "top_entropy_quantile",
    "use_bias_correction_kl", "off_policy_mask_threshold", "multi_objective_aggregation", "entropy_coef",
    "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target",
    "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "vespo_k_pos", "vespo_lambda_pos",
    "vespo_k_neg", "vespo_lambda_neg", "generation_kwargs", "chat_template_kwargs", "dynamic_sampling",
    "dynamic_sampling_max_rounds", "router_aux_loss_coef", "cast_lm_head_to_fp32", "dataset_streaming",
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
)


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


def check_resume_compatible(path, config, keys: Iterable[str] = RESUME_KEYS,
                            allowed: Iterable[str] = ()) -> list[str]:
    """Raise :class:`CheckpointError` if ``config`` differs from the checkpoint's in ``keys``.

    ``keys`` are the fields that change the math or the data order (default
    :data:`RESUME_KEYS`); nested configs are matched by their last name. A field is compared
    only when both configurations have it, so a field added in a newer version of grpokit does
    not block resuming. The message names every differing field as ``field: old -> new``.
    Fields in ``allowed`` may differ: their changes are returned (``field: old -> new``).
    """
    path = os.fspath(path)
    check_complete(path, content=False)  # sizes here; the load verifies the content
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint at {path} has no {CONFIG_FILE} to check against")
    with open(file, encoding="utf-8") as f:
        old = _flatten(json.load(f))
    new = _flatten(_plain(config))
    allowed = set(allowed)
    diffs: list[str] = []
    changed: list[str] = []
    for key in keys:
        old_values, new_values = _pick(old, key), _pick(new, key)
        for name in sorted(old_values.keys() & new_values.keys()):
            if old_values[name] != new_values[name]:
                (changed if key in allowed else diffs).append(f"{name}: {old_values[name]!r} -> {new_values[name]!r}")
    if diffs:
        raise CheckpointError(
            f"cannot resume from {path}: the configuration changed in fields that alter the "
            f"training ({'; '.join(diffs)}). Use the original values, start a new run in another "
            "output_dir, or list the fields in resume_allow_changes (the run is then no longer exact)."
        )
    return changed
