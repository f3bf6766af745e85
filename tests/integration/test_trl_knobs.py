"""TRL 1.16's knobs through the whole trainer: each trains (parameters move, metrics logged), the
stateful ones (adaptive entropy, a synced reference) resume exactly, and the sampling ones reach
the sampler (repetition penalty as transformers' processor, generation_kwargs, chat_template_kwargs)."""

import json
import os

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.rollout.sampling import SamplingParams, processed_logits
from tests.helpers import make_char_tokenizer, make_tiny_llama, make_tiny_model, instrument


def digit_first(prompts, completions, **kw):
    return [1.0 if c[:1].isdigit() else 0.0 for c in completions]


def long_one(prompts, completions, **kw):
    return [len(c) / 4 for c in completions]


def parity(prompts, completions, **kw):  # ~50/50 on a random model: almost every group has signal
    return [float(ord(c[:1] or "a") % 2) for c in completions]


def prompts_ds(n=16):
    return Dataset.from_dict({"prompt": [f"q{i}:" for i in range(n)]})


def config(tmp_path, **over):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                gradient_accumulation_steps=2, num_generations=4, max_completion_length=4, learning_rate=1e-2,
                logging_steps=100, save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False, seed=1)
    return GRPOConfig(**{**base, **over})


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"step"' in line]


KNOBS = {
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "cispo_default_cap": dict(loss_type="cispo"),
    "bias_corrected_kl": dict(beta=0.1, use_bias_correction_kl=True),
    "off_policy_mask": dict(off_policy_mask_threshold=0.0, num_iterations=2),
    "entropy_bonus": dict(entropy_coef=0.05),
    "adaptive_entropy": dict(use_adaptive_entropy=True, entropy_target=10.0, entropy_coef=0.01),
    "normalize_then_sum": dict(multi_objective_aggregation="normalize_then_sum", reward_weights=[1.0, 0.5]),
    "sync_ref_model": dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=1),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "generation_kwargs": dict(generation_kwargs={"top_k": 20, "repetition_penalty": 1.2}),
    "batch_scaling": dict(scale_rewards="batch"),
}


@pytest.mark.train
@pytest.mark.parametrize("name", list(KNOBS))
def test_each_knob_trains(tmp_path, name):
    model, tok = make_tiny_llama()
    cfg = config(tmp_path, **KNOBS[name])
    funcs = [digit_first, long_one] if name == "normalize_then_sum" else digit_first
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=cfg, train_dataset=prompts_ds(), processing_class=tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
    assert moved, f"{name}: no parameter changed"
    rows = metrics(cfg.output_dir)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    if name == "adaptive_entropy":
        # the entropy (~4 nats on a random char model) stays below the target 10: the coefficient
        # rises by entropy_coef_delta every optimizer step: 0.01 -> 0.015 -> 0.02 logged at steps 2, 3
        coefs = [r["entropy_coef"] for r in rows if "entropy_coef" in r]
        assert coefs == pytest.approx([0.01, 0.015, 0.02])
    if name == "vespo":
        assert any("vespo/phi_seq_mean" in r for r in rows)
    if name == "sync_ref_model":
        # after syncing every step the reference has moved towards the policy
        ref = trainer.parts.ref_model
        assert any(not torch.equal(before[n], p) for n, p in ref.named_parameters())


@pytest.mark.train
@pytest.mark.parametrize("knobs", [dict(use_adaptive_entropy=True, entropy_target=10.0, entropy_coef=0.01),
                                   dict(beta=0.1, sync_ref_model=True, ref_model_sync_steps=2),
                                   dict(dynamic_sampling=True)],
                         ids=["adaptive_entropy", "sync_ref_model", "dynamic_sampling"])
