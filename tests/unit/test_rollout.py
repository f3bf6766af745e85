"""HFEngine on tiny random models built from a config (Qwen2, Llama, GPT-2, LoRA-wrapped Qwen2).

Tokenizer: character-level + filler words (benchmarks/_models.py), ids 0/1/2 = pad/eos/bos.
"""

import math

import pytest
import torch

from grpokit.rollout import Completion, Engine, HFEngine, SamplingParams, make_engine
from grpokit.rollout.sampling import processed_logprobs
from tests.helpers import bench_models, make_bench_tiny_model

models = bench_models()

EOS = models.EOS
VOCAB = 256
PROMPTS = [[5, 40, 77, 100, 3, 9, 31], [60, 61], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [200, 201, 202, 4]]

# tiny models run faster on one thread (and do not fight the other tests for the cores)
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch="qwen2", eos_p=None, seed=0, sharpen=1.0):
    """A random tiny model; `sharpen` scales the (tied) embeddings so that the next-token
    distribution is far from uniform; `eos_p` makes EOS about that likely per step."""
    model = make_bench_tiny_model(models.build_tokenizer(VOCAB), arch, seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    if eos_p:
        models.make_eos_likely(model, p=eos_p)
    return model


@pytest.fixture(scope="module")
def tok():
    return models.build_tokenizer(VOCAB)


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg).eval()


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=0,
                         eos_token_id=model.generation_config.eos_token_id)
    return out[0, len(prompt):].tolist()


