"""Numbers that would silently ruin a step: NaN/inf logits while sampling, rewards whose group
statistics overflow. Each is counted and warned about (or raises), never trained on silently."""

import json

import pytest
import torch

from grpokit.core.loop import vanished_advantages
from tests.helpers import tiny_trainer


def nan_logits_for_some_rows(model, every=3):
    """A forward hook on the lm_head: in generation (the HF engine calls the model's head), rows
    0, every, 2*every, ... get NaN logits; the training forward reads the head's weight directly,
    so it is not affected."""
    def hook(module, args, out):
        out = out.clone()
        out[::every] = float("nan")
        return out

    return model.get_output_embeddings().register_forward_hook(hook)


@pytest.mark.train
def test_nan_logits_in_generation_are_counted_and_never_trained_on(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2, logging_steps=1)
    nan_logits_for_some_rows(trainer.model)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert steps and all(0 < r["completions/nonfinite_ratio"] < 1 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)  # the rest trained normally
    assert all(r["skipped_steps"] == 0 for r in steps)


@pytest.mark.train
def test_nan_logits_raise_when_asked(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=1, on_nonfinite="raise")
    nan_logits_for_some_rows(trainer.model)
    with pytest.raises(FloatingPointError, match=r"completions were sampled from NaN/inf logits"):
        trainer.train()


def test_the_nonfinite_samples_are_out_of_the_mask():
    from grpokit.core.batch import make_micro_batches
    from grpokit.trajectory import Trajectories

    traj = Trajectories(row_index=[0, 0], prompts=[None] * 2, completions=[None] * 2, prompt_ids=[[5], [5]],
                        completion_ids=[[1, 2], [3]], sampling_logps=[[float("nan"), -1.0], [-0.5]],
                        truncated=torch.zeros(2, dtype=torch.bool), nonfinite=torch.tensor([True, False]))
    mb = make_micro_batches(traj, 2, pad_id=0, device="cpu", mask_truncated=False)[0]
    assert mb.completion_mask.tolist() == [[0, 0], [1, 0]]
    assert torch.isfinite(mb.sampling_logps).all()


@pytest.mark.train
def test_rewards_that_overflow_the_group_statistics_are_warned_about(tmp_path):
    """Rewards of +-1e38: the group std overflows float32 and every advantage comes out 0 (the
    update does nothing); the run says so once, with the fix."""
    from grpokit.algos import group_advantages

    rewards = torch.tensor([1e38, -1e38, 1e38, -1e38, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4, scale_rewards="group")
    assert bool((adv == 0).all())
    assert "overflow the group statistics" in vanished_advantages(rewards, adv, 4)
    assert "+-inf" in vanished_advantages(torch.tensor([float("inf"), 0.0]), torch.zeros(2), 2)
    nan = float("nan")
    assert "returned None for every completion" in vanished_advantages(torch.tensor([nan] * 4), torch.zeros(4), 2)
    assert vanished_advantages(torch.tensor([nan, 1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, -0.7, 0.7]), 2) is None
    ordinary = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert vanished_advantages(ordinary, group_advantages(ordinary, 2), 2) is None
    assert vanished_advantages(torch.ones(4), torch.zeros(4), 2) is None  # equal rewards: no signal by design

    lines = []
    trainer = tiny_trainer(tmp_path, max_steps=2,
                           reward=lambda prompts, completions, **kw: [1e38 * (-1) ** len(c) for c in completions])
    write = trainer.parts.tracker.write
    trainer.parts.tracker.write = lambda msg: (lines.append(msg), write(msg))
    trainer.train()
    warnings = [m for m in lines if m.startswith("warning")]
    assert len(warnings) == 1 and "scale the rewards down" in warnings[0], lines
