"""Vision-language models in the training forward (grpokit.modeling.vision): the packed shared-prefix
layout and the padded one with image features computed once per prompt give the logprobs and the
gradients of the model's own forward run row by row with its pixel values (TRL's way), on tiny
Qwen2-VL (M-RoPE positions) and LLaVA models built here; the vision tower runs once per group."""

import pytest
import torch

from grpokit.core.batch import make_micro_batches
from grpokit.core.forward import completion_logprobs, uses_packed_forward
from grpokit.trajectory import Trajectories
from grpokit.modeling.vision import ImageFeatures, vision_parameters
from grpokit.data.vision import encode_vision_prompt, multimodal_messages, open_image
from tests.helpers import assert_matches_reference, grads, make_tiny_vlm, picture, reference_logprobs, weighted

pytestmark = pytest.mark.vision

FAMILIES = ["qwen2_vl", "llava"]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    processor, model = make_tiny_vlm(request.param, seed=0)
    return request.param, processor, model


def vision_rollout(processor, g=3, seed=0):
    """Four groups: one image; the same text with another image (same token ids, other features);
    two images; a text-only prompt. Random completions of 1-6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    question = [{"role": "user", "content": "what is it?"}]
    specs = [(question, [picture(1)]), (question, [picture(2)]), (question, [picture(3), picture(4)]),
             ([{"role": "user", "content": "no picture here"}], None)]
    prompt_ids, visions, comps = [], [], []
    vocab = len(processor.tokenizer)
    for k, (messages, images) in enumerate(specs):
        ids, v = encode_vision_prompt(messages, images, processor, where=f"row {k}")
        for _ in range(g):
            prompt_ids.append(ids)
            visions.append(v)
            n = int(torch.randint(1, 7, (1,), generator=gen))
            comps.append(torch.randint(4, vocab - 8, (n,), generator=gen).tolist())
    n = len(prompt_ids)
    assert prompt_ids[0] == prompt_ids[g] and visions[0] is not visions[g]
    return Trajectories(row_index=[i // g for i in range(n)], prompts=[None] * n, completions=[None] * n,
                        prompt_ids=prompt_ids, completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                        truncated=torch.zeros(n, dtype=torch.bool), images=visions)


@pytest.mark.parametrize("packed", [True, False])
def test_forward_equals_the_models_own_per_row_forward(vlm, packed):
    family, processor, model = vlm
    traj = vision_rollout(processor)
    t = 0.7
    model.zero_grad(set_to_none=True)
    ref = reference_logprobs(model, traj, t)
    weighted(ref).backward()
    ref_grads = grads(model)
    assert any(n for n, _ in vision_parameters(model) if n in ref_grads)  # the tower is trained here

    if packed:
        assert uses_packed_forward(model)
    features = ImageFeatures()
    assert_matches_reference(model, traj, ref, ref_grads, temperature=t, packed=packed, features=features,
                             pad_id=processor.tokenizer.pad_token_id)
    # three prompts with images, three samples each: the tower ran three times, not nine
    assert features.calls == 3


def test_frozen_vision_tower_features_are_computed_once_per_step(vlm):
    family, processor, model = vlm
    traj = vision_rollout(processor)
    frozen = [p for _, p in vision_parameters(model)]
    for p in frozen:
        p.requires_grad_(False)
    calls = []
    tower = model.model.visual if family == "qwen2_vl" else model.model.vision_tower
    handle = tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        features = ImageFeatures()
        mbs = make_micro_batches(traj, 2, pad_id=processor.tokenizer.pad_token_id, device="cpu",
                                 mask_truncated=False)
        assert len(mbs) == 6  # groups of 3 cut by micro-batches of 2: a prompt in two micro-batches
        for _ in range(2):  # two passes (num_iterations = 2)
            for mb in mbs:
                logps, _ = completion_logprobs(model, mb, temperature=1.0, image_features=features)
                logps.sum().backward()
        assert len(calls) == 3 and features.calls == 3
    finally:
        handle.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.zero_grad(set_to_none=True)


def test_images_of_a_row_are_opened_from_every_form(tmp_path):
    img = picture(5)
    path = tmp_path / "x.png"
    img.save(path)
    with open(path, "rb") as f:
        raw = f.read()
    for value in (img, str(path), path, {"bytes": raw, "path": None}, {"bytes": None, "path": str(path)},
                  img.convert("L"), torch.zeros(4, 4, 3, dtype=torch.uint8).numpy()):
        out = open_image(value, "row 3")
        assert out.mode == "RGB"
    with pytest.raises(ValueError, match=r"row 3: cannot open the image '.*missing.png'"):
        open_image(str(tmp_path / "missing.png"), "row 3")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="row 3: cannot open the image"):
        open_image(str(bad), "row 3")


def test_multimodal_messages_put_images_before_the_first_user_text():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"},
            {"role": "user", "content": "and?"}]
    out = multimodal_messages(msgs, 2)
    assert out[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what?"}]
    assert out[2]["content"] == [{"type": "text", "text": "and?"}]
    assert msgs[1]["content"] == "what?"  # the row is left as it was
    own = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]
    assert multimodal_messages(own, 1) == own
    with pytest.raises(ValueError, match="2 image parts for 1 images"):
        multimodal_messages([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}], 1)


def test_standard_prompt_gets_one_placeholder_per_image(vlm):
    family, processor, _ = vlm
    ids, v = encode_vision_prompt("count them:", [picture(1), picture(2)], processor, where="row 0")
    assert v.num_images == 2
    plain, none = encode_vision_prompt("count them:", None, processor, where="row 0")
    assert none is None and len(ids) > len(plain)


@pytest.mark.parametrize("engine_name", ["hf", "hf-generate"])
def test_engine_prefills_each_image_prompt_once_and_decodes_as_the_full_forward(vlm, engine_name):
    """Greedy rollouts of the HF engine (prompt prefilled once per group with its image features,
    KV cache shared by the G samples, M-RoPE positions shifted) and of transformers' generate
    (features computed once per prompt, given as mm_encoder_outputs to every sample row of a
    left-padded batch) equal greedy decoding by the model's own forward re-encoding the whole
    sequence with its pixel values at every token."""
    from grpokit.rollout import make_engine
    from grpokit.rollout.sampling import SamplingParams

    family, processor, model = vlm
    traj = vision_rollout(processor, g=1)
    prompts, visions = traj.prompt_ids, traj.images
    features = ImageFeatures()
    engine = make_engine(engine_name, model, processor.tokenizer)
    outs = engine.generate(prompts, n=2, params=SamplingParams(max_tokens=6, temperature=0.0, seed=0),
                           images=visions, image_features=features)
    assert features.calls == 3  # one vision-tower call per prompt with images, for its 2 samples
    model.eval()
    with torch.no_grad():
        for i, (p, v) in enumerate(zip(prompts, visions)):
            seq = list(p)
            for _ in range(6):
                kw = {}
                if v is not None:
                    kw.update(v.tensors)
                    kw.update({k: torch.cat([t, torch.zeros((1, len(seq) - len(p)), dtype=t.dtype)], 1)
                               for k, t in v.token_tensors.items()})
                nxt = int(model(input_ids=torch.tensor([seq]), **kw).logits[0, -1].argmax())
                seq.append(nxt)
                if nxt in engine.eos_ids:
                    break
            want = seq[len(p):]
            for k in range(2):
                assert outs[2 * i + k].token_ids == want, (family, i)
    model.train()


def test_generate_returning_only_sequences_is_scored_with_the_images(vlm):
    """A `generate` that returns the sequences only (a wrapper, TRL tests' mocks): the hf-generate
    engine scores the sampled tokens by one forward with the prompts' images, and gets the logprobs
    generate's own scores give."""
    from unittest.mock import patch

    from grpokit.rollout import make_engine
    from grpokit.rollout.sampling import SamplingParams

    family, processor, model = vlm
    traj = vision_rollout(processor, g=1)
    from grpokit.core.forward import score_with_training_forward

    engine = make_engine("hf-generate", model, processor.tokenizer, score_with_images=score_with_training_forward)
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3)
    scored = engine.generate(traj.prompt_ids, n=2, params=params, images=traj.images)
    real = model.generate

    def sequences_only(*args, **kwargs):
        return real(*args, **kwargs).sequences

    with patch.object(model, "generate", side_effect=sequences_only):
        forward = engine.generate(traj.prompt_ids, n=2, params=params, images=traj.images)
    assert [o.token_ids for o in forward] == [o.token_ids for o in scored]
    for a, b in zip(forward, scored):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_images_in_completions_tool_results_train_as_the_models_own_forward(vlm):
    """A tool result with an image inside a completion (model tokens, the result's turn with the
    image expanded by the processor, model tokens): the padded training forward puts the image's
    features in its slots (M-RoPE over the whole sequence) and gives the logprobs and gradients
    of the model's own forward on the whole sequence with every image's pixel values. A
    micro-batch with such rows never takes the packed layout."""
    from grpokit.data.vision import encode_text_with_images, join_vision

    family, processor, model = vlm
    tok = processor.tokenizer
    turn = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": "seen"}]}],
                                         tokenize=False)
    raw = tok(turn, add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(7)
    words = tok("the cat sat", add_special_tokens=False)["input_ids"]
    rows = []
    for k, (messages, prompt_images) in enumerate([([{"role": "user", "content": "look"}], [picture(11)]),
                                                   ([{"role": "user", "content": "no picture"}], None)]):
        prompt, v = encode_vision_prompt(messages, prompt_images, processor, where=f"row {k}")
        result, tool_v = encode_text_with_images(raw, [picture(20 + k)], processor, where="tool")
        before = [words[int(i)] for i in torch.randint(0, len(words), (2,), generator=gen)]
        after = [words[int(i)] for i in torch.randint(0, len(words), (3,), generator=gen)]
        completion = before + result + after
        rows.append((prompt, v, completion, join_vision(len(completion), [(len(before), tool_v)]), tool_v))
    n = len(rows)
    traj = Trajectories(row_index=list(range(n)), prompts=[None] * n, completions=[None] * n,
                        prompt_ids=[r[0] for r in rows], completion_ids=[r[2] for r in rows],
                        sampling_logps=[[0.0] * len(r[2]) for r in rows], truncated=torch.zeros(n, dtype=torch.bool),
                        images=[r[1] for r in rows], completion_images=[r[3] for r in rows])
    t = 0.8
    model.zero_grad(set_to_none=True)
    ref = []
    for prompt, v, completion, cv, tool_v in rows:
        kw = {}
        parts = [x for x in (v, tool_v) if x is not None]
        for key in parts[0].tensors:
            kw[key] = torch.cat([x.tensors[key] for x in parts])
        for key, grid in cv.token_tensors.items():
            head = v.token_tensors[key] if v is not None else torch.zeros((1, len(prompt)), dtype=grid.dtype)
            kw[key] = torch.cat([head, grid], dim=1)
        logits = model(input_ids=torch.tensor([prompt + completion]), **kw).logits[0, len(prompt) - 1:-1] / t
        ref.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    weighted(ref).backward()
    # asked for the packed layout, the forward takes the padded one for these rows
    assert_matches_reference(model, traj, ref, grads(model), temperature=t, packed=True, features=ImageFeatures(),
                             pad_id=tok.pad_token_id)
