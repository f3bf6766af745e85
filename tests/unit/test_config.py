"""GRPOConfig: TRL names, clear errors for unsupported/unknown fields, validation before step 1."""

import pytest

from grpokit.config import UNSUPPORTED_TRL_FIELDS, GRPOConfig


def test_defaults_follow_trl():
    c = GRPOConfig()
    assert (c.loss_type, c.beta, c.epsilon, c.scale_rewards, c.num_generations) == ("dapo", 0.0, 0.2, "group", 8)
    assert c.epsilon_high is None and c.num_iterations == 1 and c.temperature == 1.0


def test_trl_field_that_is_off_is_accepted_and_on_is_an_error():
    GRPOConfig(push_to_hub=False, fp16=False, repetition_penalty=1.0, generation_batch_size=None)
    with pytest.raises(ValueError, match="push_to_hub=True is a TRL setting that grpokit does not support"):
        GRPOConfig(push_to_hub=True)
    with pytest.raises(ValueError, match="use_liger_kernel=True is a TRL setting"):
        GRPOConfig(use_liger_kernel=True)
    with pytest.raises(ValueError, match="steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2"):
        GRPOConfig(steps_per_generation=3, gradient_accumulation_steps=2, per_device_train_batch_size=4)


def test_bool_is_not_taken_for_a_number():
    # dataloader_num_workers=0 is "off"; False must not pass as 0 silently, nor True as 1
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        GRPOConfig(dataloader_num_workers=True)


def test_unknown_field_suggests_the_closest_names():
    with pytest.raises(ValueError, match="unknown field 'learnig_rate'.*learning_rate"):
        GRPOConfig(learnig_rate=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(per_device_train_batch_size=6), "multiple of num_generations=8"),
    (dict(num_generations=1), "at least 2"),
    (dict(loss_type="ppo"), "loss_type='ppo'"),
    (dict(scale_rewards="median"), "scale_rewards='median'"),
    (dict(top_p=0.0), "top_p"),
    (dict(delta=0.5), "delta"),
    (dict(eval_strategy="steps"), "eval_steps"),
    (dict(report_to=["mlflow"]), "mlflow"),
    (dict(reward_funcs=["a", "b"], reward_weights=[1.0]), "reward_weights has 1 values for 2"),
    (dict(kl_estimator="k4"), "kl_estimator"),
])
def test_invalid_values_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**bad)


def test_trl_boolean_scale_rewards_and_string_report_to_are_normalised():
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(report_to="none").report_to == []
    assert GRPOConfig(report_to="tensorboard").report_to == ["tensorboard"]


def test_round_trip_and_replace():
    c = GRPOConfig(learning_rate=1e-5, reward_funcs=["accuracy"])
    assert GRPOConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    d = c.replace(epsilon=0.3)
    assert d.epsilon == 0.3 and d.learning_rate == 1e-5 and c.epsilon == 0.2


def test_unsupported_list_does_not_shadow_supported_fields():
    supported = set(GRPOConfig().to_dict())
    assert not supported & set(UNSUPPORTED_TRL_FIELDS)


def test_yaml_style_number_strings_become_numbers():
    assert GRPOConfig(learning_rate="1e-5").learning_rate == 1e-5
    with pytest.raises(ValueError, match="learning_rate='fast' is not a number"):
        GRPOConfig(learning_rate="fast")


def test_yaml_no_means_the_string_no():
    c = GRPOConfig(save_strategy=False, eval_strategy=False)
    assert (c.save_strategy, c.eval_strategy) == ("no", "no")


def test_trainer_refuses_a_config_of_another_class_naming_both():
    import types

    from grpokit import GRPOTrainer

    with pytest.raises(TypeError, match=r"GRPOTrainer needs a grpokit.GRPOConfig, got types.SimpleNamespace"):
        GRPOTrainer(model="unused", args=types.SimpleNamespace(learning_rate=1e-6))
    with pytest.raises(TypeError, match="GRPOTrainer got unsupported arguments: data_collator"):
        GRPOTrainer(model="unused", args=None, data_collator=object())


def test_rollout_engine_and_trls_use_vllm_name_one_setting():
    """TRL's use_vllm=True is rollout_engine='vllm': either sets the other, both given must agree,
    and `replace` of one of them sets the other again."""
    assert (GRPOConfig().rollout_engine, GRPOConfig().use_vllm) == ("hf", False)
    vllm = GRPOConfig(use_vllm=True)
    assert vllm.rollout_engine == "vllm" and vllm.use_vllm
    assert GRPOConfig(rollout_engine="vllm").use_vllm
    assert not GRPOConfig(rollout_engine="hf-generate").use_vllm
    assert GRPOConfig(rollout_engine="hf-generate", use_vllm=False).rollout_engine == "hf-generate"
    for both in ({"use_vllm": True, "rollout_engine": "hf"}, {"use_vllm": False, "rollout_engine": "vllm"}):
        with pytest.raises(ValueError, match="use_vllm=(True|False) disagrees with rollout_engine="):
            GRPOConfig(**both)
    assert GRPOConfig.from_dict(vllm.to_dict()).rollout_engine == "vllm"
    assert not vllm.replace(rollout_engine="hf").use_vllm
    assert vllm.replace(use_vllm=False).rollout_engine == "hf"
    assert GRPOConfig().replace(use_vllm=True).rollout_engine == "vllm"


def test_rollout_engine_names_come_from_the_engine_registry():
    from grpokit.rollout import ENGINES, register_engine

    with pytest.raises(ValueError, match="rollout_engine='nope': use one of hf, hf-generate, vllm"):
        GRPOConfig(rollout_engine="nope")
    register_engine("test-engine")(lambda model, tokenizer, **kw: None)
    try:
        assert GRPOConfig(rollout_engine="test-engine").rollout_engine == "test-engine"
    finally:
        del ENGINES["test-engine"]