def reference_logprobs(model, prompt, completion, params):
    """Processed log-probs of each completion token, from one full forward pass (teacher forcing)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]
    return processed_logprobs(logits, params)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2", "qwen2-lora"])
def test_greedy_equals_model_generate_token_for_token(arch, tok):
    model = tiny(arch.split("-")[0])
    if arch.endswith("lora"):
        model = lora(model)
    # a second EOS id that greedy decoding reaches for prompt 0 but not for every prompt, so that
    # both finish reasons (and EOS ids from generation_config) are exercised
    free = [hf_greedy(model, p, 20) for p in PROMPTS]
    second_eos = next(t for t in free[0][3:] if not all(t in f for f in free))
    model.generation_config.eos_token_id = [EOS, second_eos]
    engine = HFEngine(model, tok)
    params = SamplingParams(max_tokens=20, temperature=0.0)
    out = engine.generate(PROMPTS, n=2, params=params)
    assert len(out) == len(PROMPTS) * 2
    refs = [hf_greedy(model, p, 20) for p in PROMPTS]
    reasons = set()
    for c in out:
        prompt, ref = PROMPTS[c.prompt_index], refs[c.prompt_index]
        assert c.token_ids == ref
        assert c.finish_reason == ("stop" if ref[-1] in (EOS, second_eos) else "length")
        reasons.add(c.finish_reason)
        lp = reference_logprobs(model, prompt, c.token_ids, params)
        want = lp.gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=0)
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    assert reasons == {"stop", "length"}, "the test needs both finish reasons to mean something"


def test_output_grouped_by_prompt_and_typed(tok):
    engine = HFEngine(tiny(), tok)
    out = engine.generate(PROMPTS, n=3, params=SamplingParams(max_tokens=4, seed=0))
    assert [c.prompt_index for c in out] == [i for i in range(len(PROMPTS)) for _ in range(3)]
    assert all(isinstance(c, Completion) and len(c.logprobs) == len(c.token_ids) for c in out)
    assert isinstance(engine, Engine)


def chi2_critical(df, z=3.0902):  # significance 0.001, Wilson-Hilferty
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi2(counts, probs):
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=2, temperature=1.0, seed=11),
    SamplingParams(max_tokens=2, temperature=1.2, top_k=50, top_p=0.8, min_p=0.03, seed=12),
], ids=["plain", "truncated"])
def test_sampled_tokens_follow_the_model_distribution_chi_square(params, tok):
    """4000 samples of one prompt: first tokens against the model's (processed) probabilities, and
    second tokens after the most frequent first token against the conditional ones (decode path).
    Chi-square at significance 0.001, fixed seeds."""
    model = tiny(sharpen=3.0)
    prompt = PROMPTS[0]
    out = HFEngine(model, tok).generate([prompt], n=4000, params=params)
    first = torch.tensor([c.token_ids[0] for c in out])
    p1 = reference_logprobs(model, prompt, [0], params)[0].exp().double()
    stat, df = chi2(torch.bincount(first, minlength=VOCAB).double(), p1)
    assert df >= 5 and stat < chi2_critical(df), (stat, df)
    top = int(torch.bincount(first).argmax())
    second = torch.tensor([c.token_ids[1] for c in out if c.token_ids[0] == top and len(c.token_ids) > 1])
    assert len(second) > 300
    p2 = reference_logprobs(model, prompt, [top, 0], params)[1].exp().double()
    stat, df = chi2(torch.bincount(second, minlength=VOCAB).double(), p2)
    assert df >= 3 and stat < chi2_critical(df), (stat, df)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=10, top_k=3, seed=1),
    SamplingParams(max_tokens=10, top_p=0.3, seed=2),
    SamplingParams(max_tokens=10, min_p=0.5, temperature=1.5, seed=3),
    SamplingParams(max_tokens=10, temperature=0.5, top_k=10, top_p=0.7, min_p=0.2, seed=4),
], ids=["top_k", "top_p", "min_p", "all"])
def test_truncation_sets_and_returned_logprobs_at_every_step(params, tok):
    """Every sampled token lies in the kept set of HF's warpers (recomputed by teacher forcing), and
    its returned logprob is the log of the processed distribution, also after rows left the batch."""
    model = tiny(eos_p=0.03, sharpen=3.0)
    out = HFEngine(model, tok).generate(PROMPTS, n=6, params=params)
    lengths = {len(c.token_ids) for c in out}
    assert len(lengths) > 2  # rows finished at different steps, so the batch was compacted
    for c in out:
        lp = reference_logprobs(model, PROMPTS[c.prompt_index], c.token_ids, params)
        ids = torch.tensor(c.token_ids)
        chosen = lp.gather(-1, ids[:, None]).squeeze(-1)
        assert torch.isfinite(chosen).all(), "a token outside the top-k/top-p/min-p set was sampled"
        torch.testing.assert_close(torch.tensor(c.logprobs), chosen, atol=1e-4, rtol=0)


def test_stop_strings_spanning_tokens_cut_text_and_tokens(tok):
    model = tiny()
    engine = HFEngine(model, tok)
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    ref = engine.generate([PROMPTS[1]], n=1, params=greedy)[0]
    pieces = [tok.decode([t]) for t in ref.token_ids]
    assert all(pieces) and len(ref.token_ids) == 24
    # a stop string made of the tail of token 3, all of token 4 and the head of token 5 (if those
    # are multi-character fillers) so it spans tokens and ends inside token 5
    head = "".join(pieces[:5])
    stop = (pieces[3][-1:] + pieces[4] + pieces[5][:1])
    first = (head + pieces[5]).find(stop)
    expected_tokens = next(i + 1 for i in range(len(pieces)) if len("".join(pieces[: i + 1])) >= first + len(stop))
    out = engine.generate([PROMPTS[1]], n=2, params=SamplingParams(max_tokens=24, temperature=0.0,
                                                                     stop=["never-there", stop]))
    for c in out:
        assert c.finish_reason == "stop"
        assert c.token_ids == ref.token_ids[:expected_tokens]
        assert c.text.endswith(stop) and c.text.count(stop) == 1
        assert c.text == ref.text[: ref.text.find(stop) + len(stop)]
        assert len(c.logprobs) == expected_tokens


def test_max_tokens_eos_ids_and_finish_reasons(tok):
    model = tiny(eos_p=1 / 8)
    second_eos = 77
    model.generation_config.eos_token_id = [EOS, second_eos]
    engine = HFEngine(model, tok)
    assert engine.eos_ids == {EOS, second_eos}
    out = engine.generate(PROMPTS, n=16, params=SamplingParams(max_tokens=9, seed=5))
    seen = set()
    for c in out:
        assert 1 <= len(c.token_ids) <= 9
        assert all(t not in (EOS, second_eos) for t in c.token_ids[:-1])
        if c.token_ids[-1] in (EOS, second_eos):
            assert c.finish_reason == "stop"
            seen.add(c.token_ids[-1])
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 9
            seen.add("length")
        assert "<eos>" not in c.text
    assert seen >= {EOS, "length"}


def test_samples_differ_and_seed_reproduces(tok):
    engine = HFEngine(tiny(), tok)
    unseeded = SamplingParams(max_tokens=8)  # seed None: drawn from torch's default generator
    torch.manual_seed(0)
    first = [x.token_ids for x in engine.generate(PROMPTS, n=2, params=unseeded)]
    torch.manual_seed(0)
    assert first == [x.token_ids for x in engine.generate(PROMPTS, n=2, params=unseeded)]
    assert first != [x.token_ids for x in engine.generate(PROMPTS, n=2, params=unseeded)]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a = engine.generate(PROMPTS, n=8, params=params)
    b = engine.generate(PROMPTS, n=8, params=params)
    c = engine.generate(PROMPTS, n=8, params=SamplingParams(max_tokens=8, temperature=1.0, seed=4))
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.logprobs for x in a] == [x.logprobs for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    for i in range(len(PROMPTS)):
        group = {tuple(x.token_ids) for x in a[8 * i: 8 * i + 8]}
        assert len(group) >= 6, "G samples of one prompt should differ at temperature 1"


def test_max_batch_tokens_waves_give_the_same_samples(tok):
    model = tiny(eos_p=1 / 10)
    params = SamplingParams(max_tokens=12, seed=9, top_p=0.95)
    whole = HFEngine(model, tok)
    a = whole.generate(PROMPTS, n=5, params=params)
    assert whole.stats["waves"] == 1
    split = HFEngine(model, tok, max_batch_tokens=60)  # 2-3 rows per wave: groups are split too
    b = split.generate(PROMPTS, n=5, params=params)
    assert split.stats["waves"] >= 8
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.finish_reason for x in a] == [x.finish_reason for x in b]
    torch.testing.assert_close(torch.tensor([l for x in a for l in x.logprobs]),
                               torch.tensor([l for x in b for l in x.logprobs]), atol=1e-5, rtol=0)


def test_prefill_one_by_one_or_batched_gives_the_same_samples(tok):
    model = tiny()
    params = SamplingParams(max_tokens=6, seed=2)
    a = HFEngine(model, tok, prefill_batch_tokens=0).generate(PROMPTS, n=2, params=params)
    b = HFEngine(model, tok, prefill_batch_tokens=4096, prefill_max_padding=0.9).generate(PROMPTS, n=2, params=params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_tokenizer_without_pad_token_pads_prefill_with_eos():
    model = tiny()
    plain = models.build_tokenizer(VOCAB)
    no_pad = models.build_tokenizer(VOCAB)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    engine = HFEngine(model, no_pad, prefill_max_padding=0.9)  # prompts of different lengths share a batch
    assert engine.pad_id == EOS
    params = SamplingParams(max_tokens=6, seed=8)
    a = engine.generate(PROMPTS, n=2, params=params)
    b = HFEngine(model, plain, prefill_batch_tokens=0).generate(PROMPTS, n=2, params=params)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]


def test_model_mode_weights_and_grads_untouched(tok):
    model = tiny()
    model.config.attention_dropout = 0.5  # in train mode this would make greedy decoding random
    model.train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    engine = HFEngine(model, tok)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    a = engine.generate(PROMPTS, n=1, params=greedy)
    assert model.training
    b = engine.generate(PROMPTS, n=1, params=greedy)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    model.eval()
    assert [x.token_ids for x in a] == [hf_greedy(model, p, 10) for p in PROMPTS]
    engine.generate(PROMPTS, n=1, params=greedy)
    assert not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # and a training forward/backward still works afterwards (no inference tensors leaked)
    model.train()
    model(input_ids=torch.tensor([PROMPTS[0]]), labels=torch.tensor([PROMPTS[0]])).loss.backward()


def test_packed_cpu_lm_head_is_used_during_generation_and_removed_after(tok, monkeypatch):
    import grpokit.rollout.hf as hf

    model = tiny()
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append("forward" in mod.__dict__))
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    HFEngine(model, tok).generate(PROMPTS, n=1, params=greedy)
    assert seen and not any(seen)  # a head under _PACK_MIN_ELEMENTS weights keeps F.linear (faster there)
    seen.clear()
    monkeypatch.setattr(hf, "_PACK_MIN_ELEMENTS", 0)
    a = HFEngine(model, tok).generate(PROMPTS, n=1, params=greedy)
    assert seen and all(seen) and "forward" not in model.lm_head.__dict__
    seen.clear()
    b = HFEngine(model, tok, cpu_packed_lm_head=False).generate(PROMPTS, n=1, params=greedy)
    assert seen and not any(seen)
    assert_same_samples(a, b)


def assert_same_samples(a: list[Completion], b: list[Completion]) -> None:
    """The same tokens, and log-probs equal to float error (the same products summed in another order)."""
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    torch.testing.assert_close(torch.tensor([l for x in a for l in x.logprobs]),
                               torch.tensor([l for x in b for l in x.logprobs]), atol=1e-5, rtol=0)


def test_lora_layers_run_on_merged_weights_during_generation_and_are_restored_after(tok):
    """A LoRA model's adapted layers sample from W + scale * B @ A (one product) while the engine
    generates: the same tokens and log-probs (to float error) as PEFT's three products, the
    adapter and the base weights untouched, the layers' own forward back afterwards."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                              lora_dropout=0.0))
    with torch.no_grad():  # a trained-looking adapter (B starts at 0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora_layers = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_A")]
    merged_calls = []
    for m in lora_layers:
        m.register_forward_hook(lambda mod, args, out: merged_calls.append("forward" in mod.__dict__))
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3)
    a = HFEngine(model, tok).generate(PROMPTS, n=4, params=params)
    assert merged_calls and all(merged_calls)
    assert all("forward" not in m.__dict__ for m in lora_layers)
    merged_calls.clear()
    b = HFEngine(model, tok, cpu_merged_lora=False).generate(PROMPTS, n=4, params=params)
    assert merged_calls and not any(merged_calls)
    assert_same_samples(a, b)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with model.disable_adapter():  # the adapter off: nothing merged
        c = HFEngine(model, tok).generate(PROMPTS, n=4, params=params)
    assert [x.token_ids for x in c] != [x.token_ids for x in a]


