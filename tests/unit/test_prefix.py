"""Shared-prefix packed training forward (grpokit.modeling.prefix) against the plain padded forward:
same logprobs, entropies and parameter gradients on tiny Qwen2 / Llama / GPT-2 models, random
prompts of different lengths, whole and cut groups, LoRA, gradient checkpointing."""

import pytest
import torch

from grpokit.modeling import prefix
from grpokit.core.batch import make_micro_batches
from grpokit.core.forward import completion_logprobs, uses_packed_forward
from grpokit.modeling.prefix import build_packed_layout, find_segments
from tests.helpers import make_char_tokenizer, make_tiny_model, random_rollout


@pytest.fixture(params=["dense", "prefix"])
def attention(request):
    """Run a test with the dense 4-D mask attention, and with `prefix_attention` on every row
    (the forward's argument dense_row_tokens=0), counting that the latter did run. Yields
    (mode, calls, keyword arguments for completion_logprobs)."""
    calls = []
    if request.param == "prefix":
        from transformers import AttentionInterface

        def counted(*args, **kw):
            calls.append(1)
            return prefix.prefix_attention(*args, **kw)

        AttentionInterface.register(prefix.ATTENTION_NAME, counted)
        yield request.param, calls, {"dense_row_tokens": 0}
        AttentionInterface.register(prefix.ATTENTION_NAME, prefix.prefix_attention)
    else:
        yield request.param, calls, {}


def forward_and_grads(model, mb, packed, temperature=0.7, seed=0, **kw):
    """logps, entropies (0 on padding) and d/dparams of an arbitrary weighted sum of both."""
    model.zero_grad(set_to_none=True)
    logps, ent = completion_logprobs(model, mb, temperature=temperature, with_entropy=True, packed=packed, **kw)
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(mb.completion_ids.shape, generator=gen, dtype=logps.dtype)
    m = mb.completion_mask.to(logps.dtype)
    ((logps * w * m).sum() + (ent * m).sum() * 0.3).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps * m, ent * m, grads


def assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_layout_by_hand():
    # prompt A = [5, 6] with completions [7, 8] and [9]; prompt B = [10] with completion [11, 12, 13]
    layout = build_packed_layout([[5, 6], [5, 6], [10]], [[7, 8], [9], [11, 12, 13]])
    # segments: A (2 + 3 = 5 tokens), B (1 + 3 = 4): B does not fit in A's row of 5 -> two rows of 5
    assert find_segments([[5, 6], [5, 6], [10]]) == [(0, 2), (2, 3)]
    assert layout.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert layout.part_ids.tolist() == [[0, 0, 1, 1, 2], [0, 1, 1, 1, -1]]
    # token 7 is predicted by the last prompt token (flat 1), 8 by 7 (flat 2), 9 by the prompt (flat 1);
    # 11 by flat 5 (row 1, t 0), 12 by 6, 13 by 7
    assert layout.predict_index.tolist() == [1, 2, 1, 5, 6, 7]
    assert layout.targets.tolist() == [7, 8, 9, 11, 12, 13]
    assert list(zip(layout.out_rows.tolist(), layout.out_cols.tolist())) == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (2, 2)]
    visible = layout.attention_mask(torch.float32)[:, 0] == 0
    # row 0: 9 (t=4) sees the prompt (t 0, 1) and itself, not the other completion (t 2, 3)
    assert visible[0, 4].tolist() == [True, True, False, False, True]
    assert visible[0, 3].tolist() == [True, True, True, True, False]
    # row 1: the padding (t=4) sees only itself; 13 (t=3) sees its prompt and completion
    assert visible[1, 4].tolist() == [False, False, False, False, True]
    assert visible[1, 3].tolist() == [True, True, True, True, False]
    assert layout.num_prompt_tokens == 3


