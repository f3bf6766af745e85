import pytest

from grpokit.config_file import DEMO_DEFAULTS, load_config_dict, parse_overrides, with_demo_defaults
from grpokit.config import GRPOConfig


def test_overrides_read_yaml_values():
    got = parse_overrides(["learning_rate=1e-5", "--beta", "0.04", "--use_peft", "stop=['</a>']", "--max-steps=3"])
    assert got == {"learning_rate": 1e-5, "beta": 0.04, "use_peft": True, "stop": ["</a>"], "max_steps": 3}


def test_command_line_wins_over_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("learning_rate: 0.1\nbeta: 0.5\n")
    assert load_config_dict([str(p), "beta=0.0"]) == {"learning_rate": 0.1, "beta": 0.0}


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config_dict([str(tmp_path / "nope.yaml")])


def test_bare_word_is_rejected():
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["learning_rate"])


def test_demo_defaults_only_when_nothing_is_chosen():
    assert with_demo_defaults({"max_steps": 5})["task"] == "arithmetic"
    assert with_demo_defaults({"max_steps": 5})["max_steps"] == 5
    # a model without data trains on the arithmetic task, with the model's (TRL's) defaults otherwise
    assert with_demo_defaults({"model_name_or_path": "x"}) == {"task": "arithmetic", "model_name_or_path": "x"}
    assert "task" not in with_demo_defaults({"model_name_or_path": "x", "dataset_name": "d.jsonl"})
    GRPOConfig(**DEMO_DEFAULTS)  # the demo's own settings are valid