def test_update_weights_same_module_noop_other_module_copied(tok):
    model, other = tiny(seed=0), tiny(seed=1)
    engine = HFEngine(model, tok)
    engine.update_weights(model)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    engine.update_weights(other)
    assert torch.equal(model.lm_head.weight, other.lm_head.weight)
    assert [c.token_ids for c in engine.generate(PROMPTS, n=1, params=greedy)] == \
        [hf_greedy(other, p, 6) for p in PROMPTS]


def test_input_errors_are_clear(tok):
    engine = HFEngine(tiny(), tok)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\] is empty"):
        engine.generate([[5], []], n=2)
    with pytest.raises(ValueError, match="n \\(samples per prompt\\)"):
        engine.generate([[5]], n=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.generate([[5]], n=1, params=SamplingParams(max_tokens=10**6))


def test_make_engine_picks_by_name(tok):
    model = tiny()
    assert isinstance(make_engine("hf", model, tok, max_batch_tokens=100), HFEngine)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        make_engine("nope", model, tok)


class _FakeVLLM:
    """Stands in for the `vllm` module: records what VLLMEngine asks, answers like vLLM's LLM."""

    class SamplingParams(dict):
        def __init__(self, **kw):
            super().__init__(kw)

    class LLM:
        def __init__(self, model, **kw):
            self.model, self.kw, self.loaded, self.calls = model, kw, None, []

        def generate(self, prompts, sp, use_tqdm=False):
            from types import SimpleNamespace as NS

            self.calls.append((prompts, sp))
            outs = []
            for _ in prompts:
                comps = []
                for j in range(sp["n"]):
                    ids = [10 + j, EOS] if j % 2 == 0 else [20 + j, 21 + j]
                    lps = [{t: NS(logprob=-0.5 * (k + 1))} for k, t in enumerate(ids)]
                    comps.append(NS(token_ids=tuple(ids), logprobs=lps, text=f"t{j}",
                                    finish_reason="stop" if j % 2 == 0 else "length"))
                outs.append(NS(outputs=comps))
            return outs

        def apply_model(self, fn):
            class M:
                def load_weights(inner, weights):
                    self.loaded = {k: v.clone() for k, v in weights}

            fn(M())


def test_vllm_engine_maps_params_and_outputs(tok, monkeypatch):
    """Our translation to and from vLLM, with a stand-in module (vLLM itself needs a GPU)."""
    import sys

    monkeypatch.setitem(sys.modules, "vllm", _FakeVLLM)
    model = lora(tiny())
    model.name_or_path = "/tmp/tiny"
    engine = make_engine("vllm", model, tok, gpu_memory_utilization=0.3, max_batch_tokens=4096)
    assert engine.llm.model == "/tmp/tiny"
    assert engine.llm.kw == {"gpu_memory_utilization": 0.3, "logprobs_mode": "processed_logprobs",
                             "enable_prefix_caching": True}
    # the adapter was merged into HF-named base weights, and unmerged again afterwards
    q = engine.llm.loaded["model.layers.0.self_attn.q_proj.weight"]
    base = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not any("lora" in k for k in engine.llm.loaded)
    assert not torch.allclose(q, base.base_layer.weight)
    out = engine.generate([[5, 6], [7]], n=3, params=SamplingParams(max_tokens=5, top_k=0, stop="</a>", seed=1))
    prompts, sp = engine.llm.calls[-1]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert sp["n"] == 3 and sp["top_k"] == -1 and sp["stop"] == ["</a>"] and sp["logprobs"] == 0
    assert sp["include_stop_str_in_output"] and sp["seed"] == 1
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert out[0].token_ids == [10, EOS] and out[0].logprobs == [-0.5, -1.0] and out[0].finish_reason == "stop"
    assert out[1].finish_reason == "length" and out[1].text == "t1"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_greedy_equals_generate_and_sampling_is_valid(tok):
    model = tiny(eos_p=0.03, sharpen=3.0).cuda()
    engine = HFEngine(model, tok)
    assert engine.device.type == "cuda"
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    out = engine.generate(PROMPTS, n=2, params=greedy)
    for c in out:
        ref = model.generate(input_ids=torch.tensor([PROMPTS[c.prompt_index]], device="cuda"), do_sample=False,
                             max_new_tokens=12, pad_token_id=0, eos_token_id=EOS)[0, len(PROMPTS[c.prompt_index]):]
        assert c.token_ids == ref.tolist()
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, seed=3)
    a = engine.generate(PROMPTS, n=8, params=params)
    assert [c.token_ids for c in a] == [c.token_ids for c in engine.generate(PROMPTS, n=8, params=params)]
    for c in a:
        prompt = torch.tensor([PROMPTS[c.prompt_index] + c.token_ids], device="cuda")
        with torch.no_grad():
            logits = model(input_ids=prompt).logits[0, len(PROMPTS[c.prompt_index]) - 1:-1]
        lp = processed_logprobs(logits, params).gather(-1, torch.tensor(c.token_ids, device="cuda")[:, None])
        assert torch.isfinite(lp).all()
        torch.testing.assert_close(torch.tensor(c.logprobs), lp.squeeze(-1).cpu(), atol=1e-4, rtol=0)
    # bfloat16 runs and gives valid completions
    out = HFEngine(model.to(torch.bfloat16), tok).generate(PROMPTS, n=4, params=params)
    assert all(1 <= len(c.token_ids) <= 10 and len(c.logprobs) == len(c.token_ids) for c in out)
