"""Multi-turn GRPO end to end: the built-in `multiply` tool task on its shipped starter model through
grpokit's engine (KV reuse across turns), an environment with its own reward, rollout_func, and
the command line's `task=multiply` / `tools=module:function`."""

import json
import os

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.core.batch import make_micro_batches
from grpokit.models import load_tokenizer, starter_model_path
from tests.helpers import instrument

# every test here trains
pytestmark = pytest.mark.train


def config(tmp_path, **over):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=16, num_generations=8,
                max_completion_length=96, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, disable_tqdm=True, plot=False, seed=0, task="multiply", task_num_eval=16)
    base.update(over)
    return GRPOConfig(**base)


def test_the_multiply_task_trains_on_conversations_with_the_tool(tmp_path):
    trainer = GRPOTrainer(args=config(tmp_path, eval_strategy="steps", eval_steps=2))
    assert trainer.parts.model_name.endswith("(starter-multiply)")
    assert [t.__name__ for t in trainer.tools] == ["multiply"]
    assert "multi-turn: tools multiply" in trainer.parts.summary()
    sampled = []
    sample = trainer.parts.sample
    instrument(trainer.parts, sample=lambda *a, **k: sampled.append(sample(*a, **k)) or sampled[-1])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    log = trainer.state.log_history
    assert all(0 < e["tools/call_frequency"] <= 1 for e in log if "tools/call_frequency" in e)
    assert any(e.get("tools/failure_frequency") == 0.0 for e in log)
    traj = sampled[0]
    called = [i for i in range(len(traj)) if traj.tool_stats["tool_calls"][i] > 0]
    assert called, "the starter model calls the tool"
    i = called[0]
    roles = [m["role"] for m in traj.completions[i]]
    assert roles[:2] == ["assistant", "tool"] and traj.completions[i][0]["tool_calls"][0]["function"]["name"] == \
        "multiply"
    a, b = traj.completions[i][0]["tool_calls"][0]["function"]["arguments"].values()
    assert traj.completions[i][1]["content"] == str(a * b)
    # the tool's tokens are in the sequence, out of the loss
    mb = make_micro_batches(traj, len(traj), pad_id=0, device="cpu", mask_truncated=False)[0]
    external = [not m for m in traj.trained_mask(i)]
    assert any(external) and mb.completion_mask[i, :len(external)].tolist() == [0.0 if e else 1.0 for e in external]
    evals = [e for e in log if "eval/accuracy" in e]
    assert evals and "eval/accuracy_without_tools" in evals[-1]
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_a_mock_generate_and_the_engine_see_the_same_protocol(tmp_path):
    """Replacing model.generate on the instance routes sampling through it (TRL's tests rely on
    this); without it grpokit's engine samples."""
    trainer = GRPOTrainer(args=config(tmp_path, max_steps=1))
    assert trainer.parts.sampler.engine is trainer.parts.engine
    trainer.model.generate = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("mock called"))
    with pytest.raises(RuntimeError, match="mock called"):
        trainer.train()


