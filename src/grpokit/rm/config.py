"""`RMConfig`: the settings of one reward-model training run (`grpokit rm train`), with TRL's names
where TRL has the knob (RewardConfig, ModelConfig's LoRA fields, TrainingArguments)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RMConfig"]

PAIRS = ("all", "best")
SCHEDULERS = ("linear", "cosine", "constant")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RMConfig:
    """One `grpokit rm train` run; every field is a command-line option (`key=value` or `--key value`)."""

    # --- data ---
    dataset_name: str | None = _f(None, "a feedback store (a run folder or its feedback.sqlite) or a TRL preference "
                                        "dataset (JSONL / JSON / Parquet file, a folder of them, or a hub id) with "
                                        "chosen, rejected and optionally prompt and margin (the positional DATA)")
    dataset_train_split: str = _f("train", "split of a dataset folder or hub dataset to read")
    pairs: str = _f("all", "from a store: all (each candidate over each one ranked below it) or best (the top "
                           "candidate(s) over each worse one); ties give no pair")
    eval_fraction: float = _f(0.2, "share of the prompts held out (by a stable hash of the prompt: the pairs of one "
                                   "prompt stay on one side); 0: none")

    # --- model ---
    model_name_or_path: str | None = _f(None, "a sequence classifier or a causal LM (a fresh 1-label score head, as "
                                              "TRL's RewardTrainer): hub id, folder, built-in name (--model)")
    tokenizer: str | None = _f(None, "the tokenizer (default: the model's own)")
    chat_template: str | None = _f(None, "a Jinja chat template for conversational rows (default: the tokenizer's)")
    dtype: str = _f("auto", "auto (float32 on CPU, bf16 on CUDA), float32, bfloat16")
    device: str = _f("auto", "auto (cuda if available), cpu, cuda, cuda:1")
    trust_remote_code: bool = _f(False, "let transformers run the model's own code")
    use_peft: bool = _f(False, "train LoRA adapters on the base and the whole score head; saved merged")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = _f(0.05, "LoRA dropout")
    lora_target_modules: Any = _f(None, "modules with LoRA: a list of names or all-linear (default: peft's per model "
                                        "type, e.g. q_proj, v_proj)")
    disable_dropout: bool = _f(True, "dropout off in the model (TRL's RewardConfig default)")

    # --- loss and optimisation ---
    center_rewards_coefficient: float | None = _f(None, "TRL's: adds coef * mean((r_chosen + r_rejected)^2), "
                                                        "keeping the rewards centred on 0 (e.g. 0.01)")
    learning_rate: float = _f(1e-4, "AdamW learning rate (TRL's RewardConfig default)")
    lr_scheduler_type: str = _f("linear", "linear (to 0), cosine or constant, after warmup")
    warmup_ratio: float = _f(0.0, "share of the steps warming the learning rate up from 0")
    weight_decay: float = _f(0.0, "AdamW weight decay (not on biases and norms)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: none)")
    num_train_epochs: float = _f(3.0, "passes over the training pairs")
    max_steps: int = _f(-1, "optimizer steps; > 0 overrides num_train_epochs")
    per_device_train_batch_size: int = _f(8, "pairs per step (chosen and rejected in one forward pass)")
    per_device_eval_batch_size: int = _f(32, "sequences per forward pass when scoring the held-out pairs")
    max_length: int | None = _f(1024, "tokens per prompt + completion, cut on the left (the end is kept)")
    seed: int = _f(42, "seed of the score head, LoRA, the order of the pairs")

    # --- output ---
    output_dir: str | None = _f(None, "where the model, tokenizer and metrics.json go (default: <run "
                                      "folder>/reward_model for a store, runs/reward_model for a dataset)")
    logging_steps: int = _f(10, "steps between the progress bar's loss updates")
    disable_tqdm: bool = _f(False, "hide the progress bar")

    def __post_init__(self) -> None:
        for name in ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm", "num_train_epochs",
                     "eval_fraction", "lora_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        for name in ("lora_r", "lora_alpha", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "seed", "logging_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs={self.pairs!r}: use all or best")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction is a share of the prompts in [0, 1), got {self.eval_fraction}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ValueError(f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set num_train_epochs > 0 or max_steps > 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 2):
            raise ValueError(f"max_length must be an integer >= 2 or None, got {self.max_length!r}")
        if self.center_rewards_coefficient is not None:
            if isinstance(self.center_rewards_coefficient, bool) or \
                    not isinstance(self.center_rewards_coefficient, (int, float)) or self.center_rewards_coefficient < 0:
                raise ValueError(f"center_rewards_coefficient must be a number >= 0 or None, "
                                 f"got {self.center_rewards_coefficient!r}")
            self.center_rewards_coefficient = float(self.center_rewards_coefficient)
        if isinstance(self.lora_target_modules, str) and self.lora_target_modules != "all-linear":
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RMConfig:
        """RMConfig(**values), but an unknown key is an error naming the valid ones (a typo would
        otherwise be silent)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise ValueError(f"unknown rm train option(s) {unknown}; valid: {', '.join(names)} "
                             "(grpokit rm train --help)")
        return cls(**values)

    @classmethod
    def help_rows(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) of every field, for `grpokit rm train --help`."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]
