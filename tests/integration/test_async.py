"""Asynchronous GRPO (grpokit.pipeline): a generation worker process samples ahead of the trainer.

- max_staleness=0 samples in the worker with the weights that train on the rollouts: the
  synchronous run, bit for bit (one thread on both sides, as the synchronous run here).
- The staleness bound holds for every rollout (each carries the version that sampled it) and is
  reached (the worker does sample ahead), with num_iterations > 1 too.
- Dynamic sampling that drops every group of every step does not deadlock.
- A hung worker (generating, or loading weights) ends the run within heartbeat_stale_after_s,
  naming the rank, what the trainer waited for and the worker's stage; a dead worker at once.
- The consistency probe stops a run whose sync skips one LoRA module, naming it.
- A checkpoint keeps the rollouts sampled ahead: resume equals the straight run.
- The worker ignores Ctrl-C (the trainer finishes its step and checkpoints through it).
- The tool task (multi-turn) trains through the worker.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from grpokit.core.run import RunParts
from grpokit.pipeline import AsyncPipeline, PipelineError, WeightChannel
from tests.helpers import make_char_tokenizer, make_tiny_model, tiny_grpo_trainer

pytestmark = pytest.mark.train


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def count_a(completions, **kw):
    return [float(c.count("a")) + 0.1 * len(c) for c in completions]


def constant(completions, **kw):
    return [1.0] * len(completions)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def train(tmp_path, name, reward=count_a, **kw):
    trainer = tiny_grpo_trainer(tmp_path / name, reward, **{"max_steps": 4, "learning_rate": 1e-2, **kw})
    trainer.train()
    return trainer


@pytest.mark.parametrize("knobs", [{}, {"num_iterations": 2}, {"dynamic_sampling": True}],
                         ids=["plain", "num_iterations=2", "dynamic_sampling"])
def test_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path, knobs):
    sync = train(tmp_path, "sync", **knobs)
    worker = train(tmp_path, "async", max_staleness=0, **knobs)
    assert isinstance(worker.parts.pipeline, AsyncPipeline)
    a, b = weights(sync), weights(worker)
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = make_tiny_model(make_char_tokenizer()).state_dict()
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    sync_log = [e for e in sync.state.log_history if "loss" in e]
    async_log = [e for e in worker.state.log_history if "loss" in e]
    assert [e["loss"] for e in sync_log] == [e["loss"] for e in async_log]
    assert all(e["async/staleness"] == 0 for e in async_log)


@pytest.mark.parametrize("max_staleness,num_iterations", [(2, 1), (1, 2), (3, 1)])
def test_the_staleness_bound_holds_for_every_rollout_and_is_reached(tmp_path, monkeypatch, max_staleness,
                                                                    num_iterations):
    seen = []
    take = AsyncPipeline.sample

    def spy(self, run, rows, seed):
        traj = take(self, run, rows, seed)
        seen.append((self.version, traj.policy_version.tolist()))
        return traj

    monkeypatch.setattr(AsyncPipeline, "sample", spy)
    t = train(tmp_path, "run", max_steps=8, max_staleness=max_staleness, num_iterations=num_iterations)
    staleness = [step - v for step, versions in seen for v in versions]
    assert len(seen) == 8 // num_iterations and min(staleness) >= 0
    assert max(staleness) == max_staleness  # bounded, and the worker did sample ahead
    logged = [e["async/staleness"] for e in t.state.log_history if "async/staleness" in e]
    assert max(logged) == max_staleness
    assert t.parts.plan.sampler_differs  # stale rollouts: the importance-sampling correction is on


def test_queue_maxsize_bounds_what_is_sampled_ahead(tmp_path):
    t = train(tmp_path, "run", max_steps=6, max_staleness=3, queue_maxsize=8)  # one step's 8 completions
    log = [e for e in t.state.log_history if "async/queued_completions" in e]
    assert log and all(e["async/queued_completions"] <= 8 for e in log)


def test_dynamic_sampling_dropping_every_group_does_not_deadlock(tmp_path):
    t = train(tmp_path, "run", reward=constant, max_steps=3, max_staleness=1, dynamic_sampling=True,
              dynamic_sampling_max_rounds=2, heartbeat_stale_after_s=60)
    log = [e for e in t.state.log_history if "loss" in e]
    assert len(log) == 3 and all(e["dynamic_sampling/rounds"] == 2 for e in log)
    assert all(e["dynamic_sampling/groups_dropped"] == 4 for e in log)


def _hang(*args, **kwargs):
    time.sleep(3600)


@pytest.mark.parametrize("where,stage", [("generate", "generating (generation)"),
                                         ("load", "loading the weights (sync)")])
def test_a_hung_worker_ends_the_run_within_the_timeout_naming_the_stage(tmp_path, monkeypatch, where, stage):
    if where == "generate":
        monkeypatch.setattr(RunParts, "sample_here", _hang)
    else:
        def slow_copy(self, model, version, alive=lambda: True, poll=0.005):
            from grpokit.pipeline.weights import LOADING, STAGE
            self.flags[STAGE] = LOADING
            _hang()
        monkeypatch.setattr(WeightChannel, "load", slow_copy)
    trainer = tiny_grpo_trainer(tmp_path, count_a, max_staleness=1, heartbeat_stale_after_s=2)
    started = time.monotonic()
    with pytest.raises(PipelineError) as info:
        trainer.train()
    took = time.monotonic() - started
    message = str(info.value)
    assert took < 2 + 10, took
    assert "rank 0" in message and "sent nothing for 2 s" in message and "(queue)" in message, message
    assert f"the worker is {stage}" in message, message
    assert trainer.parts.pipeline.process is None  # the worker was stopped


def test_a_dead_worker_ends_the_run_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(RunParts, "sample_here", lambda *a, **k: os._exit(3))
    trainer = tiny_grpo_trainer(tmp_path, count_a, max_staleness=1, heartbeat_stale_after_s=60)
    started = time.monotonic()
    with pytest.raises(PipelineError, match=r"died \(exit code 3\)"):
        trainer.train()
    assert time.monotonic() - started < 20


def test_an_error_in_the_worker_is_raised_by_the_trainer_with_its_traceback(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("the engine broke")

    monkeypatch.setattr(RunParts, "sample_here", broken)
    with pytest.raises(PipelineError, match=r"(?s)generation worker failed.*ValueError: the engine broke"):
        tiny_grpo_trainer(tmp_path, count_a, max_staleness=1).train()


def test_the_probe_catches_a_sync_that_skips_one_lora_module(tmp_path, monkeypatch):
    from datasets import Dataset
    from peft import LoraConfig

    from grpokit import GRPOConfig, GRPOTrainer

    load = WeightChannel.load

    def skipping_load(self, model, version, alive=lambda: True, poll=0.005):  # runs in the worker
        name = next(n for n in self.names if "lora_B" in n)
        before = dict(model.named_parameters())[name].detach().clone()
        load(self, model, version, alive=alive, poll=poll)
        with torch.no_grad():
            dict(model.named_parameters())[name].copy_(before)  # as if the copy had missed it

    tok = make_char_tokenizer()
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                     num_generations=4, max_completion_length=6, use_cpu=True, disable_tqdm=True, plot=False,
                     save_strategy="no", learning_rate=5e-2, max_staleness=1, report_to=[])
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=count_a, args=cfg, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]}),
                          peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    synced = trainer.parts.pipeline
    skipped = next(n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n)
    monkeypatch.setattr(WeightChannel, "load", skipping_load)
    with pytest.raises(PipelineError) as info:
        trainer.train()
    message = str(info.value)
    # only the adapter is synced under LoRA
    assert synced.channel is not None and all("lora_" in n for n in synced.channel.names)
    assert "runs another policy than the trainer" in message and "after the weight sync of step 1" in message
    assert skipped in message, message
    assert "parameters that differ (1 of" in message, message


def test_resume_from_a_checkpoint_equals_the_straight_run(tmp_path):
    def run(name, resume=None):
        t = tiny_grpo_trainer(tmp_path / name, count_a, max_steps=6, learning_rate=1e-2, max_staleness=2,
                              save_strategy="steps", save_steps=3)
        t.train(resume_from_checkpoint=resume)
        return t

    straight = run("a")
    resumed = run("b", resume=str(tmp_path / "a" / "run" / "checkpoint-3"))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {e["step"]: e["loss"] for e in straight.state.log_history if "loss" in e}
    assert all(losses[e["step"]] == e["loss"] for e in resumed.state.log_history if "loss" in e)
    # the checkpoint carried the rollouts sampled ahead for steps 3, 4, 5 (with the weights of steps 1, 2, 3)
    saved = torch.load(tmp_path / "a" / "run" / "checkpoint-3" / "trainer_state_extra.pt", weights_only=True)
    pending = saved["pipeline"]["ranks"][0]["pending"]
    assert [p["request"]["version"] for p in pending] == [1, 2, 3] and all(p["rollout"] is not None for p in pending)


def test_the_worker_ignores_ctrl_c(tmp_path, monkeypatch):
    start = AsyncPipeline.start

    def start_then_interrupt_the_worker(self, run, state):
        start(self, run, state)  # SIGINT at once, maybe before the worker's handler (blocked across the fork)
        os.kill(self.process.pid, signal.SIGINT)

    monkeypatch.setattr(AsyncPipeline, "start", start_then_interrupt_the_worker)
    trainer = train(tmp_path, "run", max_staleness=1)
    assert trainer.state.global_step == 4


def test_the_tool_task_trains_through_the_worker(tmp_path):
    from grpokit import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=16,
                     num_generations=8, max_completion_length=96, learning_rate=1e-3, logging_steps=1,
                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, plot=False, seed=0,
                     task="multiply", max_staleness=1)
    trainer = GRPOTrainer(args=cfg)
    before = weights(trainer)
    trainer.train()
    log = [e for e in trainer.state.log_history if "loss" in e]
    assert len(log) == 2 and all(e["tools/call_frequency"] > 0 for e in log)
    assert log[-1]["async/staleness"] == 1
    after = weights(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_trls_async_trainer_and_config_names(tmp_path):
    from datasets import Dataset

    from grpokit import AsyncGRPOConfig, AsyncGRPOTrainer

    cfg = AsyncGRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8,
                          num_generations=4, max_completion_length=6, use_cpu=True, disable_tqdm=True, plot=False,
                          save_strategy="no", report_to=[])
    assert (cfg.max_staleness, cfg.weight_sync_steps, cfg.queue_maxsize, cfg.max_inflight_tasks,
            cfg.heartbeat_stale_after_s, cfg.lr_scheduler_type) == (4, 1, 1024, -1, 300.0, "constant")
    tok = make_char_tokenizer()
    data = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]})
    trainer = AsyncGRPOTrainer(model=make_tiny_model(tok), reward_funcs=count_a, args=cfg, processing_class=tok,
                               train_dataset=data)
    out = trainer.train()
    assert out.global_step == 2 and isinstance(trainer.parts.pipeline, AsyncPipeline)
    with pytest.raises(TypeError, match="rollout_worker= is TRL's vLLM-server hook"):
        AsyncGRPOTrainer(model=make_tiny_model(tok), reward_funcs=count_a, args=cfg, processing_class=tok,
                         train_dataset=data, rollout_worker=object())
    from grpokit import GRPOConfig

    with pytest.raises(ValueError, match="max_staleness is None"):
        AsyncGRPOTrainer(model=make_tiny_model(tok), reward_funcs=count_a, processing_class=tok, train_dataset=data,
                         args=GRPOConfig(output_dir=str(tmp_path / "x")))


def test_images_through_the_worker_staleness_zero_is_the_synchronous_run(tmp_path):
    """The colors task (a vision-language starter): prompts with pictures sampled in the worker,
    their pixel inputs sent back with the rollouts, the same weights as the synchronous run."""
    from grpokit import GRPOConfig, GRPOTrainer
    from grpokit.models import starter_model_path

    def run(name, **kw):
        args = GRPOConfig(output_dir=str(tmp_path / name), task="colors", task_num_train=16, task_num_eval=4,
                          max_steps=3, per_device_train_batch_size=8, num_generations=4, max_completion_length=4,
                          learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                          logging_steps=1,
                          plot=False, **kw)
        t = GRPOTrainer(model=starter_model_path("colors"), args=args)
        t.train()
        return t

    sync, worker = run("sync"), run("async", max_staleness=0)
    a, b = weights(sync), weights(worker)
    assert all(torch.equal(a[k], b[k]) for k in a)
    stale = run("stale", max_staleness=1)
    assert [e["async/staleness"] for e in stale.state.log_history if "loss" in e][-1] == 1
