"""grpokit's training forward on every vision-language stand-in of TRL's test file (Gemma 3 with
its token_type_ids, Gemma 4 with its per-layer inputs, LLaVA-NeXT's anyres tiles, Qwen2-VL /
Qwen2.5-VL / Qwen3.5 M-RoPE, Qwen3.5's linear-attention layers): the logprobs and every parameter's
gradient equal the model's own forward run row by row with its pixel values (TRL's way), in the
padded layout and, where the model takes it, the packed shared-prefix one; each prompt's images go
through the vision tower once. (grpokit's own tiny Qwen2-VL and LLaVA: tests/unit/test_vision.py.)"""

import pytest
import torch

from grpokit.core.forward import uses_packed_forward
from grpokit.trajectory import Trajectories
from grpokit.modeling.vision import ImageFeatures
from grpokit.data.vision import encode_vision_prompt, load_processor
from tests.helpers import assert_matches_reference, grads, picture, reference_logprobs, weighted

pytestmark = pytest.mark.vision

ORG = "trl-internal-testing"
MODELS = ["tiny-Gemma3ForConditionalGeneration", "tiny-Gemma4ForConditionalGeneration",
          "tiny-LlavaNextForConditionalGeneration", "tiny-Qwen2_5_VLForConditionalGeneration",
          "tiny-Qwen2VLForConditionalGeneration", "tiny-Qwen3_5ForConditionalGeneration-NoThink",
          "tiny-Qwen3_5MoeForConditionalGeneration-3.6"]


def standin_rollout(processor, g=2, seed=0):
    """Three groups: one image, the same text with another image, a text-only prompt; completions
    of 1-5 ordinary text tokens (an image token sampled in a completion is text for grpokit and a
    placeholder for the model's own forward, so none is drawn here)."""
    gen = torch.Generator().manual_seed(seed)
    words = processor.tokenizer("a small red cat sat on the mat and looked at the blue sky",
                                add_special_tokens=False)["input_ids"]
    question = [{"role": "user", "content": "what is it?"}]
    specs = [(question, [picture(1)]), (question, [picture(2)]), ([{"role": "user", "content": "no picture"}], None)]
    prompt_ids, visions, comps = [], [], []
    for k, (messages, images) in enumerate(specs):
        ids, v = encode_vision_prompt(messages, images, processor, where=f"row {k}")
        for _ in range(g):
            prompt_ids.append(ids)
            visions.append(v)
            n = int(torch.randint(1, 6, (1,), generator=gen))
            comps.append([words[int(i)] for i in torch.randint(0, len(words), (n,), generator=gen)])
    n = len(prompt_ids)
    return Trajectories(row_index=[i // g for i in range(n)], prompts=[None] * n, completions=[None] * n,
                        prompt_ids=prompt_ids, completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                        truncated=torch.zeros(n, dtype=torch.bool), images=visions)


@pytest.mark.parametrize("name", MODELS)
def test_VLM_standin_forward_equals_the_models_own(name):
    from transformers import AutoModelForImageTextToText

    processor = load_processor(f"{ORG}/{name}")
    model = AutoModelForImageTextToText.from_pretrained(f"{ORG}/{name}", dtype=torch.float32)
    traj = standin_rollout(processor)
    t = 0.9
    model.zero_grad(set_to_none=True)
    ref = reference_logprobs(model, traj, t)
    weighted(ref).backward()
    ref_grads = grads(model)
    layouts = [False] + ([True] if uses_packed_forward(model) else [])
    for packed in layouts:
        features = ImageFeatures()
        assert_matches_reference(model, traj, ref, ref_grads, temperature=t, packed=packed, features=features,
                                 pad_id=processor.tokenizer.pad_token_id, atol=3e-5)
        assert features.calls == 2  # two prompts with images, two samples each
