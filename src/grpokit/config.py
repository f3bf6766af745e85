"""The configs of a run, with TRL's field names and meanings where TRL has the knob.

`TrainingConfig` holds the fields every algorithm uses (model, data, rewards, generation,
optimisation, logging, checkpointing, several processes) and the checks on them; `GRPOConfig`
adds GRPO's objective and step; the PPO and DPO baselines (grpokit.baselines) add their own.

A TRL script moves over by changing its import line. A TRL field that grpokit does not support
is an error naming it (unless it is passed with the value that turns it off), never silently
ignored; an unknown field is an error with the closest known names. The allowed values of an
enumerated field are those of the module that reads it (its registry or constant).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

# valid values come from the registries of the modules that read the fields, the one source of truth
from grpokit.algos.advantages import ADVANTAGE_ESTIMATORS, SCALE_REWARDS
from grpokit.algos.kl import KL_ESTIMATORS
from grpokit.algos.losses import (IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, ROLLOUT_CORRECTION_LEVELS,
                                  ROLLOUT_CORRECTION_MODES, is_local_mean, policy_loss_knobs)
from grpokit.tracking import BACKENDS as TRACKING_BACKENDS


def config_field(default: Any, help: str) -> Any:
    """A config field with its default (a list or dict copied per instance) and one-line help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


_f = config_field

# Enumerated fields whose reader has no registry of its own to import here (the optimizer and
# scheduler builder, the loop's non-finite and interval handling, the advantage's aggregation)
LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
ON_NONFINITE = ("skip", "raise")
INTERVAL_STRATEGIES = ("no", "steps")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
VLLM_IMPORTANCE_SAMPLING_MODES = tuple(f"{level}_{mode}" for level in ROLLOUT_CORRECTION_LEVELS
                                       for mode in ROLLOUT_CORRECTION_MODES)
"""TRL's names of `rollout_correction_weights`' (level, mode) pairs: token_truncate, ..."""


def one_of(name: str, value: Any, allowed) -> str | None:
    """None when `value` is one of `allowed` (a registry or a tuple), else the message naming them."""
    if value in allowed:
        return None
    return f"{name}={value!r}: use one of {', '.join(map(str, allowed))}."


# TRL / transformers.TrainingArguments fields that grpokit does not support, each with the values
# that mean "off" (accepted, since nothing is ignored). Any other value is an error naming the field.
UNSUPPORTED_TRL_FIELDS: dict[str, tuple] = {
    **{name: (None,) for name in (
        "lr_scheduler_kwargs", "optim_args", "optim_target_modules", "tf32",
        "activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "torch_compile_backend",
        "torch_compile_mode", "liger_kernel_config", "neftune_noise_alpha", "torch_empty_cache_steps",
        "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_accumulation_steps",
        "hub_private_repo", "hub_model_id", "hub_revision", "metric_for_best_model",
        "greater_is_better", "data_seed", "parallelism_config",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "label_names",
        "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph",
        "ddp_backend", "fsdp", "fsdp_config", "deepspeed", "cache_implementation",
        "vllm_structured_outputs_regex", "vllm_server_base_url", "vllm_max_model_length",
        "log_completions_hub_repo", "transformers_continuous_batching_config", "logging_dir",
            )},
    **{name: (False,) for name in (
        "fp16", "bf16_full_eval", "fp16_full_eval", "torch_compile", "use_liger_kernel", "use_cache",
        "auto_find_batch_size", "logging_first_step", "prediction_loss_only", "eval_use_gather_object",
        "batch_eval_metrics", "save_only_model", "save_on_each_node", "enable_jit_checkpoint",
        "push_to_hub", "hub_always_push", "load_best_model_at_end", "ignore_data_skip",
        "restore_callback_states_from_checkpoint", "full_determinism", "dataloader_drop_last",
        "dataloader_persistent_workers", "do_train", "do_eval", "do_predict",
        "log_unique_prompts",
        "use_transformers_continuous_batching", "use_transformers_paged", "vllm_enable_sleep_mode",
    )},
    # TRL's own defaults, which change nothing here (a config dumped with TRL's to_dict() loads)
    "dataloader_pin_memory": (False, True), "eval_delay": (None, 0, 0.0),
    "local_rank": (None, -1), "hub_strategy": (None, "every_save"), "project": (None, "huggingface"),
    "hub_token": (None, "<HUB_TOKEN>"), "debug": ("", None, []),
    "accelerator_config": (None, {"split_batches": False, "dispatch_batches": None, "even_batches": True,
                                  "use_seedable_sampler": True, "non_blocking": False,
                                  "gradient_accumulation_kwargs": None}),
    "dataloader_in_order": (True,), "average_tokens_across_devices": (True,),
    "label_smoothing_factor": (0.0,),
    "logging_strategy": ("steps",), "include_num_input_tokens_seen": ("no", False),
    "log_level": ("passive",), "log_level_replica": ("warning", "passive"), "log_on_each_node": (True,),
    "logging_nan_inf_filter": (True,), "skip_memory_metrics": (True,),
    "train_sampling_strategy": ("random",), "length_column_name": ("length",), "include_for_metrics": ([],),
    "eval_do_concat_batches": (True,), "ds3_gather_for_generation": (True,),
    "vllm_mode": ("colocate",),
    "vllm_model_impl": ("vllm",), "vllm_server_host": ("0.0.0.0",), "vllm_server_port": (8000,),
    "vllm_server_timeout": (240.0,), "vllm_group_port": (51216,), "vllm_gpu_memory_utilization": (0.3,),
    "vllm_tensor_parallel_size": (1,),
}


GENERATION_KWARGS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repetition_penalty", "stop_strings": "stop",
                     "max_new_tokens": "max_completion_length", "do_sample": "do_sample"}
