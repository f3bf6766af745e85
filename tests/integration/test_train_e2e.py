"""End to end: GRPO on tiny models built in the test raises the reward; data stays attached to
the right (prompt, sample); exact resume; LoRA; clear errors before anything is written."""

import os

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.algos import group_advantages
from tests.helpers import digit_first, make_tiny_llama, prompts_ds


def config(tmp_path, **over):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=16,
                gradient_accumulation_steps=2, num_generations=8, max_completion_length=3, learning_rate=1e-2,
                logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False, seed=1)
    return GRPOConfig(**{**base, **over})


def mean_reward(run_dir, steps):
    import json

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = [r for r in rows if "reward" in r and r["step"] in steps]
    return sum(r["reward"] for r in rows) / len(rows)


@pytest.mark.train
def test_grpo_raises_the_reward(tmp_path):
    model, tok = make_tiny_llama()
    cfg = config(tmp_path, max_steps=16, learning_rate=3e-2, lr_scheduler_type="constant")
    GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                processing_class=tok).train()
    first, last = mean_reward(cfg.output_dir, {1, 2, 3}), mean_reward(cfg.output_dir, {14, 15, 16})
    assert first < 0.4 and last > first + 0.3, (first, last)
    for name in ("metrics.jsonl", "completions.jsonl", "config.yaml", "final"):
        assert os.path.exists(os.path.join(cfg.output_dir, name)), name


def test_rewards_and_advantages_stay_with_their_prompt_and_sample(tmp_path):
    seen = {}

    def echo_reward(prompts, completions, completion_ids=None, idx=None, **kw):
        seen.update(prompts=prompts, completions=completions, idx=idx, ids=completion_ids)
        # a reward that depends on the row and on the sample: row index + completion length
        return [float(i) + len(c) / 10 for i, c in zip(idx, completions)]

    model, tok = make_tiny_llama()
    trainer = GRPOTrainer(model=model, reward_funcs=echo_reward, args=config(tmp_path), train_dataset=prompts_ds(),
                          processing_class=tok)
    run = trainer.parts
    rows, _, _ = run.order.next_rows(0, 0)
    rollout = run.score(run.sample(rows, seed=0))
    g = run.config.num_generations
    assert len(rollout.completions) == len(rows) * g
    for i in range(len(rollout.completions)):
        row = rows[i // g]                                   # groups are contiguous
        assert rollout.row_index[i] == row
        assert seen["idx"][i] == row and seen["prompts"][i] == f"q{row}:"
        assert tok.decode(rollout.prompt_ids[i]) == f"q{row}:"
        assert seen["ids"][i] == rollout.completion_ids[i]
        assert tok.decode(rollout.completion_ids[i], skip_special_tokens=True).startswith(seen["completions"][i])
        assert rollout.rewards[i] == pytest.approx(row + len(seen["completions"][i]) / 10)
    adv = group_advantages(rollout.rewards, g, scale_rewards="group")
    # within a group the row term cancels: advantages depend on completion lengths only
    lengths = torch.tensor([len(c) / 10 for c in seen["completions"]]).view(-1, g)
    expected = (lengths - lengths.mean(1, keepdim=True)) / (lengths.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv.view(-1, g), expected, atol=2e-3)  # float32 rounding of row + len/10, over a small std


@pytest.mark.train
def test_resume_is_exact(tmp_path):
    def run(resume=None, max_steps=6, out="a"):
        model, tok = make_tiny_llama()
        cfg = config(tmp_path, max_steps=max_steps, save_steps=3, save_strategy="steps",
                     output_dir=str(tmp_path / out))
        t = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(20),
                        processing_class=tok)
        t.train(resume_from_checkpoint=resume)
        return {k: v.clone() for k, v in t.model.state_dict().items()}

    straight = run()
    resumed = run(resume=str(tmp_path / "a" / "checkpoint-3"), out="b")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


@pytest.mark.train
def test_resume_with_a_different_config_is_refused(tmp_path):
    from grpokit.checkpoint import CheckpointError

    model, tok = make_tiny_llama()
    cfg = config(tmp_path, max_steps=2, save_steps=2, save_strategy="steps")
    GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                processing_class=tok).train()
    model, tok = make_tiny_llama()
    t = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg.replace(learning_rate=0.5, max_steps=4),
                    train_dataset=prompts_ds(), processing_class=tok)
    with pytest.raises(CheckpointError, match="learning_rate"):
        t.train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointError):
        t.train(resume_from_checkpoint=str(tmp_path / "nowhere"))


@pytest.mark.train
def test_resume_may_change_fields_that_are_listed_and_says_so(tmp_path):
    """resume_allow_changes: the resumed run uses the new learning rate from its first step (the
    schedule's position kept) and prints which fields changed."""
    import json

    model, tok = make_tiny_llama()
    cfg = config(tmp_path, max_steps=2, save_steps=2, save_strategy="steps", lr_scheduler_type="constant")
    GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                processing_class=tok).train()
    model, tok = make_tiny_llama()
    t = GRPOTrainer(model=model, reward_funcs=digit_first, train_dataset=prompts_ds(), processing_class=tok,
                    args=cfg.replace(learning_rate=0.5, temperature=0.7, max_steps=4,
                                     resume_allow_changes=["learning_rate", "temperature"]))
    lines = []
    write = t.parts.tracker.write
    t.parts.tracker.write = lambda msg: (lines.append(msg), write(msg))
    t.train(resume_from_checkpoint=True)
    assert any("no longer an exact continuation: " in m and "learning_rate: 0.01 -> 0.5" in m
               and "temperature: 1.0 -> 0.7" in m
               for m in lines), lines
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["learning_rate"] for r in rows if r["step"] > 2 and "loss" in r] == [0.5, 0.5]


