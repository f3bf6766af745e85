"""`grpokit rm train`: a Bradley-Terry reward model from preference pairs, in one plain PyTorch
loop, readable top to bottom:

1. pairs (grpokit.rm.data): from a feedback store or a TRL preference dataset, split by a hash of
   the prompt into training and held-out pairs;
2. the model: `AutoModelForSequenceClassification` with one label; a causal LM checkpoint gets a
   fresh score head (TRL's RewardTrainer does the same); the tokenizer with a pad token, left
   truncation and right padding; LoRA (`use_peft`) on the base with the whole score head trained;
3. each side of a pair rendered and tokenized exactly as `RewardModelReward` scores at GRPO time
   (`render_reward_input` / `encode_reward_inputs`: the chat template for conversations, prompt +
   completion for text), so the model is trained on what it will see;
4. the loss: -log sigmoid(r_chosen - r_rejected [- margin]) (TRL's RewardTrainer), plus
   `center_rewards_coefficient` * mean((r_chosen + r_rejected)^2) when set; AdamW with warmup and
   decay, gradient clipping; chosen and rejected of a batch in one forward pass;
5. the held-out pairwise accuracy (the share of held-out pairs with r_chosen > r_rejected) before
   and after training, printed one line each;
6. saved to `output_dir` as a plain classifier (LoRA merged) with its tokenizer, `metrics.json`,
   `rm_config.json` and `heldout.jsonl` (each held-out pair with the saved model's two scores):
   `reward_funcs: [output_dir]` scores with it, as TRL takes reward models.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.modeling.info import unwrap
from grpokit.rewards.model import (encode_reward_inputs, prepare_reward_tokenizer, render_reward_input,
                                     reward_logits, score_token_ids)
from grpokit.rewards.text import is_conversational
from grpokit.rm.config import RMConfig
from grpokit.rm.data import PreferencePair, load_preference_pairs, prompt_key, split_pairs

__all__ = ["RMResult", "bradley_terry_loss", "load_reward_model", "pairwise_accuracy", "score_sequences",
           "train_reward_model"]


@dataclass
class RMResult:
    """What `train_reward_model` made: where it saved the model, its metrics (metrics.json), and the
    held-out pairs with the saved model's scores (r_chosen, r_rejected), as `reward_funcs` gives them."""

    output_dir: Path
    metrics: dict[str, Any]
    heldout: list[PreferencePair]
    heldout_scores: list[tuple[float, float]]


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def load_reward_model(name: str, dtype: torch.dtype, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(an AutoModelForSequenceClassification with one label, how its head came about). A causal LM
    (or a classifier with another number of labels) gets a fresh score head; a one-label classifier
    keeps its own. Built-in names and .gguf files load dequantized (grpokit.modeling.known)."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from grpokit.modeling.known import dequantizing, drop_quantization_config, resolve_model

    path = str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    folder, extra = resolve_model(path)
    kwargs: dict[str, Any] = dequantizing(extra)  # a GGUF file: a plain dense model
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"cannot load the model {name!r}: {first}") from e
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_classifier and config.num_labels == 1:
        head = "its own score head"
    elif is_classifier:
        head = f"a fresh score head (its {config.num_labels}-label head replaced)"
        kwargs["ignore_mismatched_sizes"] = True
    else:
        head = "a fresh score head"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the fresh head's load report: said in one line instead
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, num_labels=1, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load {name!r} as a sequence classifier: {first}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    drop_quantization_config(model)
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    return model, head


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _lora(model, cfg: RMConfig):
    """LoRA adapters on the base model; the score head trained whole (peft's SEQ_CLS task keeps it
    in modules_to_save)."""
    import warnings

    from grpokit.models import apply_lora

    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return apply_lora(model, {"task_type": "SEQ_CLS", "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
                                  "lora_dropout": cfg.lora_dropout, "target_modules": cfg.lora_target_modules})


# --------------------------------------------------------------------------------------------
# scoring and the loss
# --------------------------------------------------------------------------------------------


def score_sequences(model, tokenizer, seqs: Sequence[list[int]], batch_size: int, device: torch.device) -> list[float]:
    """The model's reward (logit 0) of each token sequence, as RewardModelReward scores
    (`rewards.model.score_token_ids`)."""
    return score_token_ids(model, tokenizer, seqs, batch_size, device)