"""generation_kwargs keys grpokit's sampler takes (transformers' GenerationConfig names) -> its own."""


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def check_scalar_type(owner: str, name: str, annotation: object, value) -> None:
    """A value of the wrong kind for a scalar field (`int`, `float`, `bool`, `str`, or one of them
    `| None`) is an error naming the field and the kind it takes: `max_steps=abc` from the
    command line fails here, not as a TypeError deep in the run. Other annotations are not checked."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    optional = "None" in kinds
    kinds = [k for k in kinds if k != "None"]
    if len(kinds) != 1 or kinds[0] not in _SCALARS or (value is None and optional):
        return
    kind = kinds[0]
    ok = isinstance(value, _SCALARS[kind]) and not (kind in ("int", "float") and isinstance(value, bool))
    if not ok:
        raise ValueError(f"{owner}: {name}={value!r} is not {_NAMES[kind]}" + (" (or null)" if optional else "") + ".")


@dataclass(init=False)
class TrainingConfig:
    """The fields every algorithm uses, and the machinery of a config: TRL's aliases, the TRL fields
    grpokit does not support, unknown fields with the closest names, YAML's strings, validation at
    construction (`validate`), `to_dict` / `replace`. An algorithm's config is a dataclass subclass
    (`@dataclass(init=False)`) that adds its own fields and checks."""

    # --- model, data, task (TRL's ModelConfig / ScriptArguments names) ---
    model_name_or_path: str | None = _f(None, "Hub id, local path or .gguf file of the policy, or a built-in name "
                                          "(smollm2-135m-instruct); None = the shipped starter model.")
    dataset_name: str | None = _f(None, "Hub dataset name or local JSON/JSONL/CSV/Parquet file or folder.")
    dataset_config: str | None = _f(None, "Dataset configuration name (hub datasets).")
    dataset_train_split: str = _f("train", "Split used for training.")
    dataset_test_split: str | None = _f(None, "Split used for evaluation (None: no eval set unless the task has one).")
    dataset_streaming: bool = _f(False, "Stream a hub dataset (TRL's script argument): read only the rows the run "
                                        "uses (needs max_steps).")
    task: str | None = _f(None, "Built-in task (arithmetic, countdown): dataset + rewards; default when no dataset.")
    task_num_train: int = _f(2000, "Rows of the built-in task's training split.")
    task_num_eval: int = _f(200, "Rows of the built-in task's held-out split.")
    reward_funcs: list = _f([], "Reward functions by registry name or 'package.module:function'.")
    reward_kwargs: dict = _f({}, "Per-function keyword arguments: {name: {kwarg: value}}.")
    reward_timeout: float = _f(60.0, "Wall-clock seconds allowed for one reward call.")
    reward_on_error: str = _f("raise", "When a reward function raises: raise | none | zero.")
    reward_num_workers: int = _f(0, "Worker processes for CPU-bound reward functions (0 = in process).")
    reward_weights: list | None = _f(None, "Weight of each reward function (None = all 1).")
    model_init_kwargs: dict | None = _f(None, "Keyword arguments for from_pretrained when model is a string.")
    trust_remote_code: bool = _f(False, "Allow custom model code from the hub.")
    disable_dropout: bool = _f(False, "Set every dropout probability of the policy to 0.")
    shuffle_dataset: bool = _f(True, "Shuffle the training prompts (seeded, per epoch).")
    remove_unused_columns: bool = _f(False, "Keep only 'prompt' (False keeps every column for the rewards).")
    # --- LoRA (TRL's ModelConfig names) ---
    use_peft: bool = _f(False, "Train a LoRA adapter instead of the full model.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list | str | None = _f(None, "Modules to adapt (None: peft's default for the architecture).")
    freeze_vision_tower: bool = _f(False, "A vision-language model's vision tower and projector stay frozen in full "
                                          "fine-tuning (their features then computed once per step); LoRA, in the "
                                          "language model only, leaves them frozen anyway. False trains them, as TRL.")
    # --- batch and schedule ---
    output_dir: str = _f("runs/grpo", "Run folder: config, metrics, samples, plot, checkpoints.")
    overwrite_output_dir: bool = _f(False, "Start a new run in an output_dir that holds one (its metrics, checkpoints "
                                           "and final model are removed); without it that is an error, unless resuming.")
    dataloader_num_workers: int = _f(0, "Accepted for TRL scripts: grpokit tokenizes every prompt before step 1 and "
                                        "reads rows from memory, so there are no loader workers (a value > 0 is noted "
                                        "in the run summary).")
    per_device_train_batch_size: int = _f(8, "Completions per micro-batch per device (TRL's meaning).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    pad_to_multiple_of: int | None = _f(None, "Round the training tensors' prompt and completion widths up to a "
                                              "multiple of this (fixed shapes for accelerators; the padded forward "
                                              "then runs). None = no padding beyond the longest.")
    num_generations: int = _f(8, "G: completions sampled per prompt.")
    num_generations_eval: int | None = _f(None, "Samples per prompt for pass@k at eval (None: num_generations).")
    max_prompt_length: int | None = _f(None, "Longest prompt in tokens (None: no limit, as TRL 1.16); longer "
                                             "prompts are an error before step 1.")
    max_completion_length: int = _f(512, "Most tokens sampled per completion.")
    mask_truncated_completions: bool = _f(False, "Leave completions cut by max_completion_length out of the loss.")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 = num_train_epochs over the prompts.")
    num_train_epochs: float = _f(3.0, "Passes over the training prompts when max_steps is -1.")
    max_tool_calling_iterations: int | None = _f(None, "Tool rounds per conversation (tools / environment_factory): "
                                                       "None = until a turn has no tool call or the completion "
                                                       "budget (model and tool tokens) is spent.")
    tools: list = _f([], "Tools the model may call, as 'package.module:function' paths (the command line's "
                         "form of GRPOTrainer(tools=...); a built-in tool task brings its own).")
    environment_factory: str | None = _f(None, "An environment class or factory as a 'package.module:Class' path "
                                               "(the command line's form of GRPOTrainer(environment_factory=...)).")
    tool_timeout: float | None = _f(60.0, "Wall-clock seconds allowed for one tool call; a late call's result is "
                                          "a timeout error (counted in tools/timeout_frequency).")
    # --- sampling ---
    temperature: float = _f(1.0, "Sampling temperature (logprobs are taken at the same temperature).")
    top_p: float = _f(1.0, "Nucleus sampling mass.")
    top_k: int = _f(0, "Top-k sampling (0 = off).")
    min_p: float | None = _f(None, "Min-p sampling (None = off).")
    stop: list = _f([], "Stop strings; the completion is cut after them.")
    repetition_penalty: float = _f(1.0, "Sampling penalty on tokens already in the prompt or completion (>1 "
                                        "discourages them; 1 = off). Training logprobs stay the model's own.")
    generation_kwargs: dict | None = _f(None, "Extra sampling settings by transformers' GenerationConfig names; they "
                                              "win over the fields. temperature, top_p, top_k, min_p, "
                                              "repetition_penalty, stop_strings, max_new_tokens keep grpokit's engine; "
                                              "others (num_beams, ...) run transformers' generate.")
    chat_template_kwargs: dict | None = _f(None, "Extra arguments of the chat template, e.g. {enable_thinking: false}.")
    rollout_engine: str = _f("hf", "Rollout engine, by its registry name: hf (grpokit's; transformers' generate where "
                                   "it cannot hold the model or a setting), hf-generate (transformers' generate), "
                                   "vllm (CUDA, optional install).")
    use_vllm: bool = _f(False, "TRL's name for rollout_engine='vllm' (True exactly when rollout_engine is vllm).")
    max_batch_tokens: int | None = _f(None, "Cap on prompt+completion tokens decoded at once (None = engine default).")
    draft_tokens: int = _f(0, "Most draft tokens per completion and decode step of grpokit's engine, guessed by "
                              "n-gram lookup (the completion's own context, its group's and the last step's "
                              "completions) and checked in the same forward: the samples are those of one token "
                              "per step; a step drafts only where the guesses are expected to pay. 0 = off.")
    # --- optimizer ---
    learning_rate: float = _f(1e-6, "AdamW learning rate.")
    lr_scheduler_type: str = _f("linear", "linear | cosine | constant | constant_with_warmup.")
    warmup_ratio: float = _f(0.0, "Fraction of steps of linear warm-up.")
    warmup_steps: int = _f(0, "Warm-up steps (wins over warmup_ratio when > 0).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    optim: str = _f("adamw_torch_fused", "adamw_torch_fused (torch's fused AdamW kernel; transformers' default "
                    "for torch >= 2.8) | adamw_torch (the per-tensor loop).")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")
    on_nonfinite: str = _f("skip", "Non-finite loss or gradient norm: skip the step (counted); non-finite "
                                   "sampling logprobs (NaN/inf logits): never train on those samples "
                                   "(counted) | raise.")
    gradient_checkpointing: bool = _f(True, "Recompute activations in backward to save memory (TRL's default; "
                                            "off is faster when memory allows).")
    # --- precision and device ---
    bf16: bool | None = _f(None, "bfloat16 weights/compute; None = on for CUDA with bf16, off on CPU.")
    cast_lm_head_to_fp32: bool = _f(False, "Keep the output projection (lm_head) and the logits in float32 while the "
                                           "model runs in bf16 (sharper logprobs; TRL's knob).")
    use_cpu: bool = _f(False, "Train on CPU even when CUDA is available.")
    # --- several processes (torchrun; see docs/distributed.md) ---
    distributed_strategy: str = _f("ddp", "Under torchrun: ddp (a full copy per rank) | fsdp2 (weights, grads and "
                                          "optimizer state sharded per decoder layer).")
    ddp_timeout: int = _f(1800, "Seconds a collective waits for the other ranks before the job fails (TRL's name).")
    seed: int = _f(42, "Seed of model init, data order, sampling.")
    # --- logging, eval, checkpoints ---
    logging_steps: int = _f(10, "Print a metrics line every this many steps (metrics.jsonl gets every step).")
    report_to: list | str = _f(["jsonl"], "jsonl | tensorboard | wandb | all (those installed) | none (several "
                                          "allowed).")
    run_name: str | None = _f(None, "Name of the run for TensorBoard/W&B.")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    log_completions: bool = _f(True, "Write samples of (prompt, completion, reward) to completions.jsonl.")
    num_completions_to_print: int | None = _f(4, "Completions written per logging step (None = all).")
    log_multimodal: bool = _f(True, "Keep the images of the latest step's prompts with its logged completions "
                                    "(trainer._logs['images'], as TRL).")
    eval_strategy: str = _f("no", "no | steps: greedy evaluation every eval_steps.")
    eval_steps: int | None = _f(None, "Evaluate every this many steps (eval_strategy='steps').")
    eval_on_start: bool = _f(False, "Evaluate before the first step.")
    per_device_eval_batch_size: int = _f(8, "Prompts per generation call of the greedy evaluation (TRL's default 8; "
                                            "larger is faster where memory allows).")
    save_strategy: str = _f("steps", "no | steps.")
    save_steps: int = _f(500, "Checkpoint every this many steps.")
    save_total_limit: int | None = _f(None, "Keep at most this many checkpoints.")
    resume_from_checkpoint: str | bool | None = _f(None, "Checkpoint folder, or True for the latest in output_dir.")
    resume_allow_changes: list = _f([], "Fields that may differ from the checkpoint's when resuming, e.g. "
                                        "[learning_rate, temperature]: the run goes on with the new values and is "
                                        "then no longer an exact continuation (said at the start).")
    plot: bool = _f(True, "Write plot.png (reward and accuracy over steps) at the end.")

    _OWN: ClassVar[type]
    """The class whose fields `grpokit train --help-config` lists (itself; read by grpokit.cli)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._OWN = cls

    def __init__(self, **kwargs: Any):
        name = type(self).__name__
        self._take_trl_aliases(kwargs)
        fields = {f.name: f for f in dataclasses.fields(self)}
        for key in list(kwargs):
            if key in fields:
                continue
            value = kwargs.pop(key)
            if key in UNSUPPORTED_TRL_FIELDS:
                if _is_off(value, UNSUPPORTED_TRL_FIELDS[key]):
                    continue
                raise ValueError(
                    f"{name}: {key}={value!r} is a TRL setting that grpokit does not support; "
                    f"remove it (or set it to {UNSUPPORTED_TRL_FIELDS[key][0]!r})."
                )
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"{name}: unknown field {key!r}.{hint}")
        for key, f in fields.items():
            if key in kwargs:
                value = kwargs[key]
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                value = f.default
            setattr(self, key, value)
        self._normalise()
        self.validate()

    def _take_trl_aliases(self, kwargs: dict) -> None:
        take_trl_aliases(kwargs, owner=type(self).__name__)

    def _normalise(self) -> None:
        name = type(self).__name__
        for f in dataclasses.fields(self):  # YAML 1.1 reads 1e-5 as a string
            value = getattr(self, f.name)
            if isinstance(f.default, float) and isinstance(value, str):
                try:
                    setattr(self, f.name, float(value))
                except ValueError:
                    raise ValueError(f"{name}: {f.name}={value!r} is not a number.") from None
        for key in ("save_strategy", "eval_strategy"):  # YAML reads `no` as False
            if getattr(self, key) is False:
                setattr(self, key, "no")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        self.report_to = [r for r in self.report_to if r not in ("none", None)] or []
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for f in dataclasses.fields(self):
            check_scalar_type(name, f.name, f.type, getattr(self, f.name))

    def need(self, cond: bool, msg: str | None) -> None:
        """An error naming the config class when `cond` is false (`msg` names the field and the fix)."""
        if not cond:
            raise ValueError(f"{type(self).__name__}: {msg}")

    def validate(self) -> None:
        """Every check that can be made without a model or dataset; messages name field and fix."""
        from grpokit.distributed import STRATEGIES
        from grpokit.rewards.runner import ON_ERROR
        from grpokit.rollout import ENGINES  # the engine registry (importing it registers the built-in engines)

        need = self.need
        need(self.max_tool_calling_iterations is None or self.max_tool_calling_iterations >= 0,
             "max_tool_calling_iterations must be None or >= 0.")
        need(self.tool_timeout is None or self.tool_timeout > 0, "tool_timeout must be None or > 0 seconds.")
        need(self.num_generations >= 2, f"num_generations={self.num_generations}: a group needs at least 2 samples.")
        need(self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1.")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1.")
        completions = self.per_device_train_batch_size * self.gradient_accumulation_steps
        need(completions % self.num_generations == 0,
             f"per_device_train_batch_size * gradient_accumulation_steps = {completions} completions per step "
             f"must be a multiple of num_generations={self.num_generations} (whole groups per step).")
        need(self.max_completion_length >= 1, "max_completion_length must be >= 1.")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length must be >= 1 or None.")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "set max_steps > 0 or num_train_epochs > 0.")
        need(self.temperature >= 0, "temperature must be >= 0.")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1].")
        need(self.top_k >= 0, "top_k must be >= 0 (0 = off).")
        need(self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1].")
        need(self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off).")
        need(self.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0.")
        need(self.pad_to_multiple_of is None or self.pad_to_multiple_of >= 1, "pad_to_multiple_of must be >= 1 or None.")
        self._check_generation_kwargs()
        self._check_chat_template_kwargs()
        need(self.rollout_engine in ENGINES,
             f"rollout_engine={self.rollout_engine!r}: use one of {', '.join(sorted(ENGINES))}.")
        need(self.draft_tokens >= 0, "draft_tokens must be >= 0 (0 = off).")
        need(self.draft_tokens == 0 or self.rollout_engine == "hf",
             f"draft_tokens={self.draft_tokens} drafts in grpokit's engine (rollout_engine='hf'), not with "
             f"rollout_engine={self.rollout_engine!r}; set draft_tokens=0 (vLLM has its own speculative decoding).")
        need(self.use_vllm == (self.rollout_engine == "vllm"),
             f"use_vllm={self.use_vllm!r} disagrees with rollout_engine={self.rollout_engine!r}; set rollout_engine "
             "(use_vllm=True is rollout_engine='vllm').")
        need(self.reward_on_error in ON_ERROR, f"reward_on_error: {', '.join(ON_ERROR)}.")
        need(self.reward_timeout > 0, "reward_timeout must be > 0 seconds.")
        need(self.learning_rate >= 0, "learning_rate must be >= 0.")
        need(self.lr_scheduler_type in LR_SCHEDULER_TYPES, one_of("lr_scheduler_type", self.lr_scheduler_type,
                                                                  LR_SCHEDULER_TYPES))
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1).")
        need(self.optim in OPTIMIZERS, f"optim={self.optim!r}: grpokit supports {', '.join(OPTIMIZERS)}.")
        need(self.on_nonfinite in ON_NONFINITE, one_of("on_nonfinite", self.on_nonfinite, ON_NONFINITE))
        need(self.distributed_strategy in STRATEGIES,
             one_of("distributed_strategy", self.distributed_strategy, STRATEGIES))
        need(self.ddp_timeout > 0, "ddp_timeout must be > 0 seconds.")
        need(self.eval_strategy in INTERVAL_STRATEGIES, one_of("eval_strategy", self.eval_strategy, INTERVAL_STRATEGIES))
        need(self.eval_strategy == "no" or (self.eval_steps or 0) > 0, "eval_strategy='steps' needs eval_steps > 0.")
        need(self.save_strategy in INTERVAL_STRATEGIES, one_of("save_strategy", self.save_strategy, INTERVAL_STRATEGIES))
        need(self.save_steps > 0, "save_steps must be > 0.")
        need(self.logging_steps > 0, "logging_steps must be > 0.")
        for r in self.report_to:
            need(r in TRACKING_BACKENDS, f"report_to: {r!r} is not one of {', '.join(TRACKING_BACKENDS)}.")
        if self.reward_weights is not None and self.reward_funcs:
            need(len(self.reward_weights) == len(self.reward_funcs),
                 f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs.")

    def _check_generation_kwargs(self) -> None:
        name = type(self).__name__
        if self.generation_kwargs is None:
            return
        if not isinstance(self.generation_kwargs, dict):
            raise ValueError(f"{name}: generation_kwargs={self.generation_kwargs!r} must be a mapping.")
        from transformers import GenerationConfig

        known = GenerationConfig().to_dict()
        unknown = sorted(k for k in self.generation_kwargs if k not in GENERATION_KWARGS and k not in known)
        if unknown and not self.use_vllm:
            raise ValueError(f"{name}: generation_kwargs {', '.join(map(repr, unknown))} are not transformers "
                             "GenerationConfig settings (with use_vllm=True they go to vllm.SamplingParams).")
        if self.generation_kwargs.get("do_sample", True) is False:
            raise ValueError(f"{name}: generation_kwargs do_sample=False would make the G samples of a group identical "
                             "(no advantage); GRPO samples. Use temperature for sharper sampling.")

    def _check_chat_template_kwargs(self) -> None:
        if self.chat_template_kwargs is not None and not isinstance(self.chat_template_kwargs, dict):
            raise ValueError(f"{type(self).__name__}: chat_template_kwargs={self.chat_template_kwargs!r} must be a "
                             "mapping.")

    def sampling(self) -> dict[str, Any]:
        """The sampling settings of a rollout: the fields, overridden by generation_kwargs (TRL:
        generation_kwargs win over the fields), by our names."""
        out = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
               "repetition_penalty": self.repetition_penalty, "stop": list(self.stop),
               "max_completion_length": self.max_completion_length}
        for key, value in (self.generation_kwargs or {}).items():
            if key == "do_sample" or key not in GENERATION_KWARGS:
                continue
            out[GENERATION_KWARGS[key]] = list(value) if key == "stop_strings" else value
        if out["top_k"] is None:
            out["top_k"] = 0
        return out

    # ---- what the shared set-up asks of an algorithm's config (GRPOConfig answers for GRPO) ----
    def loss_is_local_mean(self) -> bool:
        """Whether the algorithm's training loss is a mean over each micro-batch (TRL's local mean):
        its micro-batches are then never merged into one forward. True unless the algorithm says."""
        return True

    def update_passes(self) -> int:
        """Passes of updates over each generated batch (GRPO's num_iterations)."""
        return 1

    def reuses_generation(self) -> bool:
        """Whether one generated batch feeds several optimizer steps (the old policy's log-probs are
        then needed, and not the current ones)."""
        return False

    def per_micro_batch_terms(self) -> bool:
        """Whether the loss has terms defined over each micro-batch as laid out (GRPO's entropy mask
        and bonus): micro-batches are then neither merged nor thinned."""
        return False

    def penalises_reference(self) -> bool:
        """Whether the loss has a reference term over every token (GRPO's beta > 0): zero-advantage
        completions then still count."""
        return False

    def syncs_reference(self) -> bool:
        """Whether the reference follows the policy (TR-DPO's sync_ref_model)."""
        return False

    def corrects_sampler(self) -> bool:
        """Whether a sampler other than the trainer (vLLM) is corrected by importance sampling."""
        return False

    def samples_stale(self) -> bool:
        """Whether rollouts may come from older weights than those that train on them (GRPO's
        generation worker with max_staleness > 0): the sampler then differs from the trainer."""
        return False

    def objective_summary(self) -> str:
        """The start-up summary's words on the objective."""
        return f"lr={self.learning_rate}"

    def objective_warnings(self) -> list[str]:
        """Combinations of the objective's knobs worth a warning before step 1."""
        return []

    def extra_generation_kwargs(self) -> dict[str, Any]:
        """generation_kwargs beyond grpokit's sampler (num_beams, length_penalty, ...): they make
        the rollout run through transformers' generate (or go to vLLM's SamplingParams)."""
        return {k: v for k, v in (self.generation_kwargs or {}).items() if k not in GENERATION_KWARGS}

    # ---- conversions ----
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict):
        return cls(**d)

    def replace(self, **changes: Any):
        return type(self)(**with_changes(self.to_dict(), changes))