def test_stateful_knobs_resume_exactly(tmp_path, knobs):
    def run(resume=None, out="a"):
        model, tok = make_tiny_llama()
        cfg = config(tmp_path, max_steps=4, save_steps=2, save_strategy="steps", output_dir=str(tmp_path / out),
                     **knobs)
        t = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                        processing_class=tok)
        t.train(resume_from_checkpoint=resume)
        ref = t.parts.ref_model
        return ({k: v.clone() for k, v in t.model.state_dict().items()},
                {k: v.clone() for k, v in ref.state_dict().items()} if ref is not None else {})

    straight, straight_ref = run()
    resumed, resumed_ref = run(resume=str(tmp_path / "a" / "checkpoint-2"), out="b")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    for k in straight_ref:
        assert torch.equal(straight_ref[k], resumed_ref[k]), f"reference {k}"


def test_repetition_penalty_is_transformers_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    history = torch.tensor([[1, 2, 2], [0, 5, 7], [10, 3, 3]])
    seen = torch.zeros(3, 11, dtype=torch.bool)
    seen[torch.arange(3)[:, None], history] = True
    want = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone())
    got = processed_logits(logits, SamplingParams(temperature=1.0, repetition_penalty=1.7), seen)
    torch.testing.assert_close(got, want)


def test_repetition_penalty_changes_what_the_engine_samples_and_its_logprobs():
    from grpokit.rollout import make_engine

    model, tok = make_tiny_llama()
    engine = make_engine("hf", model, tok)
    prompt = [tok("ab:")["input_ids"]]
    plain = engine.generate(prompt, n=4, params=SamplingParams(max_tokens=12, temperature=0.0, seed=0))
    penalised = engine.generate(prompt, n=4, params=SamplingParams(max_tokens=12, temperature=0.0, seed=0,
                                                                   repetition_penalty=5.0))
    # greedy under a strong penalty never repeats a token of the row (while alternatives remain)
    ids = penalised[0].token_ids
    assert len(set(ids) - set(prompt[0])) == len(ids) or penalised[0].finish_reason == "stop"
    assert plain[0].token_ids != ids or plain[0].logprobs != penalised[0].logprobs


def test_chat_template_kwargs_reach_the_template(tmp_path):
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% if not enable_thinking|default(true) %}#{% endif %}"
                "{% endif %}")
    model, tok = make_tiny_llama(chat_template=template)
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(8)]})
    seen = {}
    for kwargs in (None, {"enable_thinking": False}):
        cfg = config(tmp_path, max_steps=1, chat_template_kwargs=kwargs, output_dir=str(tmp_path / str(kwargs)))
        t = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=ds, processing_class=tok)
        seen[str(kwargs)] = tok.decode(t.parts.train.prompt_ids[0])
    assert seen["None"].endswith("<assistant>") and seen[str({"enable_thinking": False})].endswith("<assistant>#")


def test_generation_kwargs_that_are_no_generation_setting_are_an_error_naming_them(tmp_path):
    with pytest.raises(ValueError, match="generation_kwargs 'num_beam' are not transformers GenerationConfig settings"):
        config(tmp_path, generation_kwargs={"num_beam": 2})
    with pytest.raises(ValueError, match="do_sample=False"):
        config(tmp_path, generation_kwargs={"do_sample": False})
    with pytest.raises(ValueError, match="sync_ref_model=True needs a reference model"):
        config(tmp_path, sync_ref_model=True)


# --- inputs as TRL takes them ------------------------------------------------------------------

def test_no_train_dataset_is_an_error_naming_the_fix(tmp_path):
    model, tok = make_tiny_llama()
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        GRPOTrainer(model=model, reward_funcs=digit_first, args=config(tmp_path), processing_class=tok)


