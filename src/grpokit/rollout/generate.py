"""The `hf-generate` engine: transformers' own `model.generate`, for what HFEngine cannot do.

HFEngine's decode cache holds attention keys and values only, and its sampler does temperature,
top-k, top-p, min-p and the repetition penalty. Models with other per-layer state (hybrid Mamba /
linear-attention models such as Nemotron-H) and generation settings beyond those (beam search,
`length_penalty`, `no_repeat_ngram_size`, ... through `generation_kwargs`, as TRL passes them to
`GenerationConfig`) run here instead: slower (no shared-prefix prefill, no early row exit), but
whatever transformers generates. The logprob of each generated token is that of the distribution
`generate` sampled from (`compute_transition_scores` of its processed scores, beams included).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from grpokit.modeling.info import text_config, unwrap
from grpokit.rollout.base import Completion, EngineCapabilities, eos_ids, finish_text, register_engine
from grpokit.rollout.sampling import SamplingParams

HYBRID_LAYER_WORDS = ("mamba", "linear", "ssm", "conv", "recurrent", "rwkv")
"""Per-layer kinds (config.layer_types / layers_block_type) whose state is not a KV cache."""


def needs_generate(model) -> str | None:
    """Why HFEngine's KV-only decode cache cannot hold this model's state (None when it can)."""
    base = unwrap(model)
    cfg = text_config(base)
    kinds = [str(k).lower() for k in (getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None)
                                      or [])]
    pattern = str(getattr(cfg, "hybrid_override_pattern", "") or "")
    if any(word in k for k in kinds for word in HYBRID_LAYER_WORDS) or any(c in pattern for c in "M-*"):
        return f"{type(base).__name__} has non-attention layers (Mamba / linear attention) whose state is no KV cache"
    if "mamba" in str(getattr(cfg, "model_type", "")):
        return f"{type(base).__name__} is a state-space model"
    return None


@register_engine("hf-generate")
class GenerateEngine:
    """n samples per prompt through `model.generate`: each prompt n times in one left-padded batch,
    one sequence per row (as TRL repeats its prompts; beam settings then apply per sample).

    `generation_kwargs`: extra `GenerationConfig` settings (num_beams, length_penalty, ...);
    `score_with_images`: see `_scored_with_images`."""

    capabilities = EngineCapabilities(images=True, kv_across_turns=False, exact_fp32_logprobs=False,
                                      sampler_differs_from_trainer=False, uses_model_generate=True)

    def __init__(self, model, tokenizer, *, generation_kwargs: dict | None = None, max_batch_tokens=None,
                 score_with_images: Callable[..., torch.Tensor] | None = None, **_):
        self.model, self.tokenizer = model, tokenizer
        # the training forward that scores sampled sequences with images when generate gives no
        # scores (grpokit.core.forward.score_with_training_forward; given, not imported: the engine
        # sits below the core)
        self.score_with_images = score_with_images
        self.generation_kwargs = dict(generation_kwargs or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # a turn ends on any of them, as in TRL (the tokenizer's EOS too: a model whose generation
        # config names only <|endoftext|> still ends its chat turns on <|im_end|>)
        self.eos_ids = eos_ids(model, tokenizer)
        self.stats: dict[str, float] = {}

    def update_weights(self, model) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def generate(self, prompt_ids: list[list[int]], n: int = 1,
                 params: SamplingParams | None = None, images: list | None = None,
                 image_features=None) -> list[Completion]:
        """`images` (a vision-language model): per prompt, its images' processor tensors
        (grpokit.data.vision.VisionInputs) or None. Each prompt's features are computed once
        (`image_features`, a grpokit.modeling.vision.ImageFeatures, shared with the training forward
        when the tower is frozen) and given to `generate` as its `mm_encoder_outputs`, one copy per
        sample row, with the per-image and per-token tensors (image_grid_thw, mm_token_type_ids,
        ...) of every row; the model places them and computes its own positions (M-RoPE)."""
        params = params or SamplingParams()
        model = self.model
        device = next(model.parameters()).device
        width = max(len(p) for p in prompt_ids)
        rows = [p for p in prompt_ids for _ in range(n)]
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        row_images = [v for v in (images or [None] * len(prompt_ids)) for _ in range(n)]
        vision = self._vision_kwargs(row_images, width, device, image_features) \
            if any(v is not None for v in row_images) else {}
        sampling = dict(do_sample=not params.greedy, max_new_tokens=params.max_tokens,
                        repetition_penalty=params.repetition_penalty, eos_token_id=sorted(self.eos_ids))
        if not params.greedy:
            sampling.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None,
                            min_p=params.min_p or None)
        if params.stop:
            sampling.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     pad_token_id=self.pad_id, return_dict_in_generate=True, output_scores=True,
                                     **vision, **{**sampling, **self.generation_kwargs})
                if isinstance(out, torch.Tensor):  # a generate that returns the sequences only (a wrapper, a mock)
                    sequences = out
                    scores = (self._scored_with_images(sequences, rows, row_images, width, params, image_features)
                              if vision else self._scored(sequences, mask.to(device), width, params))
                else:
                    sequences = out.sequences
                    scores = model.compute_transition_scores(out.sequences, out.scores,
                                                             getattr(out, "beam_indices", None), normalize_logits=True)
        finally:
            model.train(was_training)
        generated = sequences[:, width:].cpu()
        scores = scores.float().cpu()
        results = []
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            end = len(tokens)
            reason: Literal["stop", "length"] = "length"
            for t, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    end, reason = t + 1, "stop"
                    break
            else:  # a stop string ends the row early: generate pads what follows
                while params.stop and end > 0 and tokens[end - 1] == self.pad_id:
                    end -= 1
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            text, cut = finish_text(text, params.stop or [])
            if cut:
                reason = "stop"
            results.append(Completion(prompt_index=row // n, token_ids=tokens[:end],
                                      logprobs=scores[row, :end].tolist(), finish_reason=reason, text=text))
        return results

    def _vision_kwargs(self, row_images: list, width: int, device, image_features) -> dict:
        """generate's image arguments for the left-padded [rows, width] prompts: the features of
        each row's images (computed once per prompt) in row order, the per-image tensors of those
        rows, and the per-token tensors left-padded with 0 (text) to the width."""
        from grpokit.modeling.vision import ImageFeatures, encoder_outputs, image_kwargs, token_grids

        base = unwrap(self.model)
        features = image_features if image_features is not None else ImageFeatures()
        with_images = [v for v in row_images if v is not None]
        kw: dict[str, Any] = {"mm_encoder_outputs": encoder_outputs([features.of(base, v, grad=False)
                                                                     for v in with_images])}
        kw.update({k: t.to(device) for k, t in image_kwargs(with_images).items()})
        kw.update({k: t.to(device) for k, t in token_grids(row_images, (len(row_images), width), width).items()})
        return kw

    def _scored(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, width: int, params: SamplingParams):
        """Logprobs [rows, generated] of generated tokens under the model at the sampling
        temperature, by one forward (when generate returned no scores)."""
        import inspect

        from grpokit.rollout.sampling import processed_logprobs

        gen = sequences[:, width:]
        mask = torch.cat([prompt_mask, torch.ones_like(gen)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        base = unwrap(self.model)
        keep = {"logits_to_keep": gen.shape[1] + 1} if "logits_to_keep" in inspect.signature(base.forward).parameters \
            else {}  # the output projection on the generated positions only (not the prompt's)
        logits = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, **keep).logits
        logits = logits[:, -(gen.shape[1] + 1):-1].float()
        flat = processed_logprobs(logits.reshape(-1, logits.shape[-1]),
                                  SamplingParams(max_tokens=1, temperature=params.temperature or 1.0))
        return flat.view(*gen.shape, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)

    def _scored_with_images(self, sequences: torch.Tensor, rows: list[list[int]], row_images: list, width: int,
                            params: SamplingParams, image_features) -> torch.Tensor:
        """`_scored` for prompts with images: the training forward itself (`score_with_images`,
        given by the run: the padded layout, each prompt's features once, in its image slots only;
        an image token sampled in a completion is text there, as in training), at the sampling
        temperature."""
        if self.score_with_images is None:
            raise ValueError("hf-generate: generate() returned no scores for prompts with images; build the engine "
                             "with score_with_images=grpokit.core.forward.score_with_training_forward (the run does).")
        return self.score_with_images(self.model, rows, sequences[:, width:].cpu().tolist(), list(row_images),
                                      temperature=params.temperature or 1.0, pad_id=self.pad_id,
                                      device=sequences.device, image_features=image_features)