TrainingConfig._OWN = TrainingConfig


@dataclass(init=False)
class GRPOConfig(TrainingConfig):
    """All settings of a GRPO run (see each field's `help`): the fields every algorithm uses and
    GRPO's objective and step. Validated at construction."""

    # --- GRPO's step: generation reuse, batching, dynamic sampling ---
    steps_per_generation: int | None = _f(None, "Micro-batches sampled at once (TRL's): a multiple of "
                                                "gradient_accumulation_steps; each generation then feeds "
                                                "steps_per_generation / gradient_accumulation_steps optimizer steps "
                                                "(off-policy after the first). None = gradient_accumulation_steps.")
    token_budget: int | None = _f(None, "Cut the training micro-batches by tokens (at most this many per forward, "
                                        "rows packed across groups) instead of per_device_train_batch_size rows; "
                                        "for losses with global normalisers (dapo, dr_grpo, cispo, vespo).")
    num_iterations: int = _f(1, "mu: optimizer steps on each generated batch (>1 computes old logprobs).")
    dynamic_sampling: bool = _f(False, "DAPO's dynamic sampling: leave out groups whose rewards are all equal and "
                                       "sample more prompts until the step is full of groups with signal.")
    dynamic_sampling_max_rounds: int = _f(4, "Extra sampling rounds a step may make for dynamic sampling; then the "
                                             "remaining places keep signal-less groups.")
    # --- asynchronous generation (grpokit.pipeline; TRL's AsyncGRPOConfig names) ---
    max_staleness: int | None = _f(None, "None: generation in the training process, between optimizer steps. An "
                                         "integer: a generation worker process samples the next batches while the "
                                         "trainer trains, each rollout at most this many optimizer steps older than "
                                         "the step that first trains on it (0: sampled with the current weights, "
                                         "the synchronous run; TRL AsyncGRPOConfig's default is 4).")
    weight_sync_steps: int = _f(1, "Optimizer steps between the weights sent to the generation worker (TRL's); "
                                   "needs max_staleness >= weight_sync_steps - 1.")
    queue_maxsize: int = _f(1024, "Most completions sampled ahead and not yet trained on (TRL's, counted in "
                                  "completions).")
    max_inflight_tasks: int = _f(-1, "Most completions requested from the generation worker and not yet returned "
                                     "(TRL's; -1 = as many as max_staleness and queue_maxsize allow).")
    heartbeat_stale_after_s: float = _f(300.0, "Seconds the trainer waits on the generation worker (a batch, a "
                                               "weight sync) before it stops the run naming the stage (TRL's).")
    sync_probe_tolerance: float = _f(1e-3, "After each weight sync the worker and the trainer score a fixed probe "
                                           "set; a larger log-prob gap stops the run naming the parameters that "
                                           "differ.")
    # --- objective (grpokit.algos) and its step ---
    beta: float = _f(0.0, "KL coefficient to the reference model (0: no reference is loaded).")
    kl_estimator: str = _f("k3", "KL estimator: k1 | k2 | k3.")
    epsilon: float = _f(0.2, "Lower clip range of the ratio.")
    epsilon_high: float | None = _f(None, "Upper clip range (clip-higher, DAPO); None = epsilon.")
    delta: float | None = _f(None, "Two-sided cap of the unclipped ratio branch.")
    dual_clip: float | None = _f(None, "Dual-clip constant c for negative advantages (None = off).")
    loss_type: str = _f("dapo", f"Policy loss, by its registry name (grpokit.algos.LOSS_TYPES): {' | '.join(LOSS_TYPES)}.")
    scale_rewards: str | bool = _f("group", "Advantage scaling: group | batch | none (True = group, False = none) | "
                                   "rank (grpokit's: the within-group rank, centred, spanning [-1, 1]).")
    advantage_estimator: str = _f("grpo", "Baseline: grpo (group mean) | rloo (leave-one-out).")
    importance_sampling_level: str = _f("token", "token | sequence (GSPO).")
    sapo_temperature_pos: float = _f(1.0, "SAPO gate temperature for positive advantages.")
    sapo_temperature_neg: float = _f(1.05, "SAPO gate temperature for negative advantages.")
    vespo_k_pos: float = _f(2.0, "VESPO gamma shape k for advantages >= 0.")
    vespo_lambda_pos: float = _f(3.0, "VESPO gamma rate lambda for advantages >= 0.")
    vespo_k_neg: float = _f(3.0, "VESPO gamma shape k for negative advantages.")
    vespo_lambda_neg: float = _f(2.0, "VESPO gamma rate lambda for negative advantages.")
    use_bias_correction_kl: bool = _f(True, "Weight the KL estimate by the importance ratio (TRL's default; changes "
                                            "the KL gradient when beta > 0).")
    off_policy_mask_threshold: float | None = _f(None, "Off-policy sequence mask (DeepSeek-V3.2): drop negative-"
                                                       "advantage completions whose mean KL to the sampler exceeds "
                                                       "this (None = off).")
    multi_objective_aggregation: str = _f("sum_then_normalize", "sum_then_normalize (weighted sum, then group "
                                          "advantages) | normalize_then_sum (GDPO: each reward normalised in its "
                                          "group, the sum normalised over the batch).")
    entropy_coef: float = _f(0.0, "Entropy bonus: loss - entropy_coef * mean token entropy (0 = off).")
    use_adaptive_entropy: bool = _f(False, "Adapt entropy_coef each step: +entropy_coef_delta while the entropy is "
                                           "at or below entropy_target, -delta above (bonus applied only at or below).")
    entropy_coef_min: float = _f(0.0, "Lower bound of the adaptive entropy_coef.")
    entropy_coef_max: float = _f(1.0, "Upper bound of the adaptive entropy_coef.")
    entropy_coef_delta: float = _f(0.005, "Step of the adaptive entropy_coef.")
    entropy_target: float = _f(0.2, "Target mean token entropy of the adaptive entropy bonus.")
    router_aux_loss_coef: float | None = _f(None, "Weight of a mixture-of-experts model's load-balancing loss (its "
                                                  "config has output_router_logits); None = the model config's.")
    sync_ref_model: bool = _f(False, "Move the reference towards the policy every ref_model_sync_steps (TR-DPO).")
    ref_model_mixup_alpha: float = _f(0.6, "ref = alpha * policy + (1 - alpha) * ref at each sync.")
    ref_model_sync_steps: int = _f(512, "Steps between reference syncs.")
    top_entropy_quantile: float = _f(1.0, "Train only on the top-rho quantile of tokens by entropy (1 = all).")
    vllm_importance_sampling_correction: bool = _f(True, "Correct sampler/trainer logprob mismatch (vLLM).")
    vllm_importance_sampling_mode: str = _f("sequence_mask", "token_truncate | token_mask | sequence_truncate | sequence_mask.")
    vllm_importance_sampling_clip_max: float | None = _f(3.0, "Upper bound C_max of the importance-sampling "
                                                              "correction (truncate: clip; mask: drop above).")
    vllm_importance_sampling_clip_min: float | None = _f(None, "Lower bound C_min of the correction (None: none).")

    def _take_trl_aliases(self, kwargs: dict) -> None:
        super()._take_trl_aliases(kwargs)
        take_grpo_trl_aliases(kwargs, owner=type(self).__name__)

    def _normalise(self) -> None:
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        super()._normalise()

    def validate(self) -> None:
        super().validate()
        need = self.need
        need(self.steps_per_generation is None or (self.steps_per_generation >= 1 and
                                                   self.steps_per_generation % self.gradient_accumulation_steps == 0),
             f"steps_per_generation={self.steps_per_generation} must be a multiple of gradient_accumulation_steps="
             f"{self.gradient_accumulation_steps} (each optimizer step takes that many micro-batches).")
        need(self.num_iterations >= 1, "num_iterations must be >= 1.")
        need(self.beta >= 0, "beta must be >= 0.")
        need(self.kl_estimator in KL_ESTIMATORS, one_of("kl_estimator", self.kl_estimator, KL_ESTIMATORS))
        need(self.epsilon >= 0 and (self.epsilon_high is None or self.epsilon_high >= 0), "epsilon and epsilon_high must be >= 0.")
        need(self.delta is None or self.delta > 1, "delta must be > 1 (it caps the ratio) or None.")
        need(self.dual_clip is None or self.dual_clip > 1, "dual_clip must be > 1 or None.")
        need(self.loss_type in LOSS_TYPES, one_of("loss_type", self.loss_type, LOSS_TYPES))
        need(self.scale_rewards in SCALE_REWARDS, one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS))
        need(self.advantage_estimator in ADVANTAGE_ESTIMATORS,
             one_of("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS))
        need(self.importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS,
             one_of("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS))
        need(0 < self.top_entropy_quantile <= 1 or self.top_entropy_quantile == 0, "top_entropy_quantile in [0, 1].")
        need(self.vllm_importance_sampling_mode in VLLM_IMPORTANCE_SAMPLING_MODES,
             f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} is not a known mode: use one of "
             f"{', '.join(VLLM_IMPORTANCE_SAMPLING_MODES)}.")
        need(self.multi_objective_aggregation in MULTI_OBJECTIVE_AGGREGATIONS,
             one_of("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS))
        need(self.off_policy_mask_threshold is None or self.off_policy_mask_threshold >= 0,
             "off_policy_mask_threshold must be >= 0 or None.")
        need(self.entropy_coef_min <= self.entropy_coef_max, "entropy_coef_min must be <= entropy_coef_max.")
        need(self.entropy_coef_delta >= 0, "entropy_coef_delta must be >= 0.")
        need(not self.sync_ref_model or self.beta > 0,
             "sync_ref_model=True needs a reference model: set beta > 0 (with beta=0 no reference is loaded).")
        need(0 <= self.ref_model_mixup_alpha <= 1, "ref_model_mixup_alpha must be in [0, 1].")
        need(self.ref_model_sync_steps >= 1, "ref_model_sync_steps must be >= 1.")
        need(self.dynamic_sampling_max_rounds >= 0, "dynamic_sampling_max_rounds must be >= 0.")
        need(self.max_staleness is None or self.max_staleness >= 0, "max_staleness must be >= 0 or None.")
        need(self.weight_sync_steps >= 1, "weight_sync_steps must be >= 1.")
        need(self.max_staleness is None or self.max_staleness >= self.weight_sync_steps - 1,
             f"max_staleness={self.max_staleness} with weight_sync_steps={self.weight_sync_steps}: the worker's "
             f"weights may then be {self.weight_sync_steps - 1} steps old; set max_staleness >= "
             f"{self.weight_sync_steps - 1}.")
        need(self.queue_maxsize >= 1, "queue_maxsize must be >= 1 completions.")
        need(self.max_inflight_tasks == -1 or self.max_inflight_tasks >= 1, "max_inflight_tasks must be -1 or >= 1.")
        need(self.heartbeat_stale_after_s > 0, "heartbeat_stale_after_s must be > 0 seconds.")
        need(self.sync_probe_tolerance >= 0, "sync_probe_tolerance must be >= 0.")
        need(self.max_staleness is None or not self.use_vllm,
             "max_staleness with rollout_engine='vllm': the generation worker runs grpokit's engine on a CPU copy "
             "of the weights; set max_staleness=None to generate with vLLM.")
        need(self.token_budget is None or self.token_budget >= 1, "token_budget must be >= 1 tokens or None.")
        if self.token_budget is not None:
            need(not is_local_mean(self.loss_type),
                 f"token_budget with loss_type={self.loss_type!r}: its loss is a mean per micro-batch (TRL's meaning), "
                 "so cutting micro-batches by tokens would change it; use "
                 f"{', '.join(t for t in LOSS_TYPES if not is_local_mean(t))}.")
            need(self.top_entropy_quantile == 1.0 and self.entropy_coef == 0.0 and not self.use_adaptive_entropy,
                 "token_budget with the entropy mask or bonus (defined per micro-batch of rows) is not supported.")
        need(not (self.loss_type == "vespo" and self.use_vllm and self.vllm_importance_sampling_correction
                  and not self.vllm_importance_sampling_mode.startswith("token_")),
             f"loss_type='vespo' takes the sampler correction into its sequence weight per token: set "
             f"vllm_importance_sampling_mode to token_truncate or token_mask (got {self.vllm_importance_sampling_mode!r}).")

    def loss_is_local_mean(self) -> bool:
        """The loss type's aggregation says (grpokit.algos.AGGREGATIONS)."""
        return is_local_mean(self.loss_type)

    def update_passes(self) -> int:
        return self.num_iterations

    def reuses_generation(self) -> bool:
        return self.num_iterations > 1 or self.updates_per_generation() > 1

    def per_micro_batch_terms(self) -> bool:
        # the entropy mask (a per-micro-batch quantile) and the entropy bonus (a per-micro-batch
        # mean, zero-advantage tokens included) are defined per micro-batch of TRL's layout
        return self.top_entropy_quantile < 1.0 or self.entropy_coef != 0.0 or self.use_adaptive_entropy

    def penalises_reference(self) -> bool:
        return self.beta != 0

    def samples_stale(self) -> bool:
        return (self.max_staleness or 0) > 0

    def syncs_reference(self) -> bool:
        return self.sync_ref_model

    def corrects_sampler(self) -> bool:
        return self.vllm_importance_sampling_correction

    def objective_summary(self) -> str:
        high = self.epsilon_high if self.epsilon_high is not None else self.epsilon
        return (f"loss_type={self.loss_type}, epsilon={self.epsilon}/{high}, beta={self.beta}, lr={self.learning_rate}, "
                f"scale_rewards={self.scale_rewards}")

    def objective_warnings(self) -> list[str]:
        """Combinations TRL warns about, said in the summary before step 1."""
        out = []
        if self.importance_sampling_level == "sequence" and self.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            out.append(f"warning: importance_sampling_level='sequence' with loss_type='{self.loss_type}' sums "
                       "per-token contributions, which weights each sequence by its completion length instead of "
                       "optimizing GSPO's per-sequence objective; loss_type='grpo' gives the GSPO paper's setup.")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            out.append("warning: loss_type='luspo' is meant with importance_sampling_level='sequence' (the paper's "
                       "setup).")
        if self.loss_type == "vespo" and self.importance_sampling_level != "token":
            out.append("warning: loss_type='vespo' computes its sequence weights itself; importance_sampling_level "
                       "should be 'token' (the default).")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            out.append(f"note: loss_type='cispo' caps the importance weight at epsilon={self.epsilon} when "
                       "epsilon_high is unset (TRL's meaning); ScaleRL's recipe sets epsilon_high=5.0.")
        return out

    def updates_per_generation(self) -> int:
        """Optimizer steps each generated batch feeds (per update pass): TRL's steps_per_generation
        / gradient_accumulation_steps (1 by default)."""
        return (self.steps_per_generation or self.gradient_accumulation_steps) // self.gradient_accumulation_steps


@dataclass(init=False)
class AsyncGRPOConfig(GRPOConfig):
    """TRL's AsyncGRPOConfig: GRPOConfig with generation in a worker process by default
    (max_staleness=4) and TRL AsyncGRPOConfig's other defaults that differ from GRPOConfig's: a
    constant schedule, logging every step, completions up to 2048 tokens."""

    max_staleness: int | None = _f(4, GRPOConfig.__dataclass_fields__["max_staleness"].metadata["help"])
    lr_scheduler_type: str = _f("constant", GRPOConfig.__dataclass_fields__["lr_scheduler_type"].metadata["help"])
    logging_steps: int = _f(1, GRPOConfig.__dataclass_fields__["logging_steps"].metadata["help"])
    max_completion_length: int = _f(2048, GRPOConfig.__dataclass_fields__["max_completion_length"].metadata["help"])


GRPOFields = GRPOConfig
"""GRPOConfig's dataclass (its fields: `dataclasses.fields(GRPOFields)`)."""

GRPO_STEP_FIELDS = (
    "steps_per_generation", "token_budget", "num_iterations", "dynamic_sampling", "dynamic_sampling_max_rounds",
    "scale_rewards", "advantage_estimator", "multi_objective_aggregation",
    "entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max", "entropy_coef_delta",
    "entropy_target", "router_aux_loss_coef", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "top_entropy_quantile", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
    "max_staleness", "weight_sync_steps", "queue_maxsize", "max_inflight_tasks", "heartbeat_stale_after_s",
    "sync_probe_tolerance",
)
"""The fields GRPO's step reads beyond its loss: generation reuse and batching, dynamic sampling,
the advantages, the entropy bonus and mask, the MoE router loss, the reference sync, the sampler
correction."""


def grpo_only_fields() -> tuple[str, ...]:
    """GRPOConfig's fields that other algorithms do not have: `loss_type`, the knobs of the
    registered loss types (grpokit.algos.losses) that are not common fields, and GRPO's step
    fields. The baselines refuse them (grpokit.baselines.common)."""
    common = {f.name for f in dataclasses.fields(TrainingConfig)}
    loss_knobs = tuple(k for k in policy_loss_knobs() if k not in common)
    return tuple(dict.fromkeys(("loss_type",) + loss_knobs + GRPO_STEP_FIELDS))



def _agree(owner: str, name: str, value, ours: str, expected) -> None:
    if value is not None and value != expected:
        raise ValueError(f"{owner}: {name}={value!r} disagrees with {ours}={expected!r}; grpokit takes "
                         f"{ours} (remove {name}).")


def take_trl_aliases(kwargs: dict, owner: str) -> None:
    """TRL fields of every algorithm that are another name for one of ours: accepted when they
    agree (a config dumped with TRL's to_dict() loads), an error naming both otherwise."""
    if "activation_checkpointing" in kwargs:  # transformers v5's name of gradient_checkpointing
        value = kwargs.pop("activation_checkpointing")
        if "gradient_checkpointing" in kwargs:
            _agree(owner, "activation_checkpointing", value, "gradient_checkpointing", kwargs["gradient_checkpointing"])
        elif value is not None:
            kwargs["gradient_checkpointing"] = bool(value)
    # TRL's use_vllm is rollout_engine="vllm": the one given sets the other; both given must agree
    use_vllm = kwargs.get("use_vllm")
    if isinstance(use_vllm, bool):
        if "rollout_engine" not in kwargs:
            kwargs["rollout_engine"] = "vllm" if use_vllm else "hf"
        elif use_vllm != (kwargs["rollout_engine"] == "vllm"):
            raise ValueError(f"{owner}: use_vllm={use_vllm!r} disagrees with rollout_engine="
                             f"{kwargs['rollout_engine']!r}; set one of them (use_vllm=True is rollout_engine='vllm').")
    elif "use_vllm" not in kwargs and "rollout_engine" in kwargs:
        kwargs["use_vllm"] = kwargs["rollout_engine"] == "vllm"
    if isinstance(kwargs.get("pad_to_multiple_of"), str):  # TRL's "auto": None off Neuron devices
        value = kwargs["pad_to_multiple_of"]
        kwargs["pad_to_multiple_of"] = None if value.lower() in ("auto", "none", "null") else int(value)


def take_grpo_trl_aliases(kwargs: dict, owner: str) -> None:
    """TRL GRPOConfig's fields that are another name for one of GRPO's, or that TRL derives from
    GRPO's: accepted when they agree, an error naming both otherwise."""
    if "vllm_importance_sampling_cap" in kwargs:  # the name of TRL < 1.x (and of grpokit before)
        cap = kwargs.pop("vllm_importance_sampling_cap")
        if "vllm_importance_sampling_clip_max" in kwargs:
            _agree(owner, "vllm_importance_sampling_cap", cap, "vllm_importance_sampling_clip_max",
                   kwargs["vllm_importance_sampling_clip_max"])
        else:
            kwargs["vllm_importance_sampling_clip_max"] = cap
    # TRL's generation_batch_size (all processes) = per_device_train_batch_size * processes *
    # steps_per_generation: one is derived from the other
    per_device = kwargs.get("per_device_train_batch_size", 8)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; 1 in a single process
    size = kwargs.pop("generation_batch_size", None)
    if size is not None:
        if kwargs.get("steps_per_generation") is not None:
            _agree(owner, "generation_batch_size", size, "per_device_train_batch_size * processes * steps_per_generation",
                   per_device * world * kwargs["steps_per_generation"])
        elif size % (per_device * world):
            raise ValueError(f"{owner}: generation_batch_size={size} must be a multiple of "
                             f"per_device_train_batch_size * processes = {per_device * world}.")
        else:
            kwargs["steps_per_generation"] = size // (per_device * world)


ALIASED_FIELDS = (("rollout_engine", "use_vllm"),)
"""Pairs of fields that name one setting (TRL's name beside ours): either one sets the other."""


def with_changes(current: dict, changes: dict) -> dict:
    """A config's fields (`to_dict()`) with `changes`, as `replace` builds them: changing one field
    of an aliased pair drops the other's current value, which the change then sets."""
    out = {**current, **changes}
    for ours, theirs in ALIASED_FIELDS:
        if (ours in changes) != (theirs in changes):
            out.pop(theirs if ours in changes else ours, None)
    return out


def _is_off(value: Any, off_values: tuple) -> bool:
    # bool is an int in Python: 0 must not count as False, nor True as 1.
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in off_values)


def field_help(config_cls: type = TrainingConfig) -> dict[str, str]:
    """Field name -> one-line help of `config_cls`'s fields (default: those every algorithm has;
    `grpokit train --help-config` adds the chosen class's, its `_OWN`)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config_cls)}