@pytest.mark.train
def test_a_loaded_model_without_processing_class_loads_the_tokenizer_of_its_name(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    trainer = GRPOTrainer(model=loaded, reward_funcs=digit_first, args=config(tmp_path, max_steps=1),
                          train_dataset=prompts_ds())
    assert trainer.processing_class.get_vocab() == tok.get_vocab()
    trainer.train()


@pytest.mark.train
def test_a_streaming_dataset_is_read_in_order_as_far_as_the_run_needs(tmp_path):
    from datasets import IterableDataset

    read = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"prompt": f"q{i}:"}

    stream = IterableDataset.from_generator(rows)
    model, tok = make_tiny_llama()
    seen = []

    def record(prompts, completions, **kw):
        seen.extend(prompts)
        return digit_first(prompts, completions)

    cfg = config(tmp_path, max_steps=2)  # 2 steps x 4 prompts (8 x 2 completions / G = 4)
    GRPOTrainer(model=model, reward_funcs=record, args=cfg, train_dataset=stream, processing_class=tok).train()
    assert [p for p in dict.fromkeys(seen)] == [f"q{i}:" for i in range(8)]
    assert max(read) < 20  # the stream was not read to its end
    with pytest.raises(ValueError, match="streaming IterableDataset.*set max_steps"):
        GRPOTrainer(model=model, reward_funcs=digit_first, args=config(tmp_path, max_steps=-1), processing_class=tok,
                    train_dataset=IterableDataset.from_generator(rows))


def test_named_eval_sets_and_evaluate_on_a_given_set(tmp_path):
    from datasets import DatasetDict

    def exact(prompts, completions, **kw):  # every greedy completion scores 1: accuracy 1.0
        return [1.0] * len(completions)

    model, tok = make_tiny_llama()
    sets = DatasetDict({"easy": prompts_ds(4), "hard": prompts_ds(6)})
    trainer = GRPOTrainer(model=model, reward_funcs=exact, args=config(tmp_path, max_steps=1), processing_class=tok,
                          train_dataset=prompts_ds(), eval_dataset=sets)
    metrics = trainer.evaluate()
    assert metrics["eval_easy/accuracy"] == 1.0 and metrics["eval_hard/accuracy"] == 1.0
    one = trainer.evaluate(eval_dataset=prompts_ds(3), metric_key_prefix="test")
    assert one["test/accuracy"] == 1.0 and trainer.state.log_history[-1]["test/accuracy"] == 1.0


def test_ppo_and_dpo_are_importable_from_the_package_as_from_trl():
    import grpokit
    from grpokit import DPOConfig, DPOTrainer, PPOConfig, PPOTrainer
    from grpokit.baselines.dpo import DPOTrainer as dpo
    from grpokit.baselines.ppo import PPOTrainer as ppo

    assert PPOTrainer is ppo and DPOTrainer is dpo and PPOConfig().kl_estimator == "k1"
    assert isinstance(DPOConfig(), grpokit.config.TrainingConfig) and not isinstance(DPOConfig(), grpokit.GRPOConfig)


@pytest.mark.train
def test_cast_lm_head_to_fp32_trains_a_bf16_model_with_float32_logits(tmp_path):
    model, tok = make_tiny_llama()
    model = model.to(torch.bfloat16)
    cfg = config(tmp_path, max_steps=1, bf16=True, cast_lm_head_to_fp32=True, beta=0.1)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_first, args=cfg, train_dataset=prompts_ds(),
                          processing_class=tok)
    head, ref_head = trainer.model.get_output_embeddings(), trainer.parts.ref_model.get_output_embeddings()
    assert head.weight.dtype == torch.float32 and trainer.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([tok("q1:")["input_ids"]])
    assert trainer.model(ids).logits.dtype == torch.float32
    before = ref_head.weight.clone()
    trainer.train()
    assert torch.equal(ref_head.weight, before)  # the reference's head is its own, untouched by training
    assert not torch.equal(head.weight, before)


# --- beyond TRL: DAPO's dynamic sampling ---------------------------------------------------------

