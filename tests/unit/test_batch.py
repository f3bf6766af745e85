"""batch.py: micro-batches, and the trainer doing no redundant logprob work (old logprobs only
when num_iterations > 1, taken from the sampler when exact; reference only when beta > 0, from
the same weights with the adapter off under LoRA), plus the per-phase time/memory metrics."""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch

from grpokit.core.batch import make_micro_batches
from grpokit.core.forward import completion_logprobs, sampler_logps_are_old_logps
from grpokit.trajectory import Trajectories
from tests.helpers import make_char_tokenizer, make_tiny_model, random_rollout, tiny_trainer, instrument


def rollout_of(prompts, comps, truncated=None):
    n = len(prompts)
    return Trajectories(row_index=list(range(n)), prompts=[None] * n, completions=[None] * n, prompt_ids=prompts,
                        completion_ids=comps, sampling_logps=[[-0.5 * (j + 1) for j in range(len(c))] for c in comps],
                        truncated=torch.tensor(truncated or [False] * n))


def test_micro_batches_pad_each_to_its_own_longest():
    ro = rollout_of([[5, 6], [5, 6], [7], [7]], [[1, 2, 3], [4], [8, 9], [10]], truncated=[False, True, False, False])
    mbs = make_micro_batches(ro, 2, pad_id=0, device="cpu", mask_truncated=True, advantages=torch.arange(4.0))
    assert [mb.rows for mb in mbs] == [slice(0, 2), slice(2, 4)]
    first, second = mbs
    assert first.completion_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert first.completion_mask.tolist() == [[1, 1, 1], [0, 0, 0]]  # row 1 truncated and masked
    assert first.sampling_logps.tolist() == [[-0.5, -1.0, -1.5], [-0.5, 0.0, 0.0]]
    assert second.completion_ids.tolist() == [[8, 9], [10, 0]] and second.advantages.tolist() == [2.0, 3.0]
    # the padded layout (built on demand): prompts left-padded, completions right-padded
    ro2 = rollout_of([[5, 6], [7]], [[1], [2, 3]])
    mb = make_micro_batches(ro2, 2, pad_id=0, device="cpu", mask_truncated=False)[0]
    assert mb.input_ids.tolist() == [[5, 6, 1, 0], [0, 7, 2, 3]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    assert mb.prompt_width == 2
    with pytest.raises(ValueError, match="empty prompt"):
        make_micro_batches(rollout_of([[]], [[1]]), 1, pad_id=0, device="cpu", mask_truncated=False)


def test_merged_micro_batches_fit_the_padded_budget_and_give_the_same_gradients():
    model = make_tiny_model(make_char_tokenizer(), arch="llama")
    rollout = random_rollout(g=4, n_prompts=4, seed=2, max_prompt=10, max_completion=8)
    plain = make_micro_batches(rollout, 4, pad_id=0, device="cpu", mask_truncated=False)
    merged = make_micro_batches(rollout, 4, pad_id=0, device="cpu", mask_truncated=False, merge=True)
    assert len(merged) < len(plain)
    for mb in merged:  # each merged forward holds no more tokens than one plain padded micro-batch
        budget = max(m.input_ids.numel() for m in plain if mb.rows.start <= m.rows.start < mb.rows.stop)
        assert mb.layout().targets.numel() + mb.layout().num_prompt_tokens <= budget
    w = torch.randn(len(rollout.completion_ids), 8, generator=torch.Generator().manual_seed(0))

    def grads(mbs):
        model.zero_grad(set_to_none=True)
        for mb in mbs:
            logps, _ = completion_logprobs(model, mb, temperature=0.9)
            (logps * w[mb.rows, :logps.shape[1]] * mb.completion_mask).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(plain), grads(merged)):
        torch.testing.assert_close(a, b)


def test_sampler_logprobs_equal_the_trainers(tmp_path):
    """The measurement behind reusing them: sampler vs training forward, fp32, T = 1 and 0.7."""
    for temperature in (1.0, 0.7):
        run = tiny_trainer(tmp_path, temperature=temperature).parts
        rollout = run.sample(list(range(4)), seed=0)
        assert sampler_logps_are_old_logps(run.model, run.engine, temperature=temperature)
        with torch.no_grad():
            for mb in make_micro_batches(rollout, 8, pad_id=run.pad_id, device="cpu", mask_truncated=False):
                logps, _ = completion_logprobs(run.model, mb, temperature=temperature)
                err = ((logps - mb.sampling_logps) * mb.completion_mask).abs().max()
                assert err < 1e-5, err
                assert mb.completion_mask.sum() > 8


