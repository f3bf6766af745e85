"""Reward models from preferences (`grpokit rm train`): a sequence classifier trained with the
Bradley-Terry loss on the pairs people's rankings imply (a feedback store) or on a TRL preference
dataset; it plugs into `reward_funcs` by its path (docs/human-feedback.md).

    from grpokit.rm import RMConfig, train_reward_model
    result = train_reward_model(RMConfig(dataset_name="runs/dialogue_human", model_name_or_path="..."))

* `config`: RMConfig, the settings (TRL's names);
* `data`: the pairs from a store or a dataset, and the held-out split by prompt;
* `trainer`: the model, the loss, the loop, the held-out accuracy, the saved model.
"""

from grpokit.rm.config import RMConfig
from grpokit.rm.data import PreferencePair, load_preference_pairs, split_pairs
from grpokit.rm.trainer import RMResult, train_reward_model

__all__ = ["PreferencePair", "RMConfig", "RMResult", "load_preference_pairs", "split_pairs", "train_reward_model"]