@pytest.mark.train
def test_dynamic_sampling_fills_the_step_with_groups_that_carry_signal(tmp_path):
    from grpokit.algos import groups_with_signal

    model, tok = make_tiny_llama()
    trained = []

    def sparse(prompts, completions, **kw):  # prompts q0..q3 always score 0 (no signal); others ~50/50
        return [0.0 if p in ("q0:", "q1:", "q2:", "q3:") else float(ord(c[:1] or "a") % 2)
                for p, c in zip(prompts, completions)]

    cfg = config(tmp_path, max_steps=2, dynamic_sampling=True, shuffle_dataset=False, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=sparse, args=cfg, train_dataset=prompts_ds(), processing_class=tok)
    original = trainer.algorithm.sample_batch

    def spy(run, rows, state, phase):
        batch, stats = original(run, rows, state, phase)
        trained.append((batch, stats))
        return batch, stats

    trainer.algorithm.sample_batch = spy
    trainer.train()
    batch, stats = trained[0]
    assert len(batch) == 16  # the batch size never changes (4 prompts x G = 4)
    assert not {"q0:", "q1:", "q2:", "q3:"} & set(batch.prompts)  # no signal: replaced by later prompts
    assert stats["dynamic_sampling/rounds"] >= 1 and stats["dynamic_sampling/groups_dropped"] >= 4
    assert stats["dynamic_sampling/filled_ratio"] == float(groups_with_signal(batch.rewards, 4).float().mean())
    rows = metrics(cfg.output_dir)
    assert all("dynamic_sampling/rounds" in r for r in rows if "loss" in r)


@pytest.mark.train
def test_dynamic_sampling_stops_after_its_rounds_and_keeps_the_batch_size(tmp_path):
    model, tok = make_tiny_llama()
    flat = lambda prompts, completions, **kw: [1.0] * len(completions)  # noqa: E731 - never any signal
    cfg = config(tmp_path, max_steps=1, dynamic_sampling=True, dynamic_sampling_max_rounds=2, logging_steps=1)
    GRPOTrainer(model=model, reward_funcs=flat, args=cfg, train_dataset=prompts_ds(64), processing_class=tok).train()
    (row,) = [r for r in metrics(cfg.output_dir) if "loss" in r]
    assert row["dynamic_sampling/rounds"] == 2 and row["dynamic_sampling/filled_ratio"] == 0.0
    assert row["dynamic_sampling/groups_sampled"] == 12


# --- beyond TRL: token-budget micro-batches ------------------------------------------------------

@pytest.mark.train
@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_token_budget_micro_batches_give_the_row_micro_batches_update(tmp_path, loss_type):
    """Cutting the step into micro-batches by tokens (across groups) instead of rows changes how
    the forwards are laid out, not the update: with global normalisers the gradient is the same."""
    grads, counts = {}, {}
    for budget in (None, 12, 200):
        model, tok = make_tiny_llama()
        cfg = config(tmp_path, max_steps=1, loss_type=loss_type, token_budget=budget, output_dir=str(tmp_path / str(budget)),
                     per_device_train_batch_size=4, gradient_accumulation_steps=4)
        trainer = GRPOTrainer(model=model, reward_funcs=long_one, args=cfg, train_dataset=prompts_ds(),
                              processing_class=tok)
        run, step = trainer.parts, trainer.parts.optimizer_step
        forward = run.forward

        def counted(mb, _forward=forward, _budget=budget, **kw):
            counts[_budget] = counts.get(_budget, 0) + 1
            return _forward(mb, **kw)

        def capture(*events, _step=step, _budget=budget, _model=trainer.model):
            grads[_budget] = {n: p.grad.clone() for n, p in _model.named_parameters() if p.grad is not None}
            return _step(*events)

        instrument(run, optimizer_step=capture, forward=counted)
        trainer.train()
    assert counts[12] > counts[None] > counts[200] == 1, counts  # the layouts differ: more forwards, then one
    for budget in (12, 200):
        for n, g in grads[None].items():
            torch.testing.assert_close(grads[budget][n], g, rtol=1e-4, atol=1e-7)


