"""The training forward + backward of a vision-language model's GRPO micro-batch, three ways, in one run.

    python benchmarks/vision_forward.py [--threads 1] [--groups 4] [--g 8] [--image 224] [--repeats 5]

- plain: the model's own forward on the padded batch with every row's pixel values (what TRL's
  GRPOTrainer runs: the vision tower encodes each group's image G times, the prompt is computed G
  times), log-softmax over the completion positions;
- grpokit padded: the same padded rows, each distinct prompt's image features computed once
  (grpokit.modeling.vision), lm_head in chunks;
- grpokit packed: the shared-prefix packed layout (each prompt once per group) with the features once.

Model: Qwen2-VL-shaped, random init, float32 (text: hidden 256, 4 layers; vision: 4 blocks of 256,
14-pixel patches merged 2x2), built from a config here. Workload: `--groups` prompts with one
`--image`-pixel image each, G completions of 24-40 random tokens. Prints median seconds per
forward + backward and the ratios, and how many images the vision tower encoded in each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image


def build(image: int):
    from grpokit.models import new_vision_model, new_vision_processor

    processor = new_vision_processor("qwen2_vl", image_size=image)
    model = new_vision_model(processor, "qwen2_vl", hidden_size=256, layers=4, vision_hidden_size=256,
                             vision_layers=4, seed=0)
    return processor, model


def workload(processor, groups: int, g: int, image: int, seed: int = 0):
    from grpokit.trajectory import Trajectories
    from grpokit.data.vision import encode_vision_prompt

    gen = torch.Generator().manual_seed(seed)
    vocab = len(processor.tokenizer)
    prompt_ids, visions, comps = [], [], []
    for k in range(groups):
        pixels = torch.randint(0, 256, (image, image, 3), generator=gen, dtype=torch.uint8).numpy()
        ids, v = encode_vision_prompt([{"role": "user", "content": f"question {k}: what is in the picture?"}],
                                      [Image.fromarray(pixels)], processor, where=f"prompt {k}")
        for _ in range(g):
            prompt_ids.append(ids)
            visions.append(v)
            comps.append(torch.randint(4, vocab - 8, (int(torch.randint(24, 41, (1,), generator=gen)),),
                                       generator=gen).tolist())
    n = len(comps)
    return Trajectories(row_index=[i // g for i in range(n)], prompts=[None] * n, completions=[None] * n,
                        prompt_ids=prompt_ids, completion_ids=comps, sampling_logps=[[0.0] * len(c) for c in comps],
                        truncated=torch.zeros(n, dtype=torch.bool), images=visions)


def plain_step(model, mb, traj):
    """The model's own forward on the padded rows, every row with its pixel values (TRL's layout)."""
    kw = {"pixel_values": torch.cat([v.tensors["pixel_values"] for v in traj.images]),
          "image_grid_thw": torch.cat([v.tensors["image_grid_thw"] for v in traj.images])}
    p = mb.prompt_width
    tt = torch.zeros(mb.input_ids.shape, dtype=torch.long)
    for b, v in enumerate(traj.images):
        t = v.token_tensors["mm_token_type_ids"][0]
        tt[b, p - t.shape[0]:p] = t
    c = mb.completion_ids.shape[1]
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, mm_token_type_ids=tt, **kw,
                logits_to_keep=c + 1)
    logps = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, mb.completion_ids[..., None])[..., 0]
    (logps * mb.completion_mask).sum().backward()


def grpokit_step(model, mb, packed: bool):
    from grpokit.core.forward import completion_logprobs

    logps, _ = completion_logprobs(model, mb, temperature=1.0, packed=packed)
    (logps * mb.completion_mask).sum().backward()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--image", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from grpokit.core.batch import make_micro_batches
    from grpokit.modeling.vision import ImageFeatures

    processor, model = build(args.image)
    traj = workload(processor, args.groups, args.g, args.image)
    tower_calls = []
    def count_images(module, args, kwargs, output):  # images encoded by one call of the vision tower
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        tower_calls.append(int(grid.shape[0]))

    model.model.visual.register_forward_hook(count_images, with_kwargs=True)
    n_params = sum(p.numel() for p in model.parameters())
    v0 = traj.images[0]
    print(f"model: Qwen2-VL-shaped, {n_params / 1e6:.2f}M parameters; {args.groups} prompts x G={args.g}, "
          f"{v0.num_image_tokens} image tokens per prompt ({v0.tensors['pixel_values'].shape[0]} patches), "
          f"prompt {len(traj.prompt_ids[0])} tokens; {args.threads} thread(s)")

    def micro_batch():
        (mb,) = make_micro_batches(traj, len(traj), pad_id=processor.tokenizer.pad_token_id, device="cpu",
                                   mask_truncated=False, image_features=ImageFeatures())
        return mb

    ways = {"plain (TRL layout)": lambda mb: plain_step(model, mb, traj),
            "grpokit padded": lambda mb: grpokit_step(model, mb, packed=False),
            "grpokit packed": lambda mb: grpokit_step(model, mb, packed=True)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    calls: dict[str, int] = {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, fn in ways.items():
            mb = micro_batch()
            model.zero_grad(set_to_none=True)
            tower_calls.clear()
            t0 = time.perf_counter()
            fn(mb)
            dt = time.perf_counter() - t0
            calls[name] = sum(tower_calls)
            if r:
                times[name].append(dt)
    base = statistics.median(times["plain (TRL layout)"])
    for name in ways:
        med = statistics.median(times[name])
        print(f"{name:20s} {med:7.3f} s/forward+backward  images encoded {calls[name]:3d}  "
              f"speed-up {base / med:5.2f}x")


if __name__ == "__main__":
    main()
