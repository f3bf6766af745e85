"""End to end: the PPO and DPO baselines raise the reward of a tiny model built in the test, on the
same engine, rewards and logs as GRPO; DPO also from a preference dataset; LoRA references; clear
errors before anything is trained."""

import json
import os

import pytest
import torch
from datasets import Dataset

from grpokit.baselines.dpo import DPOConfig, DPOTrainer
from grpokit.baselines.ppo import PPOConfig, PPOTrainer
from grpokit.rollout import SamplingParams
from tests.helpers import digit_first, make_tiny_llama, prompts_ds

# models of 27k parameters run faster on one thread (and do not fight other jobs for cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def base(tmp_path, **over):
    cfg = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=32, gradient_accumulation_steps=1,
               num_generations=8, max_completion_length=3, learning_rate=3e-2, lr_scheduler_type="constant",
               logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False, seed=1)
    return {**cfg, **over}


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def mean_reward(rows, steps):
    values = [r["reward"] for r in rows if "reward" in r and r["step"] in steps]
    return sum(values) / len(values)


def digit_rate(trainer, n=64):
    """Fraction of sampled completions that start with a digit (the reward), from the run's engine."""
    run = trainer.parts
    outs = run.engine.generate([run.train.prompt_ids[i] for i in range(n // 8)], n=8,
                               params=SamplingParams(max_tokens=3, temperature=1.0, seed=123))
    return sum(o.text[:1].isdigit() for o in outs) / len(outs)


@pytest.mark.train
def test_ppo_raises_the_reward(tmp_path):
    model, tok = make_tiny_llama()
    cfg = PPOConfig(**base(tmp_path, max_steps=8, num_ppo_epochs=2))
    trainer = PPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                         processing_class=tok)
    trainer.train()
    rows = metrics(cfg.output_dir)
    first, last = mean_reward(rows, {1, 2}), mean_reward(rows, {7, 8})
    assert first < 0.4 and last > first + 0.3, (first, last)
    # the parts PPO adds: a value head of hidden + 1 parameters, a frozen reference copy; they are logged
    assert rows[0]["params/extra_trainable"] == 32 + 1
    assert rows[0]["params/reference"] == sum(p.numel() for p in model.parameters())
    step_rows = [r for r in rows if "reward" in r]
    assert step_rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)     # the policy starts as the reference
    assert any(abs(r["kl"]) > 1e-3 for r in step_rows[1:])         # and moves away from it
    assert all(r["samples"] == 32 * r["step"] for r in step_rows)
    assert os.path.exists(os.path.join(cfg.output_dir, "final", "value_head.pt"))


@pytest.mark.train
def test_online_dpo_raises_the_reward(tmp_path):
    model, tok = make_tiny_llama()
    cfg = DPOConfig(**base(tmp_path, max_steps=12))
    trainer = DPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                         processing_class=tok)
    trainer.train()
    rows = [r for r in metrics(cfg.output_dir) if "reward" in r]
    first, last = mean_reward(rows, {1, 2, 3}), mean_reward(rows, {10, 11, 12})
    assert first < 0.4 and last > first + 0.3, (first, last)
    # at most one pair per group of 8, and only from groups with a spread
    assert all(0 <= r["dpo/pairs"] <= 4 for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3) or rows[0]["dpo/pairs"] == 0  # log 2: policy == ref


@pytest.mark.train
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_offline_dpo_on_a_preference_dataset(tmp_path, loss_type):
    model, tok = make_tiny_llama()
    n = 32
    data = Dataset.from_dict({"prompt": [f"q{i}:" for i in range(n)], "chosen": [str(i % 10) for i in range(n)],
                              "rejected": ["ab"[i % 2] for i in range(n)]})
    cfg = DPOConfig(**base(tmp_path, max_steps=6, per_device_train_batch_size=8, loss_type=loss_type, beta=0.5))
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
    before = digit_rate(trainer)
    trainer.train()
    after = digit_rate(trainer)
    rows = [r for r in metrics(cfg.output_dir) if "loss" in r]
    assert len(rows) == 6 and all(r["dpo/pairs"] == 8 for r in rows)
    assert rows[-1]["dpo/margin"] > rows[0]["dpo/margin"] and rows[-1]["dpo/accuracy"] == 1.0
    assert after > before + 0.3, (before, after)


