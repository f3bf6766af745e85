"""DESIGN: "nothing re-probes the model per call": the model's facts are read once at start-up
(modeling.info.ModelInfo, carried by the plan), never during a step."""

import pytest
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.modeling import info
from tests.helpers import make_char_tokenizer, make_tiny_model

PROBES = ("supports_packed", "plain_linear_head", "vision_tower_trained", "is_vision_model", "uses_mrope")


def reward(completions, **kw):
    return [float(len(c) % 2) for c in completions]


@pytest.mark.train
def test_no_model_probe_during_training_steps(tmp_path, monkeypatch):
    tok = make_char_tokenizer()
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2, num_generations=4, max_completion_length=4, num_iterations=1,
                     beta=0.1, use_cpu=True, disable_tqdm=True, plot=False, save_strategy="no", loss_type="grpo")
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=reward, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh"]}))
    assert trainer.parts.plan.model is not None and trainer.parts.plan.model.packable
    calls = []
    for name in PROBES:
        original = getattr(info, name)
        monkeypatch.setattr(info, name, lambda *a, _name=name, _f=original, **k: calls.append(_name) or _f(*a, **k))
    trainer.train()  # 3 steps: the training forwards and the reference's (beta > 0)
    assert calls == []