def test_token_budget_spans_stay_within_the_budget():
    from grpokit.core.batch import make_micro_batches
    from grpokit.trajectory import Trajectories

    prompts = [[1, 2, 3]] * 4 + [[4, 5]] * 4
    comps = [[7] * n for n in (5, 1, 4, 2, 6, 6, 1, 3)]
    t = Trajectories(row_index=[0] * 4 + [1] * 4, prompts=["a"] * 4 + ["b"] * 4, completions=[""] * 8,
                     prompt_ids=prompts, completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                     truncated=torch.zeros(8, dtype=torch.bool))
    mbs = make_micro_batches(t, 4, pad_id=0, device="cpu", mask_truncated=False, token_budget=12)
    # packed tokens (a prompt once per span and group): rows 0-1: 3 + 5 + 1 = 9 (row 2 would make
    # 13); rows 2-3: 3 + 4 + 2 = 9 (row 4, a new prompt, 17); row 4: 2 + 6 = 8 (row 5: 14);
    # rows 5-7: 2 + 6 + 1 + 3 = 12, exactly the budget
    spans = [(mb.rows.start, mb.rows.stop) for mb in mbs]
    assert spans == [(0, 2), (2, 4), (4, 5), (5, 8)]
    for s, e in spans:
        cost = sum(len(prompts[i]) for i in range(s, e) if i == s or prompts[i] != prompts[i - 1])
        cost += sum(len(comps[i]) for i in range(s, e))
        assert cost <= 12 or e - s == 1
    with pytest.raises(ValueError, match="token_budget with loss_type='grpo'"):
        GRPOConfig(token_budget=100, loss_type="grpo")


# --- mixture-of-experts models ---------------------------------------------------------------------

def tiny_moe():
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="qwen3_moe", max_positions=64, eval_mode=False, head_dim=8,
                            moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, output_router_logits=True,
                            router_aux_loss_coef=0.01, decoder_sparse_step=1, mlp_only_layers=[])
    return model, tok


@pytest.mark.train
def test_a_moe_model_with_router_logits_samples_and_adds_its_load_balancing_loss(tmp_path):
    model, tok = tiny_moe()
    cfg = config(tmp_path, max_steps=2, logging_steps=1)
    trainer = GRPOTrainer(model=model, reward_funcs=long_one, args=cfg, train_dataset=prompts_ds(), processing_class=tok)
    assert trainer.algorithm.router_aux_coef == 0.01  # the model config's, as TRL with router_aux_loss_coef=None
    gate = trainer.model.model.layers[0].mlp.gate.weight
    before = gate.detach().clone()
    trainer.train()
    rows = [r for r in metrics(cfg.output_dir) if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in rows)  # near its minimum 1.0 for a balanced router, never 0
    assert not torch.equal(before, gate)


def test_the_padded_forward_aux_loss_is_the_models_own():
    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs
    from grpokit.trajectory import Trajectories

    model, tok = tiny_moe()
    prompts = [tok("q1:")["input_ids"]] * 2 + [tok("q22:")["input_ids"]] * 2
    comps = [[5, 6, 7], [8], [9, 10], [11, 12, 13]]
    t = Trajectories(row_index=[0, 0, 1, 1], prompts=["a"] * 4, completions=[""] * 4, prompt_ids=prompts,
                     completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                     truncated=torch.zeros(4, dtype=torch.bool))
    (mb,) = make_micro_batches(t, 4, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False)
    *_, aux = completion_logprobs(model, mb, temperature=1.0, packed=False, router_aux=True)
    own = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                output_router_logits=True).aux_loss
    torch.testing.assert_close(aux, own)
    *_, packed_aux = completion_logprobs(model, mb, temperature=1.0, packed=True, router_aux=True)
    assert torch.isfinite(packed_aux) and packed_aux > 0  # over each prompt once per group, not per row


# --- transformers' generate for what grpokit's engine does not cover ----------------------------------

