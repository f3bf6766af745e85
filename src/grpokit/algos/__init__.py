"""grpokit.algos: the GRPO objective and its family as pure tensor functions.

No config objects, no ``.item()``, no distributed calls: every knob is an explicit keyword
argument with TRL's name and meaning. See ``docs/objective.md`` for the formulas.
"""

from grpokit.algos.advantages import (ADVANTAGE_ESTIMATORS, batch_normalized, group_advantages, groups_with_signal,
                                      normalize_then_sum)
from grpokit.algos.kl import KL_ESTIMATORS, kl_penalty
from grpokit.algos.logprobs import (chunked_logprobs, entropy_bonus, entropy_from_logits, selective_log_softmax,
                                    top_entropy_mask)
from grpokit.algos.losses import (
    AGGREGATIONS,
    LOSS_TYPES,
    POLICY_LOSSES,
    aggregate_loss,
    is_local_mean,
    make_policy_loss,
    off_policy_keep,
    policy_loss,
    policy_loss_fields,
    rollout_correction_weights,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "POLICY_LOSSES",
    "aggregate_loss",
    "batch_normalized",
    "entropy_bonus",
    "is_local_mean",
    "normalize_then_sum",
    "off_policy_keep",
    "make_policy_loss",
    "policy_loss_fields",
    "chunked_logprobs",
    "entropy_from_logits",
    "group_advantages",
    "groups_with_signal",
    "kl_penalty",
    "policy_loss",
    "rollout_correction_weights",
    "selective_log_softmax",
    "top_entropy_mask",
]

# PPO (RLHF recipe) and preference losses (DPO / IPO): the baselines of `grpokit compare`.
from grpokit.algos.dpo import DPO_AVERAGE_LOGPS, DPO_LOSSES, best_worst_pairs, dpo_loss, sequence_logps  # noqa: E402
from grpokit.algos.ppo import (  # noqa: E402
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    masked_mean,
    masked_whiten,
    ppo_token_rewards,
)

__all__ += [
    "DPO_AVERAGE_LOGPS",
    "DPO_LOSSES",
    "best_worst_pairs",
    "clipped_value_loss",
    "dpo_loss",
    "explained_variance",
    "gae_advantages",
    "masked_mean",
    "masked_whiten",
    "ppo_token_rewards",
    "sequence_logps",
]