def test_sampler_logprobs_are_not_reused_when_they_differ(tmp_path):
    run = tiny_trainer(tmp_path).parts
    ok = dict(temperature=1.0)
    assert sampler_logps_are_old_logps(run.model, run.engine, **ok)
    assert not sampler_logps_are_old_logps(run.model, run.engine, temperature=1.0, top_p=0.9)
    assert not sampler_logps_are_old_logps(run.model, run.engine, temperature=1.0, top_k=5)
    assert not sampler_logps_are_old_logps(run.model, run.engine, temperature=1.0, min_p=0.1)
    assert not sampler_logps_are_old_logps(run.model, run.engine, temperature=0.0)
    vllm_like = SimpleNamespace(model=run.engine.model, capabilities=dataclasses.replace(
        run.engine.capabilities, sampler_differs_from_trainer=True))  # samples its own copy of the weights
    assert not sampler_logps_are_old_logps(run.model, vllm_like, **ok)
    other = make_tiny_model(make_char_tokenizer(), arch="qwen2", max_positions=64)
    assert not sampler_logps_are_old_logps(other, run.engine, **ok)  # the engine samples another model
    dropout = tiny_trainer(tmp_path, model=make_tiny_model(make_char_tokenizer(), arch="qwen2", max_positions=64,
                                                           attention_dropout=0.1)).parts
    assert not sampler_logps_are_old_logps(dropout.model, dropout.engine, **ok)
    run.model.to(torch.bfloat16)
    assert not sampler_logps_are_old_logps(run.model, run.engine, **ok)


def count_forwards(run):
    calls = []
    original = run.train_forward

    def counted(mb, **kw):
        calls.append(torch.is_grad_enabled())
        return original(mb, **kw)

    instrument(run, train_forward=counted)
    return calls


@pytest.mark.train
@pytest.mark.parametrize("num_iterations,top_p,no_grad_forwards", [(1, 1.0, 0), (2, 1.0, 0), (2, 0.9, 2)])
def test_old_logprobs_only_when_needed(tmp_path, num_iterations, top_p, no_grad_forwards):
    """2 micro-batches a step (grpo loss: not merged): training forwards with gradients only,
    unless num_iterations > 1 and the sampler's logprobs cannot stand in (top_p < 1): then one
    no-grad forward each."""
    trainer = tiny_trainer(tmp_path, max_steps=num_iterations, num_iterations=num_iterations, top_p=top_p,
                           loss_type="grpo")
    calls = count_forwards(trainer.parts)
    trainer.train()
    assert calls.count(False) == no_grad_forwards
    assert calls.count(True) == 2 * num_iterations


@pytest.mark.train
def test_additive_losses_merge_micro_batches_into_fewer_forwards(tmp_path):
    """dapo (global normaliser): with a shared 22-character preamble, the 2 micro-batches of 8
    completions (2 groups each) packed (4 prompts once + 16 completions <= 24 + 16 * 6 tokens)
    fit one padded micro-batch's tokens (8 * (27 + 6)), so one forward per step; the same trained
    weights as without the merge (dapo is a plain sum over micro-batches)."""
    preamble = "You are a calculator. "
    trainer = tiny_trainer(tmp_path, max_steps=2, loss_type="dapo", prefix=preamble)
    calls = count_forwards(trainer.parts)
    trainer.train()
    assert calls == [True, True] and trainer.parts.plan.merge
    assert "micro-batches merged" in trainer.parts.summary()
    merged = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    unmerged_trainer = tiny_trainer(tmp_path, max_steps=2, loss_type="dapo", output_dir=str(tmp_path / "b"),
                                    prefix=preamble, forward_plan={"merge": False})
    assert "micro-batches merged" not in unmerged_trainer.parts.summary()
    calls = count_forwards(unmerged_trainer.parts)
    unmerged_trainer.train()
    assert calls == [True] * 4
    for k, v in unmerged_trainer.model.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=1e-4, atol=1e-5)


