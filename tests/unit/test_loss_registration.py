"""A loss owns its knobs: a loss type's registration (its objective's factory, its aggregation's
entry) names the config fields it reads; make_policy_loss binds exactly those, the config reads
its allowed values from the registry, and the baselines refuse every GRPO loss knob."""

import dataclasses
import math
import re

import pytest
import torch

from grpokit.algos import AGGREGATIONS, LOSS_TYPES, POLICY_LOSSES, is_local_mean, make_policy_loss, policy_loss_fields
from grpokit.algos.losses import Aggregation, LossType, aggregate_bnpo, policy_loss_knobs, shared_knobs
from grpokit.baselines.dpo import DPOConfig
from grpokit.baselines.ppo import PPOConfig
from grpokit.config import GRPOConfig, TrainingConfig, grpo_only_fields

SHARED = ("importance_sampling_level", "beta", "kl_estimator", "use_bias_correction_kl", "off_policy_mask_threshold")


def capped_loss(*, epsilon: float = 0.2):
    """A one-knob objective for the tests: l = -min(r, 1 + epsilon) * A."""
    def objective(ratio, logps, advantages, **context):
        return -torch.clamp(ratio, max=1 + epsilon) * advantages, {}

    return objective


@pytest.fixture
def capped(monkeypatch):
    """The loss type "capped": objective capped_loss (knob: epsilon), a local token mean."""
    monkeypatch.setitem(POLICY_LOSSES, "capped", capped_loss)
    monkeypatch.setitem(AGGREGATIONS, "token_mean", Aggregation(aggregate_bnpo, local_mean=True))
    monkeypatch.setitem(LOSS_TYPES, "capped", LossType("capped", "token_mean"))
    return "capped"


def test_each_loss_type_declares_the_fields_it_reads():
    assert shared_knobs() == SHARED
    assert policy_loss_fields("dapo") == SHARED + ("epsilon", "epsilon_high", "delta", "dual_clip")
    assert policy_loss_fields("dr_grpo") == policy_loss_fields("dapo") + ("max_completion_length",)
    assert policy_loss_fields("cispo") == SHARED + ("epsilon", "epsilon_high")
    assert policy_loss_fields("sapo") == SHARED + ("sapo_temperature_pos", "sapo_temperature_neg")
    assert policy_loss_fields("vespo") == SHARED + ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    # every knob is a GRPOConfig field: GRPO builds its objective from the config by these names
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(policy_loss_knobs()) <= fields


def test_a_registered_loss_is_built_with_only_its_own_knobs(capped):
    assert policy_loss_fields(capped) == SHARED + ("epsilon",)
    # one token, log ratio 0.5: r = e^0.5 = 1.6487 is capped at 1 + 0.1, so l = -1.1 * A = -2.2 for A = 2
    loss, stats = make_policy_loss(capped, epsilon=0.1)(torch.tensor([[-1.0]]), torch.tensor([[-1.5]]),
                                                        torch.tensor([2.0]), torch.ones(1, 1))
    assert float(loss) == pytest.approx(-2.2) and float(stats["ratio_mean"]) == pytest.approx(math.exp(0.5))
    # a knob of another loss type is an error naming it, and the loss type that has it
    with pytest.raises(ValueError, match=r"loss_type='capped' does not read delta \(a knob of grpo\); its knobs are "
                                         r"importance_sampling_level, .*, epsilon\."):
        make_policy_loss(capped, epsilon=0.1, delta=1.5)
    with pytest.raises(ValueError, match=r"unknown knob epsilonn \(did you mean epsilon\?\)"):
        make_policy_loss(capped, epsilonn=0.1)


def test_the_config_accepts_a_registered_loss_type_and_grpo_binds_its_fields_from_it(capped):
    with pytest.raises(ValueError, match="loss_type='nope': use one of grpo, bnpo, .*, capped"):
        GRPOConfig(loss_type="nope")
    cfg = GRPOConfig(loss_type=capped, epsilon=0.1, sapo_temperature_pos=3.0)
    # as GRPO.__init__ builds its objective: the fields the loss type reads, no list of knobs
    objective = make_policy_loss(cfg.loss_type, **{f: getattr(cfg, f) for f in policy_loss_fields(cfg.loss_type)})
    loss, _ = objective(torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), torch.tensor([2.0]), torch.ones(1, 1))
    assert float(loss) == pytest.approx(-2.2)
    # a local mean by its aggregation's entry: token_budget (micro-batches cut by tokens) is refused
    assert is_local_mean(capped)
    with pytest.raises(ValueError, match="token_budget with loss_type='capped'.*use dr_grpo, dapo, cispo, vespo"):
        GRPOConfig(loss_type=capped, token_budget=64)