@pytest.mark.train
def test_lora_trains_only_the_adapter(tmp_path):
    from peft import LoraConfig

    model, tok = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = config(tmp_path, max_steps=3, beta=0.04)
    t = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(), processing_class=tok,
                    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))
    t.train()
    changed_lora, changed_base = False, False
    for name, p in t.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad
            changed_lora |= "lora_B" in name and bool(p.abs().sum() > 0)
        else:
            assert not p.requires_grad
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            changed_base |= not torch.equal(p, before[key])
    assert changed_lora and not changed_base


@pytest.mark.parametrize("kind", ["empty", "no_prompt", "too_long", "no_template", "reward_signature"])
def test_bad_input_fails_before_anything_is_written(tmp_path, kind):
    model, tok = make_tiny_llama()
    ds, funcs, msg = prompts_ds(), digit_first, None
    if kind == "empty":
        ds, msg = Dataset.from_dict({"prompt": []}), "empty"
    elif kind == "no_prompt":
        ds, msg = Dataset.from_dict({"question": ["a"]}), "prompt"
    elif kind == "too_long":
        ds, msg = Dataset.from_dict({"prompt": ["x" * 40]}), "40"
    elif kind == "no_template":
        ds, msg = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]]}), "chat template"
    else:
        def funcs(prompts, completions, answer, **kw):
            return [0.0] * len(prompts)
        msg = "answer"
    cfg = config(tmp_path, max_prompt_length=32)
    with pytest.raises(ValueError, match=msg):
        GRPOTrainer(model=model, reward_funcs=funcs, args=cfg, train_dataset=ds, processing_class=tok)
    assert not os.path.exists(cfg.output_dir)


@pytest.mark.train
def test_the_trainer_surface_of_transformers(tmp_path):
    """trainer.state (global_step, log_history), TrainerCallback events with TrainerControl (a
    callback stops training), train() returning TrainOutput, and evaluate()."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import TrainOutput

    from grpokit.data import get_task

    seen = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen.append(("begin", state.global_step, state.max_steps))

        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(("log", state.global_step, "loss" in logs))

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            seen.append(("evaluate", state.global_step, "eval/accuracy" in metrics))

        def on_save(self, args, state, control, **kw):
            seen.append(("save", state.global_step))

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True  # stop after step 3 of 6
            return control

        def on_train_end(self, args, state, control, **kw):
            seen.append(("end", state.global_step))

    model, tok = make_tiny_llama()
    task = get_task("arithmetic", seed=0, num_train=32, num_eval=8)
    cfg = config(tmp_path, max_steps=6, logging_steps=1, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                 save_steps=2)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                          eval_dataset=task.eval_dataset, processing_class=tok, callbacks=[Recorder()])
    out = trainer.train()
    assert isinstance(out, TrainOutput) and out.global_step == 3 == trainer.state.global_step
    assert out.metrics["train_runtime"] > 0 and "train_loss" in out.metrics
    assert seen[0] == ("begin", 0, 6) and seen[-1] == ("end", 3)
    assert [s for s in seen if s[0] == "log"] == [("log", 1, True), ("log", 2, True), ("log", 3, True)]
    assert ("evaluate", 2, True) in seen and ("save", 2) in seen
    history = trainer.state.log_history
    assert history[0]["step"] == 1 and "loss" in history[0] and "train_loss" in history[-1]
    assert "eval/accuracy" in trainer.evaluate() and trainer.eval_dataset is task.eval_dataset


@pytest.mark.train
def test_reward_functions_receive_trainer_state_log_metric_and_log_extra(tmp_path):
    """As in TRL: `trainer_state` (global_step before the step's update), `log_metric` (averaged
    into the step's metrics) and `log_extra` (a column of completions.jsonl)."""
    import json

    steps_seen = []

    def shaped(prompts, completions, trainer_state, log_metric, log_extra, **kw):
        steps_seen.append(trainer_state.global_step)
        log_metric("shaping/progress", trainer_state.global_step / trainer_state.max_steps)
        log_extra("note", [f"len={len(c)}" for c in completions])
        return [float(len(c)) for c in completions]

    model, tok = make_tiny_llama()
    cfg = config(tmp_path, max_steps=3, logging_steps=1)
    GRPOTrainer(model=model, reward_funcs=shaped, args=cfg, train_dataset=prompts_ds(), processing_class=tok).train()
    assert steps_seen == [0, 1, 2]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    assert [round(r["shaping/progress"], 4) for r in rows] == [0.0, round(1 / 3, 4), round(2 / 3, 4)]
    samples = [json.loads(line) for line in open(tmp_path / "run" / "completions.jsonl")]
    assert samples and all(s["note"] == f"len={len(s['completion'])}" for s in samples)
