"""The settings of `grpokit compare`: what the three runs share, each algorithm's own knobs, and
the comparison's options."""

from __future__ import annotations

from typing import Any

from grpokit.baselines import ALGOS
from grpokit.config_file import DEMO_DEFAULTS

# Shared by the three runs: the demo's task, model, sampling and optimizer settings (`grpokit train`
# with no arguments: the built-in arithmetic task on the shipped starter model, on CPU), with a
# held-out evaluation every 20 steps and no checkpoints.
_FROM_DEMO = ("task", "use_cpu", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
              "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "max_steps")
COMPARE_DEFAULTS: dict[str, Any] = {
    **{k: DEMO_DEFAULTS[k] for k in _FROM_DEMO if k in DEMO_DEFAULTS},
    "eval_strategy": "steps",
    "eval_steps": 20,
    "eval_on_start": True,
    "task_num_eval": 200,
    "save_strategy": "no",
    "logging_steps": 10,
    "log_completions": False,
    "disable_tqdm": True,
    "plot": False,
    "seed": 42,
}

# Each algorithm's own knobs, at TRL's defaults (GRPO's are GRPOConfig's: beta=0, one update per batch).
ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "ppo": {"num_ppo_epochs": 4, "num_mini_batches": 1, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1,
            "kl_coef": 0.05, "gamma": 1.0, "lam": 0.95},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid"},
}

OPTIONS = {"algos": list(ALGOS), "seeds": [42], "output_dir": "runs/compare",
           "report_dir": "reports/compare", "torch_num_threads": 1, "isolate": True, "report_only": False}
"""The report counts the samples and training time each run needed to first reach this held-out accuracy."""