def test_the_generate_engine_agrees_with_grpokit_engine_and_its_logprobs_are_the_models():
    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs
    from grpokit.trajectory import Trajectories
    from grpokit.rollout import make_engine

    model, tok = make_tiny_llama()
    prompts = [tok("q1:")["input_ids"], tok("q22:")["input_ids"]]
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    ours = make_engine("hf", model, tok).generate(prompts, n=1, params=greedy)
    theirs = make_engine("hf-generate", model, tok).generate(prompts, n=1, params=greedy)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    sampled = make_engine("hf-generate", model, tok).generate(prompts, n=3, params=SamplingParams(max_tokens=6, seed=1))
    assert [c.prompt_index for c in sampled] == [0, 0, 0, 1, 1, 1]
    t = Trajectories(row_index=[c.prompt_index for c in sampled], prompts=[""] * 6, completions=[""] * 6,
                     prompt_ids=[prompts[c.prompt_index] for c in sampled],
                     completion_ids=[c.token_ids for c in sampled], sampling_logps=[c.logprobs for c in sampled],
                     truncated=torch.zeros(6, dtype=torch.bool))
    (mb,) = make_micro_batches(t, 6, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False)
    logps, _ = completion_logprobs(model, mb, temperature=1.0)
    # at temperature 1 without truncation the sampled distribution is the model's softmax
    torch.testing.assert_close(logps * mb.completion_mask, mb.sampling_logps, atol=1e-5, rtol=1e-5)


@pytest.mark.train
def test_generation_kwargs_beyond_grpokit_sampler_train_through_transformers_generate(tmp_path):
    model, tok = make_tiny_llama()
    cfg = config(tmp_path, max_steps=1, generation_kwargs={"do_sample": True, "top_k": 50, "num_beams": 2,
                                                           "length_penalty": -0.1})
    trainer = GRPOTrainer(model=model, reward_funcs=long_one, args=cfg, train_dataset=prompts_ds(), processing_class=tok)
    assert type(trainer.parts.engine).__name__ == "GenerateEngine"
    assert any("transformers' generate" in note for note in trainer.parts.notes)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.train
def test_a_hybrid_mamba_model_trains(tmp_path):
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="nemotron_h", hidden_size=16, num_layers=None, num_heads=4, num_kv_heads=2,
                            intermediate_size=32, max_positions=None, eval_mode=False,
                            layers_block_type=["mamba", "attention", "moe"], mamba_num_heads=8, mamba_head_dim=4,
                            mamba_n_groups=1, ssm_state_size=16, mamba_d_conv=4, mamba_expand=2, n_routed_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=32, moe_shared_expert_intermediate_size=32,
                            use_mamba_kernels=False)
    trainer = GRPOTrainer(model=model, reward_funcs=parity, args=config(tmp_path, max_steps=1), processing_class=tok,
                          train_dataset=prompts_ds())
    assert type(trainer.parts.engine).__name__ == "GenerateEngine"
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


@pytest.mark.train
def test_pad_to_multiple_of_pads_the_training_tensors_and_keeps_the_logprobs(tmp_path):
    from grpokit.core.batch import make_micro_batches
    from grpokit.core.forward import completion_logprobs
    from grpokit.trajectory import Trajectories

    model, tok = make_tiny_llama()
    prompts = [tok("q1:")["input_ids"], tok("q22:")["input_ids"]]
    comps = [[5, 6, 7], [8]]
    t = Trajectories(row_index=[0, 1], prompts=["a", "b"], completions=["", ""], prompt_ids=prompts,
                     completion_ids=comps, sampling_logps=[[0.0] * 3, [0.0]], truncated=torch.zeros(2, dtype=torch.bool))
    plain, = make_micro_batches(t, 2, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False)
    padded, = make_micro_batches(t, 2, pad_id=tok.pad_token_id, device="cpu", mask_truncated=False, pad_to_multiple_of=8)
    assert padded.input_ids.shape[1] == 16 and padded.prompt_width == 8
    torch.testing.assert_close(completion_logprobs(model, padded, temperature=1.0, packed=False)[0],
                               completion_logprobs(model, plain, temperature=1.0, packed=False)[0])
    cfg = config(tmp_path, max_steps=1, pad_to_multiple_of="auto")
    assert cfg.pad_to_multiple_of is None
    trainer = GRPOTrainer(model=model, reward_funcs=parity, args=config(tmp_path, max_steps=1, pad_to_multiple_of=8),
                          train_dataset=prompts_ds(), processing_class=tok)
    assert trainer.parts.plan.packed is False
    trainer.train()