class GuessEnv:
    """A two-number game: reset picks the row's secret, `guess` answers higher/lower/correct."""

    def reset(self, secret, **row):
        self.secret, self.guesses, self.solved = int(secret), 0, False
        return " (between 0 and 9)"

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: The guess.
        """
        self.guesses += 1
        self.solved = int(number) == self.secret
        return "correct" if self.solved else ("higher" if int(number) < self.secret else "lower")

    def get_reward(self) -> float:
        return 1.0 if self.solved else 0.0


def test_an_environment_with_its_own_reward(tmp_path):
    path = starter_model_path("multiply")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Guess"}]] * 4, "secret": [3, 5, 7, 1]})
    cfg = config(tmp_path, task=None, max_steps=1, per_device_train_batch_size=8, num_generations=4)
    seen = []

    def sees_environments(completions, environments, **kw):
        seen.append([type(e).__name__ for e in environments])
        return [0.0] * len(completions)

    trainer = GRPOTrainer(model=path, reward_funcs=[sees_environments], args=cfg, train_dataset=ds,
                          environment_factory=GuessEnv)
    assert trainer.reward_func_names == ["sees_environments", "GuessEnv"]
    trainer.train()
    assert seen and seen[0] == ["GuessEnv"] * 8
    assert [e.secret for e in trainer.environments] == [3] * 4 + [5] * 4
    assert any("rewards/GuessEnv/mean" in e for e in trainer.state.log_history)


def test_rollout_func_with_an_env_mask(tmp_path):
    path = starter_model_path("multiply")
    tok = load_tokenizer(path)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Say 12"}]] * 4})
    calls = []

    def rollout(prompts, trainer):
        calls.append(len(prompts))
        ids = tok("12<|im_end|>", add_special_tokens=False)["input_ids"]
        tool = tok("\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        comp = ids + tool + ids
        p = tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
        p = tok(p, add_special_tokens=False)["input_ids"]
        return {"prompt_ids": [p] * len(prompts), "completion_ids": [comp] * len(prompts),
                "logprobs": [[-1.0] * len(comp)] * len(prompts),
                "env_mask": [[1] * len(ids) + [0] * len(tool) + [1] * len(ids)] * len(prompts),
                "score": [float(i % 2) for i in range(len(prompts))]}

    def from_rollout(completions, score, **kw):
        return score

    cfg = config(tmp_path, task=None, max_steps=1, per_device_train_batch_size=8, num_generations=4)
    trainer = GRPOTrainer(model=path, reward_funcs=[from_rollout], args=cfg, train_dataset=ds, rollout_func=rollout)
    trainer.train()
    assert calls == [8]
    assert [e["rewards/from_rollout/mean"] for e in trainer.state.log_history if "rewards/from_rollout/mean" in e][0] == pytest.approx(0.5)

    def missing(prompts, trainer):
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[2]] * len(prompts)}

    trainer = GRPOTrainer(model=path, reward_funcs=[from_rollout], args=config(tmp_path / "b", task=None, max_steps=1,
                                                                               per_device_train_batch_size=8,
                                                                               num_generations=4),
                          train_dataset=ds, rollout_func=missing)
    with pytest.raises(ValueError, match="rollout_func must return keys"):
        trainer.train()


def test_the_command_line_runs_the_tool_task_and_takes_tools_by_path(tmp_path):
    from grpokit.cli import main

    out = tmp_path / "cli"
    assert main(["train", "task=multiply", "max_steps=1", f"output_dir={out}", "eval_strategy=no",
                 "eval_on_start=false", "report_to=[]", "plot=false", "disable_tqdm=true"]) == 0
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert any("tools/call_frequency" in r for r in rows)
    cfg = config(tmp_path, task=None, tools=["grpokit.data.tool_tasks:multiply"], max_steps=1)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "What is 123*45?"}]] * 2, "answer": [5535] * 2})
    trainer = GRPOTrainer(model=starter_model_path("multiply"), reward_funcs=["grpokit.data.tool_tasks:multiply_reward"],
                          args=cfg, train_dataset=ds)
    assert [t.__name__ for t in trainer.tools] == ["multiply"]
    with pytest.raises(ValueError, match="tool 'nowhere:thing'"):
        GRPOTrainer(model=starter_model_path("multiply"), reward_funcs=[lambda completions, **k: [0.0]],
                    args=config(tmp_path / "c", task=None, tools=["nowhere:thing"]), train_dataset=ds)


def test_the_guess_environment_task_trains_on_its_own_reward(tmp_path):
    """The built-in environment task: GuessTheNumber's `guess` tool answers higher/lower/correct,
    its get_reward() is the reward (fewer guesses, more reward); every conversation of a group
    plays the same secret."""
    trainer = GRPOTrainer(args=config(tmp_path, task="guess", max_steps=1, max_completion_length=320,
                                      task_num_eval=7))
    assert trainer.parts.model_name.endswith("(starter-guess)")
    assert trainer.reward_func_names == ["GuessTheNumber"] and [t.__name__ for t in trainer.tools] == ["guess"]
    trainer.train()
    envs = trainer.environments
    assert len(envs) == 16 and len({e.secret for e in envs[:8]}) == 1 and len({e.secret for e in envs[8:]}) == 1
    assert all(e.guesses >= 1 for e in envs)
    rewards = [e.get_reward() for e in envs]
    assert all(r == (max(0.2, 1.0 - 0.2 * (e.guesses - 1)) if e.solved else 0.0) for r, e in zip(rewards, envs))
    log = [e for e in trainer.state.log_history if "rewards/GuessTheNumber/mean" in e]
    assert log and log[0]["rewards/GuessTheNumber/mean"] == pytest.approx(sum(rewards) / len(rewards))
    assert log[0]["turns/mean"] > 1.5  # several guesses per game


def test_draft_tokens_train_the_same_conversations(tmp_path):
    """draft_tokens=4 (n-gram drafts checked in the decode step): the same sampled conversations,
    rewards and losses as one token per step, in fewer decode forwards; said in the summary."""
    logs, steps = {}, {}
    for k in (0, 4):
        trainer = GRPOTrainer(args=config(tmp_path / str(k), max_steps=3, draft_tokens=k))
        assert ("draft tokens per completion" in trainer.parts.summary()) == bool(k)
        engine = trainer.parts.engine
        forwards = []
        generate = engine.generate_multiturn

        def counted(*a, engine=engine, generate=generate, forwards=forwards, **kw):
            generate(*a, **kw)
            forwards.append(engine.stats["steps"])

        engine.generate_multiturn = counted
        trainer.train()
        logs[k] = [{key: e[key] for key in ("reward", "loss", "completions/mean_length") if key in e}
                   for e in trainer.state.log_history if "reward" in e]
        steps[k] = sum(forwards)
    assert logs[4] == logs[0] and len(logs[0]) == 3
    assert steps[4] < steps[0]
    logged = [e for e in trainer.state.log_history if "rollout/decode_forwards" in e]  # the draft_tokens=4 run
    kept = [e["rollout/draft_kept"] for e in logged if "rollout/draft_kept" in e]  # the steps that drafted
    assert len(logged) == 3 and all(0 <= k <= 1 for k in kept) and max(kept) > 0.5


def test_draft_tokens_need_grpokits_engine():
    with pytest.raises(ValueError, match="draft_tokens=4 drafts in grpokit's engine"):
        GRPOConfig(output_dir="x", use_cpu=True, draft_tokens=4, rollout_engine="hf-generate")
    with pytest.raises(ValueError, match="draft_tokens must be >= 0"):
        GRPOConfig(output_dir="x", use_cpu=True, draft_tokens=-1)


def test_draft_tokens_resume_exactly(tmp_path):
    """The drafter's memory of the last step's completions travels in the checkpoint: the resumed
    run drafts as the straight one (the same decode forwards per step) and ends in the same weights."""
    def run(name, resume=None):
        trainer = GRPOTrainer(args=config(tmp_path / name, max_steps=4, draft_tokens=4, save_strategy="steps",
                                          save_steps=2))
        engine, forwards = trainer.parts.engine, []
        generate = engine.generate_multiturn

        def counted(*a, **kw):
            generate(*a, **kw)
            forwards.append(engine.stats["steps"])

        engine.generate_multiturn = counted
        trainer.train(resume_from_checkpoint=resume)
        return trainer, forwards

    straight, forwards = run("a")
    checkpoint = tmp_path / "a" / "run" / "checkpoint-2"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["pipeline"]["ranks"][0]["engine"]["drafter"]["pool"]
    resumed, resumed_forwards = run("b", resume=str(checkpoint))
    assert resumed_forwards == forwards[2:]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_leaves_the_drafters_memory_as_it_was(tmp_path):
    """The drafter recalls the last training step's completions; an evaluation (greedy, other
    prompts) in between does not replace them."""
    trainer = GRPOTrainer(args=config(tmp_path, max_steps=1, draft_tokens=4))
    trainer.train()
    engine = trainer.parts.engine
    before = engine.state_dict()
    assert before["drafter"]["pool"]
    trainer.parts.log_eval(1)
    assert engine.stats["steps"] > 0 and engine.state_dict() == before
