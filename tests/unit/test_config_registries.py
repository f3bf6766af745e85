"""Every enumerated config field takes its allowed values from the module that reads it: adding an
entry to that registry makes the config accept it, and every value the owner has is accepted."""

import pytest

import grpokit.config as config
from grpokit.algos import advantages, dpo, kl, losses
from grpokit.baselines.dpo import DPOConfig
from grpokit.baselines.ppo import PPOConfig
from grpokit.config import GRPOConfig
from grpokit.distributed import STRATEGIES
from grpokit.rewards.runner import ON_ERROR
from grpokit.rollout import ENGINES
from grpokit.tracking import BACKENDS

# field -> (the owner's registry, a config class, an entry to register there)
REGISTRIES = {
    "loss_type": (losses.LOSS_TYPES, GRPOConfig, losses.LossType("clip", "dapo")),
    "kl_estimator": (kl.KL_ESTIMATORS, GRPOConfig, kl.kl_k1),
    "advantage_estimator": (advantages.ADVANTAGE_ESTIMATORS, GRPOConfig, advantages.grpo_centered),
    "rollout_engine": (ENGINES, GRPOConfig, ENGINES["hf"]),
}
# field -> (the owner's values, a config class)
CONSTANTS = {
    "scale_rewards": (advantages.SCALE_REWARDS, GRPOConfig),
    "importance_sampling_level": (losses.IMPORTANCE_SAMPLING_LEVELS, GRPOConfig),
    "vllm_importance_sampling_mode": ([f"{level}_{mode}" for level in losses.ROLLOUT_CORRECTION_LEVELS
                                       for mode in losses.ROLLOUT_CORRECTION_MODES], GRPOConfig),
    "multi_objective_aggregation": (config.MULTI_OBJECTIVE_AGGREGATIONS, GRPOConfig),
    "reward_on_error": (ON_ERROR, GRPOConfig),
    "distributed_strategy": (STRATEGIES, GRPOConfig),
    "lr_scheduler_type": (config.LR_SCHEDULER_TYPES, GRPOConfig),
    "optim": (config.OPTIMIZERS, GRPOConfig),
    "on_nonfinite": (config.ON_NONFINITE, GRPOConfig),
    "eval_strategy": (config.INTERVAL_STRATEGIES, GRPOConfig),
    "save_strategy": (config.INTERVAL_STRATEGIES, GRPOConfig),
}


@pytest.mark.parametrize("name", list(REGISTRIES))
def test_registering_an_entry_makes_the_config_accept_it(monkeypatch, name):
    registry, config_cls, entry = REGISTRIES[name]
    with pytest.raises(ValueError, match=f"{name}='added'"):
        config_cls(**{name: "added"})
    monkeypatch.setitem(registry, "added", entry)
    assert getattr(config_cls(**{name: "added"}), name) == "added"


def test_the_baselines_own_enumerated_fields_read_their_registries(monkeypatch):
    for config_cls, name, registry, entry in [(DPOConfig, "loss_type", dpo.DPO_LOSSES, dpo.sigmoid_loss),
                                              (PPOConfig, "kl_estimator", kl.KL_ESTIMATORS, kl.kl_k1)]:
        with pytest.raises(ValueError, match=f"{name}='added'"):
            config_cls(**{name: "added"})
        monkeypatch.setitem(registry, "added", entry)
        assert getattr(config_cls(**{name: "added"}), name) == "added"


@pytest.mark.parametrize("name", list(CONSTANTS))
def test_every_value_of_the_owner_is_accepted_and_no_other(name):
    values, config_cls = CONSTANTS[name]
    extra = {"eval_steps": 10} if name == "eval_strategy" else {}
    for value in values:
        assert getattr(config_cls(**{name: value}, **extra), name) == value
    with pytest.raises(ValueError, match=name):
        config_cls(**{name: "unheard_of"}, **extra)


def test_report_to_takes_the_trackers_backends_all_included():
    for value in BACKENDS:
        GRPOConfig(report_to=[value])
    assert GRPOConfig(report_to="all").report_to == ["all"]  # TRL's "all": every installed integration
    with pytest.raises(ValueError, match="report_to: 'mlflow' is not one of jsonl, none, all, tensorboard, wandb"):
        GRPOConfig(report_to=["mlflow"])