@pytest.mark.train
def test_reference_only_when_beta_and_lora_reference_is_the_base(tmp_path):
    from peft import LoraConfig

    trainer = tiny_trainer(tmp_path, max_steps=1, loss_type="grpo")
    assert trainer.parts.ref_model is None  # beta = 0: no reference loaded
    calls = count_forwards(trainer.parts)
    trainer.train()
    assert calls == [True, True]

    tok = make_char_tokenizer()
    base = make_tiny_model(tok, arch="qwen2", max_positions=64)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = tiny_trainer(tmp_path, model=make_tiny_model(tok, arch="qwen2", max_positions=64), peft_config=lora,
                           beta=0.1, max_steps=1, output_dir=str(tmp_path / "lora"))
    run = trainer.parts
    assert run.ref_model is None and run.is_peft  # no second copy
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    from grpokit.core.loop import add_fixed_logprobs

    rollout = run.sample(list(range(4)), seed=1)
    mbs = make_micro_batches(rollout, 8, pad_id=run.pad_id, device="cpu", mask_truncated=False)
    add_fixed_logprobs(run, mbs)
    for mb in mbs:
        with torch.no_grad():
            expected = completion_logprobs(base, mb, temperature=1.0)[0]
            policy = completion_logprobs(run.model, mb, temperature=1.0)[0]
        m = mb.completion_mask
        torch.testing.assert_close(mb.ref_logps * m, expected * m)
        assert not torch.allclose(policy * m, expected * m, atol=1e-3)  # the adapter is on outside the context
        assert mb.old_logps is None


@pytest.mark.train
def test_phase_times_and_peak_memory_are_logged(tmp_path):
    trainer = tiny_trainer(tmp_path, max_steps=2)
    trainer.train()
    rows = [json.loads(line) for line in open(os.path.join(trainer.args.output_dir, "metrics.jsonl"))]
    step = [r for r in rows if r.get("step") == 2 and "time/step" in r][0]
    for phase in ("generate", "reward", "logprobs", "backward", "optimizer"):
        assert step[f"time/{phase}"] >= 0
        assert 0.05 < step[f"memory/{phase}_peak_gb"] <= step["memory/peak_rss_gb"] + 1e-6
    assert step["time/step"] == pytest.approx(sum(step[f"time/{p}"] for p in
                                                  ("generate", "reward", "logprobs", "backward", "optimizer")))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("with_old", [False, True])
def test_zero_advantage_rows_are_skipped_with_the_same_loss_and_gradients(loss_type, with_old):
    """beta = 0: a completion with advantage 0 adds 0 to every policy loss and its gradient, so
    the packed forward leaves it out (groups 1 and 3 have all-equal rewards here); the masks, and
    so the normalisers, stay. Same loss and parameter gradients as computing every row."""
    from grpokit.algos import policy_loss
    model = make_tiny_model(make_char_tokenizer(), arch="qwen2")
    rollout = random_rollout(g=4, n_prompts=4, seed=4)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(4))
    advantages[4:8] = 0.0
    advantages[12:16] = 0.0
    advantages[1] = 0.0  # a single zero inside a group
    with torch.no_grad():  # "old" logprobs near the current ones: ratios near 1
        mb = make_micro_batches(rollout, 16, pad_id=0, device="cpu", mask_truncated=False)[0]
        now = completion_logprobs(model, mb, temperature=1.0)[0] + 0.05 * torch.randn(mb.completion_ids.shape)
    rollout = dataclasses.replace(rollout, sampling_logps=[now[i, :len(c)].tolist()
                                                           for i, c in enumerate(rollout.completion_ids)])
    num_items = float(sum(len(c) for c in rollout.completion_ids))

    def run(skip):
        model.zero_grad(set_to_none=True)
        mbs = make_micro_batches(rollout, 8, pad_id=0, device="cpu", mask_truncated=False,
                                 advantages=advantages, skip_zero_advantage=skip)
        total = 0.0
        for mb in mbs:
            logps, _ = completion_logprobs(model, mb, temperature=1.0)
            loss, stats = policy_loss(logps, mb.sampling_logps if with_old else None, mb.advantages,
                                      mb.completion_mask, loss_type=loss_type, max_completion_length=9,
                                      num_items_in_batch=num_items, num_sequences=16.0)
            loss.backward()
            total += float(loss)
            assert 0.8 < float(stats["ratio_mean"]) < 1.25  # skipped rows have ratio 1, not exp(0 - old)
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}, mbs

    loss_all, grads_all, _ = run(False)
    loss_skip, grads_skip, mbs = run(True)
    assert loss_skip == pytest.approx(loss_all, rel=1e-5, abs=1e-7)
    for name in grads_all:
        torch.testing.assert_close(grads_skip[name], grads_all[name], msg=lambda m, n=name: f"{n}: {m}")
    computed = sum(int(mb.layout().targets.numel()) for mb in mbs)
    expected = sum(len(c) for c, a in zip(rollout.completion_ids, advantages.tolist()) if a != 0)
    assert computed == expected  # the 9 zero-advantage completions were not computed


