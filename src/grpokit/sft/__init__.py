"""Supervised warm-start (`grpokit sft`), used to make the shipped starter model.

    from grpokit.sft import SFTConfig, run_sft
"""

from grpokit.sft.config import SFTConfig
from grpokit.sft.trainer import run_sft

__all__ = ["SFTConfig", "run_sft"]
