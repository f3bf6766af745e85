"""Judges: rewards that rank a whole group (see docs/judges.md).

* `JudgeReward` (`judge`): listwise, one request ranks the group, shown in k orders;
* `PairwiseJudgeReward` (`pairwise_judge`): a Swiss or all-pairs tournament, Bradley-Terry fit;
* backends: an OpenAI-compatible server, a local Hugging Face model, a Python function;
* `ranking`: the pure arithmetic (ranks, Kendall tau, tournaments, Bradley-Terry).
"""

from grpokit.rewards.judges.backends import FunctionBackend, JudgeBackend, LocalBackend, OpenAIBackend, make_backend
from grpokit.rewards.judges.base import GroupJudge, JudgeFailed, Judgement
from grpokit.rewards.judges.listwise import JudgeReward
from grpokit.rewards.judges.pairwise import PairwiseJudgeReward

__all__ = ["JudgeReward", "PairwiseJudgeReward", "GroupJudge", "Judgement", "JudgeFailed", "JudgeBackend",
           "OpenAIBackend", "LocalBackend", "FunctionBackend", "make_backend"]