@pytest.mark.train
def test_trainer_skips_all_equal_groups_only_without_kl(tmp_path):
    """A constant reward gives every advantage 0: with beta = 0 the training forward computes no
    completion token (and the weights do not move); with beta > 0 the KL term needs them all."""
    def constant(prompts, completions, **kw):
        return [1.0] * len(completions)

    for beta, expect_tokens in ((0.0, False), (0.1, True)):
        trainer = tiny_trainer(tmp_path, reward=constant, max_steps=1, beta=beta, output_dir=str(tmp_path / f"b{beta}"))
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        seen = []
        original = trainer.parts.train_forward

        def forward(mb, *, _original=original, _seen=seen, **kw):  # this iteration's trainer and list
            out = _original(mb, **kw)
            if torch.is_grad_enabled():
                _seen.append(int(mb.layout().targets.numel()))
            return out

        instrument(trainer.parts, train_forward=forward)
        trainer.train()
        assert seen and (min(seen) > 0) == expect_tokens, seen
        if not expect_tokens:
            for k, v in trainer.model.state_dict().items():
                assert torch.equal(v, before[k]), k


def test_a_micro_batch_with_every_row_skipped_under_lora_has_a_graph():
    """LoRA (the lm_head frozen), one rank: a micro-batch whose completions all have advantage 0
    computes nothing, and its zero logprobs are tied to a trained parameter, so the loss's
    backward runs (and gives the adapter a zero gradient) instead of raising."""
    from peft import LoraConfig, get_peft_model

    from grpokit.algos import policy_loss
    model = get_peft_model(make_tiny_model(make_char_tokenizer(), arch="qwen2"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rollout = random_rollout(g=4, n_prompts=1, seed=6)
    mb = make_micro_batches(rollout, 4, pad_id=0, device="cpu", mask_truncated=False,
                            advantages=torch.zeros(4), skip_zero_advantage=True)[0]
    assert mb.layout().targets.numel() == 0
    logps, _ = completion_logprobs(model, mb, temperature=1.0)
    loss, _ = policy_loss(logps, None, mb.advantages, mb.completion_mask, loss_type="dapo",
                          max_completion_length=9, num_items_in_batch=float(mb.completion_mask.sum()),
                          num_sequences=4.0)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and not g.any() for g in grads[:1])


@pytest.mark.parametrize("why", ["zero_advantage", "truncated"])
def test_a_micro_batch_with_nothing_to_train_still_runs_the_whole_model(why):
    """Several ranks (never_empty=True): a micro-batch whose rows are all out of the forward
    (advantage 0 with skipping on, or masked as truncated) keeps its shortest row in it, so every
    parameter gets a gradient (the same DDP reduction / FSDP2 gathers as the other ranks), and
    that gradient is exactly 0. pad_micro_batches adds zero-weight micro-batches the same way."""
    from grpokit.algos import policy_loss
    from grpokit.core.batch import pad_micro_batches
    model = make_tiny_model(make_char_tokenizer(), arch="qwen2")
    rollout = random_rollout(g=4, n_prompts=2, seed=5)
    advantages = torch.randn(len(rollout), generator=torch.Generator().manual_seed(5))
    if why == "zero_advantage":
        advantages[:] = 0.0
    else:
        rollout.truncated[:] = True
    kw = dict(pad_id=0, device="cpu", mask_truncated=True, skip_zero_advantage=True, merge=True, advantages=advantages)
    alone = make_micro_batches(rollout, 4, **kw)
    assert all(mb.layout().targets.numel() == 0 for mb in alone)  # one process: nothing computed
    mbs = make_micro_batches(rollout, 4, never_empty=True, **kw)
    shortest = min(len(c) for c in rollout.completion_ids[mbs[0].rows])
    assert mbs[0].layout().targets.numel() == shortest  # one row computed: the shortest
    mbs = pad_micro_batches(mbs, len(mbs) + 2)
    assert mbs[-1].completion_mask.sum() == 0 and mbs[-1].layout().targets.numel() > 0
    for mb in mbs:
        model.zero_grad(set_to_none=True)
        logps, _ = completion_logprobs(model, mb, temperature=1.0)
        loss, _ = policy_loss(logps, None, mb.advantages, mb.completion_mask, loss_type="dapo",
                              max_completion_length=9, num_items_in_batch=8.0, num_sequences=8.0)
        loss.backward()
        assert float(loss) == 0.0
        for name, p in model.named_parameters():
            assert p.grad is not None, name  # the whole model ran
            assert float(p.grad.abs().max()) == 0.0, name
