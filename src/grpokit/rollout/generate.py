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

import torch

from grpokit.rollout.base import Completion, finish_text, register_engine
from grpokit.rollout.sampling import SamplingParams

HYBRID_LAYER_WORDS = ("mamba", "linear", "ssm", "conv", "recurrent", "rwkv")
"""Per-layer kinds (config.layer_types / layers_block_type) whose state is not a KV cache."""


def needs_generate(model) -> str | None:
    """Why HFEngine's KV-only decode cache cannot hold this model's state (None when it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
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

    `generation_kwargs`: extra `GenerationConfig` settings (num_beams, length_penalty, ...)."""

    def __init__(self, model, tokenizer, *, generation_kwargs: dict | None = None, max_batch_tokens=None, **_):
        self.model, self.tokenizer = model, tokenizer
        self.generation_kwargs = dict(generation_kwargs or {})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        self.stats: dict[str, float] = {}

    def update_weights(self, model) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())

    def generate(self, prompt_ids: list[list[int]], n: int = 1,
                 params: SamplingParams | None = None) -> list[Completion]:
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
        sampling = dict(do_sample=not params.greedy, max_new_tokens=params.max_tokens,
                        repetition_penalty=params.repetition_penalty)
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
                                     **{**sampling, **self.generation_kwargs})
                if isinstance(out, torch.Tensor):  # a generate that returns the sequences only (a wrapper, a mock)
                    sequences = out
                    scores = self._scored(sequences, mask.to(device), width, params)
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
            end, reason = len(tokens), "length"
            for t, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    end, reason = t + 1, "stop"
                    break
            else:  # a stop string ends the row early: generate pads what follows
                while end > 0 and tokens[end - 1] == self.pad_id:
                    end -= 1
            text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
            text, cut = finish_text(text, params.stop)
            if cut:
                reason = "stop"
            results.append(Completion(prompt_index=row // n, token_ids=tokens[:end],
                                      logprobs=scores[row, :end].tolist(), finish_reason=reason, text=text))
        return results

    def _scored(self, sequences: torch.Tensor, prompt_mask: torch.Tensor, width: int, params: SamplingParams):
        """Logprobs [rows, generated] of generated tokens under the model at the sampling
        temperature, by one forward (when generate returned no scores)."""
        import inspect

        from grpokit.rollout.sampling import processed_logprobs

        gen = sequences[:, width:]
        mask = torch.cat([prompt_mask, torch.ones_like(gen)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        keep = {"logits_to_keep": gen.shape[1] + 1} if "logits_to_keep" in inspect.signature(base.forward).parameters \
            else {}  # the output projection on the generated positions only (not the prompt's)
        logits = self.model(input_ids=sequences, attention_mask=mask, position_ids=positions, **keep).logits
        logits = logits[:, -(gen.shape[1] + 1):-1].float()
        flat = processed_logprobs(logits.reshape(-1, logits.shape[-1]),
                                  SamplingParams(max_tokens=1, temperature=params.temperature or 1.0))
        return flat.view(*gen.shape, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
