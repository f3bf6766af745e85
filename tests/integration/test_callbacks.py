"""Every transformers TrainerCallback event fires at its point, in transformers' order, with its
arguments; the flags a callback sets on the control (should_log, should_evaluate, should_save,
should_epoch_stop, should_training_stop) are honoured."""

import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from grpokit import GRPOConfig, GRPOTrainer
from tests.helpers import make_char_tokenizer, make_tiny_model

# every test here trains
pytestmark = pytest.mark.train

EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_step_end", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_log", "on_evaluate",
          "on_save", "on_prediction_step")


def digit_first(prompts, completions, **kw):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


class Recorder(TrainerCallback):
    """Records (event, global_step) and the keyword arguments of each event; `asks` maps
    (event, global_step) to the control flags to set there."""

    def __init__(self, asks=None):
        self.seen, self.kwargs, self.asks = [], {}, asks or {}

    def __getattribute__(self, name):
        if name in EVENTS:
            def record(args, state, control, **kw):
                self.seen.append((name, state.global_step))
                self.kwargs.setdefault(name, kw)
                for flag in self.asks.get((name, state.global_step), ()):
                    setattr(control, flag, True)
                return control
            return record
        return object.__getattribute__(self, name)


def make_trainer(tmp_path, callback, **over):
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="llama")
    base = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=16,
                gradient_accumulation_steps=2, num_generations=8, max_completion_length=3, learning_rate=1e-2,
                logging_steps=100, save_strategy="no", eval_strategy="steps", eval_steps=2,
                per_device_eval_batch_size=4, use_cpu=True, disable_tqdm=True, plot=False, seed=1, loss_type="grpo")
    train = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]})  # 4 prompts a step: an epoch is 2 steps
    evals = Dataset.from_dict({"prompt": [f"e{i}:" for i in range(8)]})  # 2 eval batches of 4
    return GRPOTrainer(model=model, reward_funcs=digit_first, args=GRPOConfig(**{**base, **over}),
                       train_dataset=train, eval_dataset=evals, processing_class=tok, callbacks=[callback],
                       # two micro-batches per optimizer step whatever the rewards: on_substep_end fires once
                       forward_plan={"merge": False, "skip_zero_advantage": False})


def test_every_event_fires_in_transformers_order_and_the_control_flags_are_honoured(tmp_path):
    # step 1: the callback asks to evaluate and save (neither is due); step 3: asks to log (not due)
    rec = Recorder({("on_step_end", 1): ("should_evaluate", "should_save"), ("on_step_end", 3): ("should_log",)})
    trainer = make_trainer(tmp_path, rec)
    assert rec.seen == [("on_init_end", 0)]
    trainer.train()

    def one_step(n, then):
        return [("on_step_begin", n - 1), ("on_substep_end", n - 1), ("on_pre_optimizer_step", n - 1),
                ("on_optimizer_step", n - 1), ("on_step_end", n)] + then

    evaluation = [("on_prediction_step", None), ("on_prediction_step", None), ("on_evaluate", None)]

    def at(events, n):
        return [(e, n) for e, _ in events]

    expected = ([("on_init_end", 0), ("on_train_begin", 0), ("on_epoch_begin", 0)]
                + one_step(1, at(evaluation, 1) + [("on_save", 1)])         # asked by the callback
                + one_step(2, at(evaluation, 2) + [("on_epoch_end", 2)])    # eval due (eval_steps=2); rows 4-7 end epoch 0
                + [("on_epoch_begin", 2)]
                + one_step(3, [("on_log", 3)] + at(evaluation, 3))          # log asked; eval at the last step
                + [("on_epoch_end", 3), ("on_train_end", 3)])
    assert rec.seen == expected
    assert os.path.isdir(os.path.join(trainer.args.output_dir, "checkpoint-1"))  # should_save honoured
    # transformers' arguments reach every event
    for name in EVENTS:
        kw = rec.kwargs[name]
        assert kw["model"] is trainer.model and kw["optimizer"] is trainer.parts.optimizer, name
        assert kw["lr_scheduler"] is trainer.parts.scheduler and kw["processing_class"] is not None, name
    assert "loss" in rec.kwargs["on_log"]["logs"] and "eval/accuracy" in rec.kwargs["on_evaluate"]["metrics"]
    assert [h["step"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h] == [3]


def test_should_epoch_stop_starts_the_next_epoch_and_should_training_stop_stops(tmp_path):
    rec = Recorder({("on_step_end", 1): ("should_epoch_stop",), ("on_log", 2): ("should_training_stop",)})
    trainer = make_trainer(tmp_path, rec, logging_steps=1, eval_strategy="no", max_steps=5)
    trainer.train()
    epochs = [e for e in rec.seen if e[0] in ("on_epoch_begin", "on_epoch_end")]
    # epoch 0 ends after step 1 (asked), the next starts with step 2; the stop asked in on_log ends at step 2
    assert epochs == [("on_epoch_begin", 0), ("on_epoch_end", 1), ("on_epoch_begin", 1), ("on_epoch_end", 2)]
    assert trainer.state.global_step == 2
    assert trainer.state.epoch == 1.5  # epoch 1, 4 of its 8 rows used


def test_pre_optimizer_step_sees_the_clipped_gradients_and_may_edit_them(tmp_path):
    """transformers fires on_pre_optimizer_step after clipping, before optimizer.step: a callback that
    zeroes the gradients there leaves the weights where they were (AdamW, no weight decay)."""

    class Zero(TrainerCallback):
        norms = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            for g in grads:
                g.zero_()

    callback = Zero()
    trainer = make_trainer(tmp_path, callback, eval_strategy="no", max_grad_norm=1e-3, max_steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert len(callback.norms) == 2 and all(0 < n <= 1e-3 + 1e-7 for n in callback.norms)  # clipped first
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_eval_on_start_fires_on_evaluate_after_on_train_begin(tmp_path):
    rec = Recorder()
    make_trainer(tmp_path, rec, eval_on_start=True, eval_strategy="no", max_steps=1).train()
    assert rec.seen[:6] == [("on_init_end", 0), ("on_train_begin", 0), ("on_prediction_step", 0),
                            ("on_prediction_step", 0), ("on_evaluate", 0), ("on_epoch_begin", 0)]