def test_small_segments_share_a_row_and_budget_splits_big_groups():
    layout = build_packed_layout([[1] * 6] * 2 + [[2]] * 2 + [[3]], [[4, 4]] * 2 + [[5]] * 2 + [[6]])
    # segments of 10, 3 and 2 tokens: the two small ones share the second row of 10
    assert layout.shape == (2, 10)
    # rows of at least 13 tokens: the 10- and 3-token segments share one; 15: all three share one
    args = ([[1] * 6] * 2 + [[2]] * 2 + [[3]], [[4, 4]] * 2 + [[5]] * 2 + [[6]])
    assert build_packed_layout(*args, min_row_tokens=13).shape == (2, 13)
    assert build_packed_layout(*args, min_row_tokens=15).shape == (1, 15)
    assert build_packed_layout(*args, min_row_tokens=99).shape == (1, 15)  # never wider than all tokens
    split = build_packed_layout([[1] * 6] * 4, [[4] * 5] * 4, max_segment_tokens=16)
    # 6 + 4 * 5 = 26 > 16: two segments of 6 + 2 * 5 = 16, each with its own copy of the prompt
    assert split.shape == (2, 16) and split.num_prompt_tokens == 12


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
@pytest.mark.parametrize("size", [12, 8, 3, "short"])
def test_packed_equals_plain_fp32(arch, size, attention):
    """size 12 = every group in one micro-batch, 8 = two whole groups, 3 = groups cut in pieces,
    "short" = short groups (packed below with rows of 32 tokens, so that they share rows)."""
    model = make_tiny_model(make_char_tokenizer(), arch=arch, num_layers=2)
    assert uses_packed_forward(model)
    if size == "short":
        rollout, size = random_rollout(g=2, n_prompts=6, seed=1, max_prompt=4, max_completion=3), 12
    else:
        rollout = random_rollout(g=4, n_prompts=3, seed=sum(map(ord, arch)) + size)
    for mb in make_micro_batches(rollout, size, pad_id=0, device="cpu", mask_truncated=False):
        assert_same(forward_and_grads(model, mb, packed=True, **attention[2]), forward_and_grads(model, mb, packed=False))
        # the packed layout computes each prompt once per piece of a group
        assert mb._layout.num_prompt_tokens == sum(len(mb.prompt_token_ids[s]) for s, _ in
                                                   find_segments(mb.prompt_token_ids))
        if len(mb.completion_token_ids) == 12 and max(map(len, mb.prompt_token_ids)) <= 4:
            mb._layout = mb.layout(min_row_tokens=32)
            mb.layout = lambda *a, saved=mb._layout: saved  # the forward now uses the shared rows
            assert mb._layout.segment_ids.max() > 0  # several segments in one row
            assert_same(forward_and_grads(model, mb, packed=True, **attention[2]), forward_and_grads(model, mb, packed=False))
    assert bool(attention[1]) == (attention[0] == "prefix")


def test_packed_equals_plain_fp64_exactly(attention):
    """In float64 GPT-2 (no float32 islands such as Llama's RMSNorm) the two layouts agree to
    rounding: the packed one computes exactly the same function."""
    model = make_tiny_model(make_char_tokenizer(), arch="gpt2", num_layers=3).double()
    rollout = random_rollout(g=5, n_prompts=3, seed=3, max_prompt=20, max_completion=15)
    for mb in make_micro_batches(rollout, 10, pad_id=0, device="cpu", mask_truncated=False):
        assert_same(forward_and_grads(model, mb, packed=True, **attention[2]), forward_and_grads(model, mb, packed=False),
                    rtol=1e-10, atol=1e-12)
    assert bool(attention[1]) == (attention[0] == "prefix")


def test_a_wrong_mask_is_detected():
    """Control: letting completions of a group see each other changes the logprobs, so the
    comparisons above would catch a mask that leaks across completions."""
    model = make_tiny_model(make_char_tokenizer(), arch="qwen2")
    mb = make_micro_batches(random_rollout(g=4, n_prompts=1, seed=5), 4, pad_id=0, device="cpu",
                            mask_truncated=False)[0]
    good = forward_and_grads(model, mb, packed=True)
    layout = mb._layout  # the layout that forward built and caches
    layout.part_ids = torch.where(layout.part_ids > 0, torch.ones_like(layout.part_ids), layout.part_ids)
    leaky = forward_and_grads(model, mb, packed=True)
    assert not torch.allclose(good[0], leaky[0], atol=1e-4)


