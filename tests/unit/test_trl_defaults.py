"""grpokit's GRPOConfig defaults are TRL 1.16's for every field both have, except the few listed
here with the reason. A frozen table of TRL 1.16's defaults always runs; where TRL is installed
(e.g. the benchmark's venv) they are also read from TRL itself."""

import dataclasses

import pytest

from grpokit.config import GRPOFields

# TRL 1.16.0 GRPOConfig defaults of the fields grpokit shares (read from trl.GRPOConfig's dataclass fields)
TRL_1_16 = {
    "learning_rate": 1e-06, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
    "num_generations": 8, "max_completion_length": 512, "num_train_epochs": 3.0, "max_steps": -1,
    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": None, "beta": 0.0, "epsilon": 0.2,
    "epsilon_high": None, "delta": None, "loss_type": "dapo", "scale_rewards": "group",
    "importance_sampling_level": "token", "num_iterations": 1, "mask_truncated_completions": False,
    "top_entropy_quantile": 1.0, "gradient_checkpointing": True, "per_device_eval_batch_size": 8,
    "seed": 42, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
    "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-08, "max_grad_norm": 1.0,
    "optim": "adamw_torch_fused", "save_steps": 500, "logging_steps": 10, "use_vllm": False,
    "shuffle_dataset": True, "remove_unused_columns": False, "disable_dropout": False,
    "use_bias_correction_kl": True, "off_policy_mask_threshold": None,
    "multi_objective_aggregation": "sum_then_normalize", "entropy_coef": 0.0, "use_adaptive_entropy": False,
    "entropy_coef_min": 0.0, "entropy_coef_max": 1.0, "entropy_coef_delta": 0.005, "entropy_target": 0.2,
    "sync_ref_model": False, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512,
    "repetition_penalty": 1.0, "generation_kwargs": None, "chat_template_kwargs": None,
    "vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0,
    "sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05, "dataloader_num_workers": 0,
    "cast_lm_head_to_fp32": False, "vllm_importance_sampling_clip_max": 3.0,
    "vllm_importance_sampling_clip_min": None, "router_aux_loss_coef": None, "pad_to_multiple_of": None,
}

# where grpokit deliberately differs, and why (docs/from-trl.md says the same)
DIFFERENT = {
    "output_dir": "TRL requires one (None); grpokit writes runs/grpo",
    "report_to": "grpokit always writes metrics.jsonl; TRL's 'none' writes nothing",
    "disable_tqdm": "TRL's None decides by log level; grpokit shows the bar unless disabled",
    "log_completions": "grpokit writes samples to completions.jsonl by default (TRL prints a table when True)",
    "num_completions_to_print": "how many of them grpokit writes per logging step",
}


def ours() -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(GRPOFields)}


def test_defaults_equal_trl_1_16_for_every_shared_field_in_the_frozen_table():
    mine = ours()
    for name, trl_value in TRL_1_16.items():
        assert name in mine, name
        assert mine[name] == trl_value, f"{name}: grpokit {mine[name]!r}, TRL 1.16 {trl_value!r}"


def test_defaults_equal_the_installed_trl():
    trl = pytest.importorskip("trl")
    mine = ours()
    theirs = {f.name: (f.default if f.default is not dataclasses.MISSING else
                       f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
              for f in dataclasses.fields(trl.GRPOConfig)}
    differ = {}
    for name in mine.keys() & theirs.keys():
        value = getattr(theirs[name], "value", theirs[name])
        if value != mine[name] and name not in DIFFERENT:
            differ[name] = (mine[name], value)
    assert not differ, f"defaults that differ from TRL {trl.__version__}: {differ}"


def test_a_config_dumped_by_trl_loads():
    """TRL 1.16's GRPOConfig(...).to_dict() (tests/unit/data, made by TRL itself) builds a grpokit
    GRPOConfig: TRL's defaults of the fields grpokit does not have are accepted where they change
    nothing, and its derived fields (steps_per_generation, generation_batch_size,
    activation_checkpointing) must agree with ours."""
    import json
    from pathlib import Path

    from grpokit import GRPOConfig

    dump = json.loads((Path(__file__).parent / "data" / "trl_grpo_config_to_dict.json").read_text())
    assert dump["trl_version"] == "1.16.0"
    cfg = GRPOConfig(**dump["config"])
    assert cfg.max_completion_length == 512 and cfg.gradient_checkpointing and cfg.loss_type == "dapo"
    with pytest.raises(ValueError, match="generation_batch_size=8 disagrees with per_device_train_batch_size"):
        GRPOConfig(**{**dump["config"], "steps_per_generation": 3})  # TRL derives one from the other
    assert GRPOConfig(**{**dump["config"], "steps_per_generation": 3, "generation_batch_size": 24}).updates_per_generation() == 3
    # TRL's default use_bias_correction_kl=True is grpokit's too (the KL weighted by the ratio)
    assert GRPOConfig(**{**dump["config"], "beta": 0.04}).use_bias_correction_kl is True
