"""A rollout_func's log-probs are the sampler's, not the old policy's (TRL's meaning): with
several updates per generated batch the old log-probs come from the trainer's forward, so what
the rollout_func reports cannot change the update; only a run that declares them the trainer's own
(forward_plan old_logps='sampler') trains on them."""

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.rollout import SamplingParams
from tests.helpers import make_char_tokenizer, make_tiny_model

# every test here trains
pytestmark = pytest.mark.train

G = 4


def reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def train(tmp_path, name, logprobs: str, forward_plan=None):
    """Two optimizer steps on one generated batch (num_iterations=2); the rollout_func samples
    with the trainer's own engine and reports `logprobs`: 'engine' (the engine's, i.e. the
    trainer's own), 'zeros' or 'garbage'."""
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="llama", seed=3)
    seen = {}

    def rollout(prompts, trainer):
        run = trainer.parts
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[::G]]
        outs = run.engine.generate(ids, n=G, params=SamplingParams(max_tokens=4, temperature=1.0, seed=11))
        comps = [list(o.token_ids) for o in outs]
        lps = {"engine": [list(o.logprobs) for o in outs], "zeros": [[0.0] * len(c) for c in comps],
               "garbage": [[-7.5] * len(c) for c in comps]}[logprobs]
        seen["summary"] = run.summary()
        return {"prompt_ids": [ids[o.prompt_index] for o in outs], "completion_ids": comps, "logprobs": lps}

    cfg = GRPOConfig(output_dir=str(tmp_path / name), max_steps=2, num_iterations=2, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, num_generations=G, max_completion_length=4, learning_rate=5e-2,
                     use_cpu=True, disable_tqdm=True, plot=False, save_strategy="no", seed=0, loss_type="grpo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok, rollout_func=rollout,
                          train_dataset=Dataset.from_dict({"prompt": ["ab", "cd"]}), forward_plan=forward_plan)
    plan = trainer.parts.plan.old_logps
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}, plan, trainer.parts.summary()


def test_the_old_logprobs_come_from_the_trainer_whatever_the_rollout_func_reports(tmp_path):
    zeros, plan, summary = train(tmp_path, "zeros", "zeros")
    garbage, _, _ = train(tmp_path, "garbage", "garbage")
    assert plan == "recomputed" and "old policy's log-probs come from the trainer's forward" in summary
    assert all(torch.equal(zeros[k], garbage[k]) for k in zeros)  # the reported log-probs changed nothing


def test_log_probs_declared_the_trainers_own_stand_in_for_the_old_ones(tmp_path):
    recomputed, _, _ = train(tmp_path, "recomputed", "engine")
    declared, plan, summary = train(tmp_path, "declared", "engine", forward_plan={"old_logps": "sampler"})
    assert plan == "sampler" and "declared the trainer's own" in summary
    # the engine samples from the trainer's weights in fp32: its log-probs are the trainer's to ~1e-6,
    # so the weights agree to far less than one step moves them (Adam: ~lr = 5e-2 per weight)
    def gap(a):
        return max(float((a[k] - recomputed[k]).abs().max()) for k in recomputed)

    assert gap(declared) < 1e-4
    # ... and the declaration is honoured: wrong log-probs declared as the trainer's move the update
    wrong, _, _ = train(tmp_path, "wrong", "zeros", forward_plan={"old_logps": "sampler"})
    assert gap(wrong) > 1e-2, gap(wrong)


def test_a_replaced_generate_samples_and_the_old_logprobs_are_the_trainers(tmp_path):
    """A model.generate replaced on the instance samples (as TRL samples through model.generate);
    its scores are that generate's, so they never stand in for the old policy's: a wrapper that
    flattens the scores trains exactly as one that leaves them alone."""

    def run(name, flatten: bool):
        tok = make_char_tokenizer()
        model = make_tiny_model(tok, arch="llama", seed=3)
        inner = model.generate
        calls = []

        def wrapped(*args, **kwargs):
            calls.append(1)
            out = inner(*args, **kwargs)
            if flatten and getattr(out, "scores", None) is not None:
                out.scores = tuple(torch.zeros_like(s) for s in out.scores)  # log-probs -log(V): not the model's
            return out

        cfg = GRPOConfig(output_dir=str(tmp_path / name), max_steps=2, num_iterations=2,
                         per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=G,
                         max_completion_length=4, learning_rate=5e-2, use_cpu=True, disable_tqdm=True, plot=False,
                         save_strategy="no", seed=0, loss_type="grpo")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": ["ab", "cd"]}))
        assert trainer.parts.plan.old_logps == "sampler"  # grpokit's engine: its log-probs are the trainer's
        model.generate = wrapped
        trainer.train()
        assert calls and trainer.parts.plan.old_logps == "recomputed"
        assert "generate() was replaced" in trainer.parts.summary()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    plain, flat = run("plain", False), run("flat", True)
    assert all(torch.equal(plain[k], flat[k]) for k in plain)


def test_a_rollout_func_s_token_ids_and_logprob_lengths_are_checked(tmp_path):
    import pytest

    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="llama")
    vocab = model.get_input_embeddings().num_embeddings
    cases = [({"completion_ids": [[5, vocab]]}, f"token id {vocab} in completion_ids"),
             ({"prompt_ids": [[-1]]}, "token id -1 in prompt_ids"),
             ({"logprobs": [[0.0]]}, r"logprobs\[0\] has 1 values for 2 completion tokens")]
    for i, (bad, message) in enumerate(cases):
        def rollout(prompts, trainer, bad=bad):
            out = {"prompt_ids": [[5]], "completion_ids": [[5, 6]], "logprobs": [[0.0, 0.0]], **bad}
            return {k: v * len(prompts) for k, v in out.items()}

        cfg = GRPOConfig(output_dir=str(tmp_path / str(i)), max_steps=1, per_device_train_batch_size=4,
                         num_generations=G, max_completion_length=4, use_cpu=True, disable_tqdm=True, plot=False,
                         save_strategy="no")
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, processing_class=tok, rollout_func=rollout,
                              train_dataset=Dataset.from_dict({"prompt": ["ab"]}))
        with pytest.raises(ValueError, match=message):
            trainer.train()