def test_segment_budget_and_empty_and_masked_completions(attention):
    model = make_tiny_model(make_char_tokenizer(), arch="llama")
    rollout = random_rollout(g=6, n_prompts=2, seed=7, empty_row=3)
    rollout.truncated[[1, 8]] = True
    for mb in make_micro_batches(rollout, 12, pad_id=0, device="cpu", mask_truncated=True):
        plain = forward_and_grads(model, mb, packed=False)
        assert_same(forward_and_grads(model, mb, packed=True, **attention[2]), plain)
        # masked (truncated) and empty completions are not computed at all
        assert mb.layout().targets.numel() == int(mb.completion_mask.sum())
        assert_same(forward_and_grads(model, mb, packed=True, max_segment_tokens=16, **attention[2]), plain)
        assert mb.layout(16).shape[0] > 2


def test_lora_policy_and_reference_with_the_adapter_off(attention):
    from grpokit.models import apply_lora, reference_logits_context

    tok = make_char_tokenizer()
    model = apply_lora(make_tiny_model(tok, arch="qwen2"), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                            "target_modules": ["q_proj", "v_proj", "down_proj"]})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    base = make_tiny_model(tok, arch="qwen2")
    mb = make_micro_batches(random_rollout(g=4, n_prompts=2, seed=9), 8, pad_id=0, device="cpu",
                            mask_truncated=False)[0]
    packed = forward_and_grads(model, mb, packed=True, **attention[2])
    assert_same(packed, forward_and_grads(model, mb, packed=False))
    assert all("lora_" in n for n in packed[2])
    with reference_logits_context(model) as ref:
        ref_logps = completion_logprobs(ref, mb, temperature=0.7, **attention[2])[0] * mb.completion_mask
    with torch.no_grad():
        base_logps = completion_logprobs(base, mb, temperature=0.7, packed=False)[0] * mb.completion_mask
    torch.testing.assert_close(ref_logps, base_logps)
    assert not torch.allclose(ref_logps, packed[0], atol=1e-3)  # the adapter does change the policy
    assert bool(attention[1]) == (attention[0] == "prefix")


def test_gradient_checkpointing_gives_the_same_gradients(attention):
    model = make_tiny_model(make_char_tokenizer(), arch="qwen2", num_layers=3)
    mb = make_micro_batches(random_rollout(g=4, n_prompts=2, seed=11), 8, pad_id=0, device="cpu",
                            mask_truncated=False)[0]
    model.train()

    def saved_elements_and_result():
        saved = [0]

        def pack(t):
            saved[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = forward_and_grads(model, mb, packed=True, **attention[2])
        return saved[0], result

    saved_plain, expected = saved_elements_and_result()
    model.gradient_checkpointing_enable()
    calls = len(attention[1])
    saved_ckpt, got = saved_elements_and_result()
    assert_same(got, expected)
    assert len(attention[1]) == calls  # under checkpointing the forward keeps the dense mask
    assert saved_ckpt < saved_plain / 3  # the layers' activations were not kept: checkpointing did happen


def test_models_without_full_attention_take_the_padded_path():
    tok = make_char_tokenizer()
    sliding = make_tiny_model(tok, arch="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not uses_packed_forward(sliding)
    mb = make_micro_batches(random_rollout(g=2, n_prompts=1), 2, pad_id=0, device="cpu", mask_truncated=False)[0]
    logps, _ = completion_logprobs(sliding, mb, temperature=1.0)  # default: padded, works
    assert logps.shape == mb.completion_ids.shape
    with pytest.raises(ValueError, match="packed"):
        completion_logprobs(sliding, mb, temperature=1.0, packed=True)