def pairwise_accuracy(scores: Sequence[tuple[float, float]]) -> float | None:
    """The share of pairs with r_chosen > r_rejected (a tie counts as wrong); None without pairs."""
    return sum(c > r for c, r in scores) / len(scores) if scores else None


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """TRL's RewardTrainer loss: mean of -log sigmoid(r_chosen - r_rejected - margin), plus
    center_rewards_coefficient * mean((r_chosen + r_rejected)^2) when set."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -torch.nn.functional.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class _Encoded:
    chosen: list[int]
    rejected: list[int]
    margin: float | None


def _encode(pairs: Sequence[PreferencePair], tokenizer, max_length: int) -> list[_Encoded]:
    texts = []
    for p in pairs:
        texts += [render_reward_input(tokenizer, p.prompt, p.chosen), render_reward_input(tokenizer, p.prompt, p.rejected)]
    ids = encode_reward_inputs(tokenizer, texts, max_length)
    return [_Encoded(ids[2 * k], ids[2 * k + 1], p.margin) for k, p in enumerate(pairs)]


def _score_pairs(model, tokenizer, encoded: Sequence[_Encoded], batch_size: int,
                 device: torch.device) -> list[tuple[float, float]]:
    flat = score_sequences(model, tokenizer, [s for e in encoded for s in (e.chosen, e.rejected)], batch_size, device)
    return [(flat[2 * k], flat[2 * k + 1]) for k in range(len(encoded))]


def _accuracy_line(when: str, scores: Sequence[tuple[float, float]], prompts: int) -> str:
    acc = pairwise_accuracy(scores)
    if acc is None:
        return f"held-out pairwise accuracy {when} training: - (no held-out pairs)"
    return f"held-out pairwise accuracy {when} training: {acc:.3f} ({len(scores)} pairs, {prompts} prompts)"


def _default_output_dir(cfg: RMConfig, kind: str, source: str) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser()
    return Path(source).parent / "reward_model" if kind == "store" else Path("runs") / "reward_model"


def train_reward_model(cfg: RMConfig | dict[str, Any]) -> RMResult:
    """Train a reward model on preference pairs and save it (see the module docstring) -> RMResult."""
    from transformers import get_scheduler

    from grpokit.models import load_tokenizer, resolve_device, resolve_dtype, save_model

    if isinstance(cfg, dict):
        cfg = RMConfig.from_dict(cfg)
    if not cfg.model_name_or_path:
        raise ValueError("give the model: model_name_or_path=... (--model), a sequence classifier or a causal LM "
                         "(hub id, folder, or a built-in name such as smollm2-135m-instruct)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()

    # 1. the pairs, split by prompt
    data = load_preference_pairs(cfg.dataset_name, pairs=cfg.pairs, split=cfg.dataset_train_split)
    train, heldout = split_pairs(data.pairs, cfg.eval_fraction)
    train_prompts, heldout_prompts = len({prompt_key(p) for p in train}), len({prompt_key(p) for p in heldout})
    if not train:
        raise ValueError(f"all {len(data.pairs)} pairs ({heldout_prompts} prompts) fell in the held-out split; "
                         "lower eval_fraction or add prompts")
    out_dir = _default_output_dir(cfg, data.kind, data.source)

    # 2. the model and its tokenizer
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = prepare_reward_tokenizer(load_tokenizer(cfg.tokenizer or cfg.model_name_or_path, padding_side="right",
                                                        trust_remote_code=cfg.trust_remote_code))
    if cfg.chat_template is not None:
        tokenizer.chat_template = cfg.chat_template
    model, head = load_reward_model(cfg.model_name_or_path, dtype, cfg.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier pools at the last non-pad token
    model.to(device)
    if cfg.disable_dropout:
        _disable_dropout(model)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    max_length = min(x for x in (cfg.max_length, limit, 10 ** 9) if x)

    # 3. the pairs as the reward will see them
    if not getattr(tokenizer, "chat_template", None) and any(
            is_conversational(p.prompt) or is_conversational(p.chosen) for p in data.pairs):
        raise ValueError(f"the pairs are conversations but the tokenizer of {cfg.tokenizer or cfg.model_name_or_path} "
                         "has no chat template; pass chat_template=... (a Jinja string)")
    train_enc, heldout_enc = _encode(train, tokenizer, max_length), _encode(heldout, tokenizer, max_length)
    if cfg.use_peft:
        model = _lora(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = sum(p.numel() for p in trainable)
    steps_per_epoch = math.ceil(len(train_enc) / cfg.per_device_train_batch_size)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total_steps)
    mode = (f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {_lora_targets(model)} + the score head"
            if cfg.use_peft else "full fine-tuning")
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"rm train: {len(data.pairs)} pairs from {data.summary}\n"
          f"  {len(train)} training pairs ({train_prompts} prompts), {len(heldout)} held out ({heldout_prompts} "
          f"prompts, eval_fraction {cfg.eval_fraction:g}, by a hash of the prompt)\n"
          f"  model {cfg.model_name_or_path} ({type(unwrap(model)).__name__}, {head}), {mode}: "
          f"{num_trainable / 1e6:.3g}M of {num_params / 1e6:.3g}M parameters trained, {dtype_name}, {device}\n"
          f"  {total_steps} steps of {cfg.per_device_train_batch_size} pairs "
          f"({total_steps * cfg.per_device_train_batch_size / len(train_enc):.2f} epochs), lr {cfg.learning_rate:g} "
          f"{cfg.lr_scheduler_type}, max_length {max_length}", flush=True)

    # 5a. before training
    before = _score_pairs(model, tokenizer, heldout_enc, cfg.per_device_eval_batch_size, device)
    print(_accuracy_line("before", before, heldout_prompts), flush=True)

    # 4. the loop
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    batches = _batches(len(train_enc), cfg.per_device_train_batch_size, torch.Generator().manual_seed(cfg.seed))
    losses: list[float] = []
    window_loss: list[float] = []
    window_acc: list[float] = []
    bar = _progress(total_steps, cfg.disable_tqdm)
    model.train()
    train_start = time.perf_counter()
    for step in range(total_steps):
        batch = [train_enc[i] for i in next(batches)]
        rewards = reward_logits(model, tokenizer, [e.chosen for e in batch] + [e.rejected for e in batch], device)
        chosen, rejected = rewards[:len(batch)], rewards[len(batch):]
        margin = None
        if any(e.margin is not None for e in batch):
            margin = torch.tensor([e.margin or 0.0 for e in batch], dtype=rewards.dtype, device=rewards.device)
        loss = bradley_terry_loss(chosen, rejected, margin, cfg.center_rewards_coefficient)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        window_loss.append(losses[-1])
        window_acc.append((chosen > rejected).float().mean().item())
        if bar is not None:
            bar.update(1)
            if (step + 1) % cfg.logging_steps == 0 or step + 1 == total_steps:
                bar.set_postfix_str(f"loss {sum(window_loss) / len(window_loss):.4f}, "
                                    f"train acc {sum(window_acc) / len(window_acc):.3f}")
                window_loss, window_acc = [], []
    if bar is not None:
        bar.close()
    train_runtime = time.perf_counter() - train_start

    # 6a. the model that is saved: LoRA merged into a plain classifier
    if cfg.use_peft:
        model = model.merge_and_unload()
    model.eval()

    # 5b. after training, on the saved model
    after = _score_pairs(model, tokenizer, heldout_enc, cfg.per_device_eval_batch_size, device)
    print(_accuracy_line("after", after, heldout_prompts), flush=True)

    # 6b. save
    save_model(model, tokenizer, out_dir)
    last = losses[-cfg.logging_steps:]
    metrics: dict[str, Any] = {
        "source": data.source, "source_kind": data.kind, "pairs": len(data.pairs),
        "train_pairs": len(train), "heldout_pairs": len(heldout), "train_prompts": train_prompts,
        "heldout_prompts": heldout_prompts, "model": cfg.model_name_or_path, "head": head,
        "peft": bool(cfg.use_peft), "num_params": num_params, "num_trainable": num_trainable,
        "train_steps": total_steps, "first_loss": losses[0], "final_loss": sum(last) / len(last),
        "heldout_accuracy_before": pairwise_accuracy(before), "heldout_accuracy_after": pairwise_accuracy(after),
        "heldout_mean_margin_after": (sum(c - r for c, r in after) / len(after)) if after else None,
        "train_runtime_s": round(train_runtime, 2), "runtime_s": round(time.perf_counter() - started, 2),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out_dir / "rm_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
    with (out_dir / "heldout.jsonl").open("w", encoding="utf-8") as f:  # what the model gets right and wrong
        for pair, (c, r) in zip(heldout, after):
            f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                                "score_chosen": c, "score_rejected": r}, ensure_ascii=False, default=str) + "\n")
    print(f"saved to {out_dir} (metrics.json, heldout.jsonl); score with it: reward_funcs: [{out_dir}]", flush=True)
    return RMResult(out_dir, metrics, heldout, after)


def _batches(n: int, batch_size: int, rng: torch.Generator):
    """Indices of the training pairs, batch by batch: epoch after epoch, each shuffled, its last batch smaller."""
    while True:
        order = torch.randperm(n, generator=rng).tolist()
        for start in range(0, n, batch_size):
            yield order[start:start + batch_size]


def _lora_targets(model) -> str:
    config = getattr(model, "peft_config", {}).get("default")
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        return targets
    return ", ".join(sorted({t.rpartition(".")[2] for t in targets})) if targets else "peft's default modules"


def _progress(total: int, disabled: bool):
    if disabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="rm train", unit="step", dynamic_ncols=True)
