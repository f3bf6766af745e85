"""The baselines GRPO is compared with, on the same loop: PPO (value head, GAE) and DPO/IPO.

    from grpokit.baselines.ppo import PPOConfig, PPOTrainer
    from grpokit.baselines.dpo import DPOConfig, DPOTrainer
"""

ALGOS = ("grpo", "ppo", "dpo")


def algo_classes(algo: str) -> tuple[type, type]:
    """`grpokit train --algo grpo|ppo|dpo` -> (config class, trainer class)."""
    if algo == "grpo":
        from grpokit.config import GRPOConfig
        from grpokit.trainer import GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if algo == "ppo":
        from grpokit.baselines.ppo import PPOConfig, PPOTrainer

        return PPOConfig, PPOTrainer
    if algo == "dpo":
        from grpokit.baselines.dpo import DPOConfig, DPOTrainer

        return DPOConfig, DPOTrainer
    raise ValueError(f"algo={algo!r}: use one of {', '.join(ALGOS)}.")