def test_is_local_mean_reads_the_aggregations_entry():
    assert {t for t in LOSS_TYPES if is_local_mean(t)} == {"grpo", "bnpo", "sapo", "luspo"}
    for loss_type, (_, aggregation) in LOSS_TYPES.items():
        assert is_local_mean(loss_type) is AGGREGATIONS[aggregation].local_mean


def test_grpo_only_fields_are_the_loss_knobs_and_the_step_fields():
    common = {f.name for f in dataclasses.fields(TrainingConfig)}
    grpo_own = {f.name for f in dataclasses.fields(GRPOConfig)} - common
    assert set(grpo_only_fields()) == grpo_own
    assert {"loss_type", *(set(policy_loss_knobs()) - common)} <= set(grpo_only_fields())
    assert "max_completion_length" in policy_loss_knobs() and "max_completion_length" in common


@pytest.mark.parametrize("config_cls, own", [(PPOConfig, {"kl_estimator"}), (DPOConfig, {"beta", "loss_type"})])
def test_a_baseline_refuses_every_grpo_knob_it_does_not_own(config_cls, own):
    assert issubclass(config_cls, TrainingConfig) and not issubclass(config_cls, GRPOConfig)
    refused = set(config_cls.refused_grpo_fields())
    common = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert refused == set(grpo_only_fields()) - own
    assert set(policy_loss_knobs()) - common - own <= refused
    assert set(config_cls.EQUIVALENTS) <= refused  # a hint only for a refused knob
    algo = config_cls.__name__.removesuffix("Config")
    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    for name in sorted(refused):
        config_cls(**{name: defaults[name]})  # GRPO's default: accepted (a TRL or GRPO config moves over)
        off = {bool: lambda v: not v, str: lambda v: v + "x", type(None): lambda v: 3.0}.get(type(defaults[name]),
                                                                                            lambda v: v + 1)
        hint = re.escape(config_cls.EQUIVALENTS.get(name, f"not used by {algo}."))
        with pytest.raises(ValueError, match=f"{config_cls.__name__}: {name}=.* is a GRPO setting that {algo} "
                                             f"does not use; {hint}"):
            config_cls(**{name: off(defaults[name])})
        assert name not in config_cls().to_dict()


def test_a_baseline_declares_its_own_fields_and_the_core_asks_its_config_not_grpo_fields():
    ppo, dpo = PPOConfig(num_ppo_epochs=2), DPOConfig(loss_type="ipo", beta=0.2)
    assert (ppo.num_ppo_epochs, ppo.kl_estimator, ppo.disable_dropout) == (2, "k1", True)
    assert (dpo.loss_type, dpo.beta, dpo.label_smoothing) == ("ipo", 0.2, 0.0)
    assert {"num_ppo_epochs", "kl_coef", "kl_estimator"} <= set(ppo.to_dict())
    assert {"beta", "loss_type", "label_smoothing"} <= set(dpo.to_dict()) and "epsilon" not in dpo.to_dict()
    # the shared core asks a config what it needs; a baseline's has no GRPO fields to read
    for cfg in (ppo, dpo):
        assert (cfg.update_passes(), cfg.reuses_generation(), cfg.per_micro_batch_terms(), cfg.syncs_reference(),
                cfg.corrects_sampler(), cfg.objective_warnings()) == (1, False, False, False, False, [])
        assert not hasattr(cfg, "epsilon") and not hasattr(cfg, "num_iterations") and not hasattr(cfg, "sync_ref_model")
    assert not hasattr(ppo, "beta") and not ppo.penalises_reference() and ppo.loss_is_local_mean() is False
    assert "lr=" in dpo.objective_summary()
    with pytest.raises(ValueError, match="DPOConfig: loss_type='dapo': use one of ipo, sigmoid"):
        DPOConfig(loss_type="dapo")
    with pytest.raises(ValueError, match="PPOConfig: kl_estimator='k4': use one of k1, k2, k3"):
        PPOConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match="PPOConfig: unknown field 'vf_coeff'. Did you mean vf_coef"):
        PPOConfig(vf_coeff=0.5)
    with pytest.raises(ValueError, match="DPOConfig: push_to_hub=True is a TRL setting"):
        DPOConfig(push_to_hub=True)