@pytest.mark.train
def test_ppo_and_dpo_with_lora_use_the_adapter_off_as_reference(tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model, tok = make_tiny_llama()
    cfg = PPOConfig(**base(tmp_path, max_steps=2, num_ppo_epochs=1, output_dir=str(tmp_path / "ppo")))
    ppo = PPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                     processing_class=tok, peft_config=lora)
    assert ppo.parts.ref_model is None and ppo.param_counts["params/reference"] == 0
    ppo.train()
    rows = [r for r in metrics(cfg.output_dir) if "reward" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[1]["kl"] != 0.0
    model, tok = make_tiny_llama()
    cfg = DPOConfig(**base(tmp_path, max_steps=1, output_dir=str(tmp_path / "dpo")))
    dpo = DPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                     processing_class=tok, peft_config=lora)
    assert dpo.parts.ref_model is None
    dpo.train()


@pytest.mark.train
def test_config_errors_name_the_field_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="cliprange"):
        PPOConfig(epsilon=0.3)
    with pytest.raises(ValueError, match="kl_coef"):
        PPOConfig(beta=0.1)
    with pytest.raises(ValueError, match="vf_coef"):
        PPOConfig(vf_coeff=0.5)
    with pytest.raises(ValueError, match="num_ppo_epochs"):
        PPOConfig(num_ppo_epochs=0)
    with pytest.raises(ValueError, match="sigmoid"):
        DPOConfig(loss_type="dapo")
    with pytest.raises(ValueError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    cfg = PPOConfig(vf_coef="5e-1", kl_coef=0.0)   # YAML 1.1 reads 5e-1 as a string
    assert cfg.vf_coef == 0.5 and cfg.kl_estimator == "k1" and cfg.disable_dropout
    assert cfg.replace(gamma=0.9).to_dict() == {**cfg.to_dict(), "gamma": 0.9}
    assert DPOConfig(loss_type="ipo").replace(beta=0.2).loss_type == "ipo"
    model, tok = make_tiny_llama()
    half = Dataset.from_dict({"prompt": ["a", "b"], "chosen": ["1", "2"]})
    with pytest.raises(ValueError, match="rejected"):
        DPOTrainer(model=model, args=DPOConfig(**base(tmp_path)), train_dataset=half, processing_class=tok)
    assert not os.path.exists(tmp_path / "run")
    with pytest.raises(ValueError, match="resum"):
        PPOTrainer(model=model, reward_funcs=digit_first, args=PPOConfig(**base(tmp_path, max_steps=1)),
                   train_dataset=prompts_ds(), processing_class=tok).train(resume_from_checkpoint=True)


@pytest.mark.train
@pytest.mark.slow
def test_compare_runs_the_three_and_writes_the_report(tmp_path):
    """`grpokit compare` end to end on a tiny saved model, in this process (isolate=false: fast to
    start) over two seeds, then the default isolated path (one worker process per run) once."""
    from grpokit.cli import main
    from grpokit.models import save_model

    model, tok = make_tiny_llama()
    save_model(model, tok, tmp_path / "model")
    argv = [f"model_name_or_path={tmp_path / 'model'}", "max_steps=2", "eval_steps=2", "task_num_train=64",
            "task_num_eval=16", "per_device_train_batch_size=16", "gradient_accumulation_steps=1",
            f"output_dir={tmp_path / 'runs'}", f"report_dir={tmp_path / 'report'}"]
    assert main(["compare", *argv, "ppo={num_ppo_epochs: 2}", "isolate=false", "seeds=[1,2]"]) == 0
    report = (tmp_path / "report" / "README.md").read_text()
    for algo in ("GRPO", "PPO", "DPO"):
        assert f"| {algo} |" in report
    assert "num_ppo_epochs=2" in report and "grpokit compare model_name_or_path=" in report
    assert "seeds 1, 2" in report
    for png in ("curves.png", "cost.png"):
        assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert sorted(summary["results"]) == [f"{a}/seed{s}" for a in ("dpo", "grpo", "ppo") for s in (1, 2)]
    assert summary["results"]["ppo/seed1"]["params"]["params/extra_trainable"] == 33
    assert summary["results"]["ppo/seed2"]["optimizer_steps_per_step"] == 2
    assert summary["results"]["grpo/seed1"]["params"]["params/reference"] == 0
    assert all(summary["summary"][a]["samples_total"] == 2 * 16 for a in ("grpo", "ppo", "dpo"))
    assert len(summary["summary"]["dpo"]["acc_after_each"]) == 2
    assert (tmp_path / "runs" / "ppo" / "seed2" / "metrics.jsonl").exists()
    # the default: each run in its own process (peak memory is its own)
    assert main(["compare", *argv, "algos=[dpo]", "seed=3", "max_steps=1", "eval_on_start=false",
                 "eval_strategy='no'", f"report_dir={tmp_path / 'report1'}"]) == 0
    summary = json.loads((tmp_path / "report1" / "summary.json").read_text())
    assert list(summary["results"]) == ["dpo/seed3"] and summary["machine"]["isolated"]


def test_compare_checks_every_config_before_running(tmp_path):
    from grpokit.compare.run import plan

    with pytest.raises(ValueError, match="cliprange"):
        plan({"ppo": {"epsilon": 0.3}, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="algos"):
        plan({"algos": ["grpo", "a2c"]})
    with pytest.raises(ValueError, match="seeds"):
        plan({"seeds": [1, 1]})
    options, configs = plan({"algos": ["grpo", "dpo"], "learning_rate": 1e-3, "dpo": {"beta": 0.5},
                             "seeds": [5, 6], "output_dir": str(tmp_path / "runs")})
    assert list(configs) == [("grpo", 5), ("dpo", 5), ("grpo", 6), ("dpo", 6)]   # seed by seed
    assert configs[("dpo", 6)]["beta"] == 0.5 and configs[("dpo", 6)]["seed"] == 6
    assert configs[("grpo", 5)]["learning_rate"] == configs[("dpo", 5)]["learning_rate"] == 1e-3
    assert not os.path.exists(options["output_dir"])


@pytest.mark.parametrize("packed", [True, False])
def test_ppo_forward_gives_the_training_logprobs_and_values_from_the_same_hidden_states(tmp_path, packed):
    """The one training forward with PPO's value head (core.forward.completion_logprobs(value_head=)):
    the logprobs are those without it (packed and padded layouts), the values value_head(hidden)
    at the position that predicts each token."""
    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs

    model, tok = make_tiny_llama()
    trainer = PPOTrainer(model=model, reward_funcs=digit_first, args=PPOConfig(**base(tmp_path, max_steps=1)),
                         train_dataset=prompts_ds(), processing_class=tok)
    run = trainer.parts
    rows, _, _ = run.order.next_rows(0, 0)
    rollout = run.sample(rows, seed=0)
    mb = make_micro_batches(rollout, 32, pad_id=run.pad_id, device=run.device, mask_truncated=False)[0]
    torch.nn.init.normal_(trainer.value_head.summary.weight)
    with torch.no_grad():
        logps, _, values = completion_logprobs(run.model, mb, temperature=0.7, packed=packed,
                                               value_head=trainer.value_head)
        expected = completion_logprobs(run.model, mb, temperature=0.7, packed=packed)[0]
        hidden = run.model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                                 position_ids=mb.position_ids).last_hidden_state
    p = mb.prompt_width
    mask = mb.completion_mask.bool()
    assert torch.allclose(logps[mask], expected[mask], atol=1e-5)
    for i in range(3):                       # row i, token t: the hidden state at p - 1 + t
        for t in range(int(mask[i].sum())):
            assert torch.allclose(values[i, t], trainer.value_head(hidden[i, p - 1 + t]), atol=1e-5)
