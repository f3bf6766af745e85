"""grpokit: GRPO (Group Relative Policy Optimization) for language models.

The heavy pieces are imported lazily so that `import grpokit` stays fast and `grpokit.algos`
can be used on its own.
"""

__version__ = "0.1.0"

__all__ = ["GRPOConfig", "GRPOTrainer", "__version__"]


def __getattr__(name):
    if name == "GRPOConfig":
        from grpokit.config import GRPOConfig

        return GRPOConfig
    if name == "GRPOTrainer":
        from grpokit.trainer import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(f"module 'grpokit' has no attribute {name!r}")