def test_quantization_config_errors_name_what_is_missing(tmp_path):
    import importlib.util

    from transformers import BitsAndBytesConfig

    model, tok = make_tiny_llama()
    q = BitsAndBytesConfig(load_in_4bit=True)
    with pytest.raises(ValueError, match="pass the model's id or path"):
        GRPOTrainer(model=model, reward_funcs=parity, args=config(tmp_path), train_dataset=prompts_ds(),
                    processing_class=tok, quantization_config=q)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    want = "needs the bitsandbytes package" if importlib.util.find_spec("bitsandbytes") is None else "peft_config"
    with pytest.raises(ValueError, match=want):
        GRPOTrainer(model=str(tmp_path / "m"), reward_funcs=parity, args=config(tmp_path), train_dataset=prompts_ds(),
                    quantization_config=q)


# --- steps_per_generation: one generation, several optimizer steps ------------------------------------

def _capture_grads(trainer):
    grads, step = [], trainer.parts.optimizer_step

    def capture(*events):
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return step(*events)

    instrument(trainer.parts, optimizer_step=capture)
    return grads


@pytest.mark.train
def test_steps_per_generation_feeds_several_optimizer_steps_from_one_generation(tmp_path):
    calls = []

    def counting(prompts, completions, **kw):
        calls.append(len(completions))
        return parity(prompts, completions)

    runs = {}
    for spg in (1, 2):
        model, tok = make_tiny_llama()
        cfg = config(tmp_path, max_steps=4, loss_type="grpo", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                     steps_per_generation=spg, shuffle_dataset=False, logging_steps=1, output_dir=str(tmp_path / str(spg)))
        trainer = GRPOTrainer(model=model, reward_funcs=counting, args=cfg, train_dataset=prompts_ds(),
                              processing_class=tok)
        grads = _capture_grads(trainer)
        calls.clear()
        out = trainer.train()
        runs[spg] = (grads, list(calls), metrics(cfg.output_dir))
        assert out.global_step == 4
    # spg=2: two generations of 16 completions (4 prompts) for 4 optimizer steps; spg=1: four of 8
    assert runs[2][1] == [16, 16] and runs[1][1] == [8, 8, 8, 8]
    # the first optimizer step trains on the same first 2 groups (the same samples: counter-based
    # sampling, same seed) with the same per-micro-batch mean (grpo): the same gradient
    for n, g in runs[1][0][0].items():
        torch.testing.assert_close(runs[2][0][0][n], g, rtol=1e-5, atol=1e-7)
    # the second step of a generation is off-policy: its ratios moved away from 1
    assert runs[2][2][0]["ratio_mean"] != 1.0 or runs[2][2][0]["clip_ratio/region_mean"] > 0


def test_combinations_trl_warns_about_are_said_before_step_1(tmp_path):
    model, tok = make_tiny_llama()
    for loss_type, said in (("dapo", True), ("grpo", False)):
        cfg = config(tmp_path, importance_sampling_level="sequence", loss_type=loss_type)
        trainer = GRPOTrainer(model=model, reward_funcs=parity, args=cfg, train_dataset=prompts_ds(),
                              processing_class=tok)
        assert any("weights each sequence by its completion length" in n for n in trainer.parts.notes) == said
    with pytest.raises(ValueError, match="vespo.*token_truncate or token_mask"):
        GRPOConfig(loss_type="vespo", use_vllm=True)


def test_evaluate_reports_transformers_eval_loss_per_set(tmp_path):
    from datasets import IterableDataset

    model, tok = make_tiny_llama()
    trainer = GRPOTrainer(model=model, reward_funcs=parity, args=config(tmp_path, max_steps=1), processing_class=tok,
                          train_dataset=prompts_ds())
    one = trainer.evaluate(eval_dataset=prompts_ds(4))
    assert isinstance(one["eval_loss"], float) and "eval/accuracy" in one
    stream = IterableDataset.from_generator(lambda: ({"prompt": f"s{i}:"} for i in range(3)))
    named = trainer.evaluate(eval_dataset={"a": prompts_ds(2), "b": stream})
    assert {"eval_a_loss", "eval_b_loss", "eval_a/accuracy", "eval_b/accuracy"} <= set(named)
