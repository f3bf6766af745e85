"""grpokit: GRPO (Group Relative Policy Optimization) for language models.

The heavy pieces are imported lazily so that `import grpokit` stays fast and `grpokit.algos`
can be used on its own.
"""

__version__ = "0.1.0"

__all__ = ["AsyncGRPOConfig", "AsyncGRPOTrainer", "DPOConfig", "DPOTrainer", "GRPOConfig", "GRPOTrainer", "PPOConfig",
           "PPOTrainer", "__version__"]

_LAZY = {
    "GRPOConfig": "grpokit.config", "GRPOTrainer": "grpokit.trainer",
    # TRL's asynchronous GRPO (trl.experimental.async_grpo): generation overlapped with training
    "AsyncGRPOConfig": "grpokit.config", "AsyncGRPOTrainer": "grpokit.trainer",
    # TRL's other online trainers of the family, as `from trl import PPOTrainer, DPOTrainer`
    "PPOConfig": "grpokit.baselines.ppo", "PPOTrainer": "grpokit.baselines.ppo",
    "DPOConfig": "grpokit.baselines.dpo", "DPOTrainer": "grpokit.baselines.dpo",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
