"""The set-up of a run in small builders, each returning a frozen record of what it built; the
composition root (`core.run.build_run`) calls them in order. Bad input fails here, with a message
naming the field or the argument and the fix: dataset columns, reward signatures, prompts longer
than the context, a missing chat template, an empty dataset. The config itself was validated
when it was made (`validate` of the algorithm's config) and is never changed here."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from grpokit import distributed
from grpokit.config import TrainingConfig
from grpokit.core.forward import score_with_training_forward
from grpokit.modeling.info import unwrap
from grpokit.data.prompts import PromptSet


@dataclass(frozen=True)
class Sources:
    """Where the rows come from: the training rows, the eval set(s), the built-in task (if any),
    the tools and environments."""

    train_dataset: Any
    eval_dataset: Any
    task: Any
    tools: Any
    environment_factory: Any
    streamed: bool


def resolve_sources(cfg: TrainingConfig, train_dataset, eval_dataset, *, tools, environment_factory,
                    rows_per_step_factor: int, updates_per_batch: int) -> Sources:
    """The training rows (a dataset given, a hub id or file, a built-in task, or an environment's
    placeholder rows), the eval set, and the tools and environments (the command line's paths
    imported; a tool task's own)."""
    from grpokit import data
    from grpokit.rewards.registry import import_path

    if tools is None and cfg.tools:  # the command line's 'module:function' paths
        tools = [t if callable(t) else import_path(str(t), "tool") for t in cfg.tools]
    if environment_factory is None and cfg.environment_factory:
        environment_factory = import_path(str(cfg.environment_factory), "environment_factory")
    task = None
    if train_dataset is None and cfg.dataset_name is None and cfg.task is None and environment_factory is not None:
        train_dataset = _environment_placeholder(cfg, environment_factory, rows_per_step_factor)
    if train_dataset is None and cfg.dataset_name is None and cfg.task is None:
        raise ValueError("`train_dataset` is required: pass train_dataset= (a datasets.Dataset with a 'prompt' column), "
                         "or set dataset_name (a hub id or a local file) or task (a built-in task: "
                         f"{', '.join(data.TASKS)}).")
    if train_dataset is None and cfg.dataset_name is None:
        assert cfg.task is not None  # said above
        task = data.get_task(cfg.task, seed=cfg.seed, num_train=cfg.task_num_train, num_eval=cfg.task_num_eval)
        train_dataset, eval_dataset = task.train_dataset, eval_dataset if eval_dataset is not None else task.eval_dataset
    elif cfg.task is not None:
        raise ValueError("GRPOConfig: set either task (a built-in dataset) or dataset_name/train_dataset, not both.")
    if isinstance(train_dataset, str) or (train_dataset is None and cfg.dataset_name):
        name = train_dataset if isinstance(train_dataset, str) else cfg.dataset_name
        train_dataset = data.load_dataset_spec(name, split=cfg.dataset_train_split, config_name=cfg.dataset_config,
                                               streaming=cfg.dataset_streaming)
        if eval_dataset is None and cfg.dataset_test_split:
            eval_dataset = data.load_dataset_spec(name, split=cfg.dataset_test_split, config_name=cfg.dataset_config,
                                                  streaming=cfg.dataset_streaming)
    streamed = is_iterable_dataset(train_dataset)
    if streamed:
        train_dataset = rows_of_stream(train_dataset, cfg, rows_per_step_factor, distributed.world_size(),
                                       updates_per_batch)
    if environment_factory is not None and "prompt" not in train_dataset.column_names:
        # as TRL: rows that only pick an environment get an empty user turn; reset() supplies the prompt
        train_dataset = train_dataset.add_column("prompt", [[{"role": "user", "content": ""}]] * len(train_dataset))
    if cfg.remove_unused_columns:  # as TRL: the prompt and its images
        train_dataset = train_dataset.select_columns(
            ["prompt"] + [c for c in ("image", "images") if c in train_dataset.column_names])
    if task is not None and tools is None and environment_factory is None:  # a tool task's own
        tools, environment_factory = task.tools, task.environment_factory
    return Sources(train_dataset=train_dataset, eval_dataset=eval_dataset, task=task, tools=tools,
                   environment_factory=environment_factory, streamed=streamed)


@dataclass(frozen=True)
class Models:
    """The policy (LoRA applied, dropout and vision tower as configured), its tokenizer and, for a
    vision-language model, its processor; the reference when one is needed."""

    policy: Any
    tokenizer: Any
    processor: Any
    name: str
    vlm: bool
    is_peft: bool
    ref_model: Any
    notes: tuple[str, ...]


def load_models(cfg: TrainingConfig, model, tokenizer, *, task, device: torch.device, image_column: str | None,
                quantization_config, peft_config, needs_reference: bool) -> Models:
    """Load the policy (a name, a path or a loaded model), its tokenizer or processor, LoRA, the
    reference (a frozen copy unless LoRA's adapter can be switched off)."""
    from grpokit import models
    from grpokit.modeling.vision import is_vision_model, language_model_lora_targets, vision_parameters
    from grpokit.data import vision as data_vision

    notes: list[str] = []
    starter = models.starter_model_path(task.name if task is not None else None)
    model_ref = model if model is not None else (cfg.model_name_or_path or starter)
    if not isinstance(model_ref, str) and tokenizer is None:
        # as TRL: the processing class of the model's own name (the id or path it was loaded from)
        tokenizer = (getattr(model_ref, "name_or_path", None)
                     or getattr(getattr(model_ref, "config", None), "_name_or_path", None))
        if not tokenizer:
            raise ValueError("GRPOTrainer: model is a loaded model with no name to load its tokenizer from; pass the "
                             "tokenizer as processing_class=.")
    name = model_ref if isinstance(model_ref, str) else type(model_ref).__name__
    if isinstance(model_ref, str) and model_ref == starter:
        name = f"grpokit starter model ({os.path.basename(starter)})"
    init_kwargs = dict(cfg.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = _checked_quantization(quantization_config, model_ref, peft_config, cfg)
    # TRL's model_init_kwargs dtype (e.g. `--dtype bfloat16`) wins over the bf16 default
    dtype = init_kwargs.pop("dtype", None) or init_kwargs.pop("torch_dtype", None) or _pick_dtype(cfg, device, notes)
    policy = models.load_model(model_ref, dtype=dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                               **init_kwargs)
    vlm = is_vision_model(unwrap(policy))
    processor = None
    source = tokenizer if tokenizer is not None else model_ref
    if vlm and isinstance(source, str | os.PathLike) and str(source) not in ("char", "char-chat"):
        processor = data_vision.load_processor(str(source), trust_remote_code=cfg.trust_remote_code)
    elif data_vision.is_processor(source):
        processor = source
    if image_column is not None and not vlm:
        raise ValueError(f"the dataset has images (column {image_column}), but {name} is a text-only model "
                         f"({type(unwrap(policy)).__name__}): use a vision-language model "
                         "(AutoModelForImageTextToText), or drop the image column.")
    if image_column is not None:
        data_vision.check_processor(processor if processor is not None else source, name)
    tok = models.load_tokenizer(processor.tokenizer if processor is not None else source)
    if cfg.cast_lm_head_to_fp32:
        models.cast_lm_head_to_fp32(policy)
    if cfg.disable_dropout:
        for m in policy.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if peft_config is None and cfg.use_peft:
        from peft import LoraConfig

        targets = cfg.lora_target_modules
        if vlm:  # the adapter in the language model; the vision tower stays frozen
            targets = language_model_lora_targets(unwrap(policy), targets)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
    if cfg.freeze_vision_tower:
        if not vlm:
            raise ValueError(f"GRPOConfig: freeze_vision_tower=True, but {name} is not a vision-language model "
                             "(it has no vision tower); leave freeze_vision_tower=False.")
        for _, p in vision_parameters(unwrap(policy)):
            p.requires_grad_(False)
        notes.append("vision tower and projector frozen (freeze_vision_tower): image features once per step")
    is_peft = peft_config is not None or hasattr(policy, "disable_adapter")
    if peft_config is not None:
        policy = models.apply_lora(policy, peft_config)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        if is_peft and hasattr(policy, "enable_input_require_grads"):
            policy.enable_input_require_grads()
    if cfg.syncs_reference() and is_peft:
        raise ValueError("sync_ref_model=True with a LoRA (PEFT) model: the reference is the base model with the "
                         "adapter off, there is no separate copy to sync (as in TRL). Use sync_ref_model=False, or "
                         "full fine-tuning.")
    ref_model = None
    if needs_reference and not is_peft:
        ref_model = models.load_reference_model(policy)
        if cfg.cast_lm_head_to_fp32:  # the copied head's forward must use the copy's weights
            models.cast_lm_head_to_fp32(ref_model)
    return Models(policy=policy, tokenizer=tok, processor=processor, name=name, vlm=vlm, is_peft=is_peft,
                  ref_model=ref_model, notes=tuple(notes))


def build_multiturn(cfg: TrainingConfig, sources: Sources, models: Models, *, rollout_func):
    """grpokit.envs.MultiTurn for TRL's `tools=` / `environment_factory=`, or None."""
    if not sources.tools and sources.environment_factory is None:
        return None
    from grpokit.envs import MultiTurn

    if rollout_func is not None:
        raise ValueError("GRPOTrainer: rollout_func drives generation itself; it cannot be combined with tools= or "
                         "environment_factory= (call your tools inside rollout_func).")
    return MultiTurn(tools=sources.tools, environment_factory=sources.environment_factory, tokenizer=models.tokenizer,
                     max_iterations=cfg.max_tool_calling_iterations, tool_timeout=cfg.tool_timeout,
                     chat_template_kwargs=cfg.chat_template_kwargs, processor=models.processor)


def encode_prompts(cfg: TrainingConfig, dataset, models: Models, multiturn, *, samples_elsewhere: str | None) -> PromptSet:
    """The training rows rendered (chat template, processor for images) and tokenized, checked
    against `max_prompt_length` and the model's context. `samples_elsewhere`: what samples instead
    of grpokit's single-turn rollout (images are refused with it)."""
    from grpokit import data
    from grpokit.data import vision as data_vision

    if any(c in dataset.column_names for c in data_vision.IMAGE_COLUMNS) and samples_elsewhere:
        raise ValueError(f"images with {samples_elsewhere} are not supported yet: train on images with grpokit's own "
                         "single-turn rollout.")
    vision = None
    if models.processor is not None and multiturn is None:  # a VLM's prompts through its processor (its template)
        prompt_ids, vision = data_vision.encode_rows(dataset, models.processor, max_prompt_length=cfg.max_prompt_length,
                                                     chat_template_kwargs=cfg.chat_template_kwargs)
        vision = vision if any(v is not None for v in vision) else None
    else:
        tools_of_row = None
        if multiturn is not None:
            envs_col = dataset["environment"] if "environment" in dataset.column_names else None
            tools_of_row = lambda i: multiturn.row_tools({"environment": envs_col[i] if envs_col else None})  # noqa: E731
        prompt_ids = data.validate_prompts(dataset, models.tokenizer, max_prompt_length=cfg.max_prompt_length,
                                           chat_template_kwargs=cfg.chat_template_kwargs, tools_of_row=tools_of_row)
    conversational = data.is_conversational(dataset[0])
    if multiturn is not None and not conversational:
        raise ValueError("tools / environment_factory need conversational prompts (a list of {'role', 'content'} "
                         "messages per row), so that tool calls and results are turns of a conversation.")
    max_ctx = getattr(getattr(models.policy, "config", None), "max_position_embeddings", None)
    if max_ctx:
        longest = max(map(len, prompt_ids))
        if longest + cfg.max_completion_length > max_ctx:
            raise ValueError(f"the longest prompt ({longest} tokens) + max_completion_length "
                             f"({cfg.max_completion_length}) exceeds the model's context of {max_ctx} tokens: "
                             f"set max_completion_length={max_ctx - longest} or less (or max_prompt_length).")
    return PromptSet(prompts=list(dataset["prompt"]), prompt_ids=prompt_ids,
                     columns={c: list(dataset[c]) for c in dataset.column_names if c != "prompt"},
                     conversational=conversational, vision=vision)


def build_rewards(cfg: TrainingConfig, reward_funcs, *, task, multiturn, columns: set[str], more_columns_later: bool):
    """The reward functions (callables, reward models, registry names, paths; an environment's
    get_reward after them, weight 1, as TRL), run by a RewardRunner, checked against the columns."""
    from grpokit.rewards import RewardRunner, load_reward_funcs

    funcs = reward_funcs if reward_funcs is not None else (cfg.reward_funcs or (task.reward_funcs if task else None))
    env_funcs = multiturn.reward_funcs() if multiturn is not None else []
    if not funcs and not env_funcs:
        raise ValueError("No reward source provided: pass reward_funcs= (callables, reward model ids or paths, "
                         "registry names or 'module:function'), set reward_funcs in the config, or give an "
                         "environment_factory whose environment defines a `get_reward` method.")
    task_funcs = task is not None and funcs is task.reward_funcs
    funcs = [] if not funcs else (list(funcs) if isinstance(funcs, (list, tuple)) else [funcs])
    weights = cfg.reward_weights if cfg.reward_weights is not None else (task.reward_weights if task_funcs else None)
    if weights is not None and len(weights) != len(funcs):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(funcs)} reward functions.")
    if env_funcs:
        weights = (list(weights) if weights is not None else [1.0] * len(funcs)) + [1.0] * len(env_funcs)
        funcs = funcs + env_funcs
    runner = RewardRunner(load_reward_funcs(list(funcs), reward_kwargs=cfg.reward_kwargs), weights=weights,
                          timeout=cfg.reward_timeout, on_error=cfg.reward_on_error,
                          num_workers=cfg.reward_num_workers, group_size=cfg.num_generations)
    runner.check_signature(columns=columns, more_columns_later=more_columns_later)
    return runner


def build_engine(cfg: TrainingConfig, models: Models, *, images: bool, notes: list[str]):
    """The rollout engine named by `rollout_engine` (vLLM for `use_vllm`): grpokit's HFEngine
    when it can hold the model's state and honour every sampling setting, else transformers'
    generate (said in the summary)."""
    from grpokit.rollout import capabilities_of, make_engine, needs_generate

    extra = cfg.extra_generation_kwargs()
    policy, tok = models.policy, models.tokenizer
    if cfg.rollout_engine != "hf":  # hf-generate, vllm, or one registered with register_engine
        engine = make_engine(cfg.rollout_engine, policy, tok, max_batch_tokens=cfg.max_batch_tokens,
                             generation_kwargs=extra, score_with_images=score_with_training_forward)
    else:
        why = needs_generate(policy) or (f"generation_kwargs {', '.join(sorted(extra))} need transformers' generate"
                                         if extra else None)
        if why:
            notes.append(f"rollout: transformers' generate ({why}); slower than grpokit's engine"
                         + (f", and without draft tokens (draft_tokens={cfg.draft_tokens})." if cfg.draft_tokens else "."))
            engine = make_engine("hf-generate", policy, tok, generation_kwargs=extra,
                                 score_with_images=score_with_training_forward)
        else:
            engine = make_engine("hf", policy, tok, max_batch_tokens=cfg.max_batch_tokens, draft_tokens=cfg.draft_tokens)
            if cfg.draft_tokens:
                notes.append(f"rollout: up to {cfg.draft_tokens} draft tokens per completion and step (n-gram lookup), "
                             "checked in the same forward; not with stop strings, a repetition penalty or images.")
    if images and not capabilities_of(engine).images:
        raise ValueError(f"images are sampled by grpokit's engine or transformers' generate, not by "
                         f"{type(engine).__name__}; use the default engine.")
    return engine


@dataclass(frozen=True)
class Optimization:
    """The optimizer (the policy's trained parameters, then each extra module's group), the
    learning-rate schedule over every optimizer step, and the run's length."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    prompts_per_step: int


def build_optimization(cfg: TrainingConfig, policy, optimizers, *, extra_modules, device: torch.device, world: int,
                       num_rows: int, rows_per_step_factor: int, updates_per_batch: int,
                       optimizer_steps_per_step: int) -> Optimization:
    optimizer, scheduler = optimizers
    if world > 1 and cfg.distributed_strategy == "fsdp2" and optimizer is not None:
        raise ValueError("distributed_strategy='fsdp2' shards the parameters, so an optimizer made before "
                         "cannot be used: leave optimizers=(None, None) to let grpokit build it.")
    if optimizer is None:
        # "adamw_torch_fused" (the default, as in transformers for torch >= 2.8): torch's fused
        # kernel, on CPU too (5x faster than the per-tensor loop on the starter model)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay,
                                      fused=(cfg.optim == "adamw_torch_fused" and device.type in ("cpu", "cuda")) or None)
    for extra in extra_modules:
        optimizer.add_param_group({"params": list(extra.parameters())})
    prompts_per_step = prompts_per_rank_step(cfg, rows_per_step_factor)
    total_steps = _total_steps(cfg, num_rows, prompts_per_step * world, updates_per_batch)
    if scheduler is None:
        from transformers import get_scheduler

        k = optimizer_steps_per_step
        warmup = cfg.warmup_steps * k if cfg.warmup_steps else math.ceil(cfg.warmup_ratio * total_steps * k)
        scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total_steps * k)
    return Optimization(optimizer=optimizer, scheduler=scheduler, total_steps=total_steps,
                        prompts_per_step=prompts_per_step)


@dataclass(frozen=True)
class Evaluation:
    """The eval set(s) and their evaluator; `make_evaluator` builds one for other eval sets
    (transformers' `Trainer.evaluate(eval_dataset)`)."""

    eval_dataset: Any
    evaluator: Any
    make_evaluator: Any


def build_evaluation(cfg: TrainingConfig, eval_dataset, *, tokenizer, task, reward_runner, multiturn,
                     processor) -> Evaluation:
    from grpokit.evaluation import build_evaluator

    def make_evaluator(dataset):  # one eval set or named ones (a DatasetDict is a dict); streams read whole
        if is_iterable_dataset(dataset):
            dataset = rows_of_stream(dataset, None, 1, 1)
        elif isinstance(dataset, dict):
            dataset = {name: rows_of_stream(ds, None, 1, 1) if is_iterable_dataset(ds) else ds
                       for name, ds in dataset.items()}
        return build_evaluator(dataset, tokenizer, task=task, reward_runner=reward_runner, config=cfg,
                               multiturn=multiturn, processor=processor)

    evaluator = make_evaluator(eval_dataset) if eval_dataset is not None else None
    if cfg.eval_strategy == "steps" and evaluator is None:
        raise ValueError("eval_strategy='steps' but there is nothing to evaluate on: pass eval_dataset= (or set "
                         "dataset_test_split, or use a built-in task), or set eval_strategy='no'.")
    return Evaluation(eval_dataset=eval_dataset, evaluator=evaluator, make_evaluator=make_evaluator)


def run_notes(cfg: TrainingConfig, *, multiturn, streamed: bool) -> list[str]:
    """The summary's notes on the set-up: the tools, TRL's warnings on the objective, the loader."""
    notes = [multiturn.describe()] if multiturn is not None else []
    for warning in cfg.objective_warnings():  # in the summary, and logged now (before step 1), as TRL warns
        notes.append(warning)
        logging.getLogger(__name__).warning(warning)
    if cfg.dataloader_num_workers and streamed:  # as TRL: a stream is read by one worker (groups stay whole)
        logging.getLogger(__name__).warning(f"a streaming train_dataset is read in order by one reader: "
                                            f"dataloader_num_workers={cfg.dataloader_num_workers} is not used.")
    elif cfg.dataloader_num_workers:
        notes.append(f"note: dataloader_num_workers={cfg.dataloader_num_workers} has nothing to parallelise here: every "
                     "prompt is tokenized before step 1 and read from memory.")
    return notes


# --------------------------------------------------------------------------------------------

def prompts_per_rank_step(cfg: TrainingConfig, rows_per_step_factor: int) -> int:
    """Prompts one rank samples per step: its completions per step over G, times the algorithm's factor."""
    completions = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return completions // cfg.num_generations * rows_per_step_factor


def _environment_placeholder(cfg: TrainingConfig, environment_factory, rows_per_step_factor: int):
    """TRL's environment-owned data: no train_dataset, reset() gives each prompt, max_steps the
    length; the rows are one step's worth of empty user turns."""
    import datasets

    if isinstance(environment_factory, dict):
        raise ValueError("A `dict` `environment_factory` (multiple environments) requires a `train_dataset` with an "
                         "`environment` column to route each example to its environment. Provide a dataset, or "
                         "pass a single environment factory.")
    if cfg.max_steps <= 0:
        raise ValueError("When training without a `train_dataset` (the environment owns the data and returns the "
                         "prompt from `reset()`), `max_steps` must be set to a positive value to define the training "
                         "length. Set it via `GRPOConfig(max_steps=...)`.")
    rows = max(1, prompts_per_rank_step(cfg, rows_per_step_factor))
    return datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": ""}]] * rows})


def _checked_quantization(quantization_config, model_ref, peft_config, cfg):
    """TRL's `quantization_config` (QLoRA): the model is loaded quantized here, so it must be a
    name; the quantized weights are frozen, so a LoRA adapter must be trained on them."""
    import importlib.util

    if not isinstance(model_ref, str):
        raise ValueError("quantization_config is applied when the model is loaded: pass the model's id or path, "
                         "not a loaded model (or quantize it yourself).")
    method = getattr(quantization_config, "quant_method", "")
    method = str(getattr(method, "value", method)).lower()
    if "bitsandbytes" in method and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("quantization_config (bitsandbytes) needs the bitsandbytes package and, for 4/8-bit "
                         "training, a CUDA GPU: pip install bitsandbytes.")
    if peft_config is None and not cfg.use_peft:
        raise ValueError("quantization_config: quantized weights cannot be trained; pass peft_config= (a LoRA "
                         "config) or use_peft=True to train an adapter on them (QLoRA).")
    return quantization_config


def is_iterable_dataset(ds) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(ds, datasets.IterableDataset)


def rows_of_stream(stream, cfg: TrainingConfig | None, rows_per_step_factor: int, world: int, updates_per_batch: int = 1):
    """A streaming `datasets.IterableDataset` as the rows the run reads, in stream order: for
    training the first `steps * prompts per step * ranks` (transformers' Trainer needs max_steps for
    a stream, so does this), for evaluation the whole stream."""
    from itertools import islice

    import datasets

    if cfg is None:
        rows = list(stream)
    else:
        if cfg.max_steps <= 0:
            raise ValueError("train_dataset is a streaming IterableDataset, whose length is unknown: set max_steps "
                             "(as transformers' Trainer requires).")
        prompts = prompts_per_rank_step(cfg, rows_per_step_factor)
        batches = math.ceil(cfg.max_steps / (max(cfg.update_passes(), 1) * updates_per_batch))
        rows = list(islice(iter(stream), batches * prompts * world))
    if not rows:
        raise ValueError("the streaming dataset yielded no rows.")
    return datasets.Dataset.from_list(rows)


def _total_steps(cfg: TrainingConfig, num_rows: int, global_prompts_per_step: int, updates_per_batch: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    rounds = math.ceil(cfg.num_train_epochs * num_rows / global_prompts_per_step)
    return max(1, rounds * cfg.update_passes() * updates_per_batch)


def _pick_dtype(cfg: TrainingConfig, device: torch.device, notes: list[str]) -> torch.dtype:
    if device.type == "cuda":
        if cfg.bf16 is False:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if cfg.bf16:
        notes.append("warning: bf16=True on CPU; this CPU has no bf16 matmul hardware, expect it to be very slow.")
        return torch.bfloat16
    return torch.float32
