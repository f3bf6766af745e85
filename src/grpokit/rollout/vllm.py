"""VLLMEngine: the same `generate` / `update_weights` contract served by vLLM (GPU, optional).

vLLM is imported when the engine is built, never at `import grpokit`. What differs from HFEngine:

- vLLM applies min-p *before* top-k/top-p (HFEngine: after, as HF `generate`); with min_p == 0
  or no top-k/top-p the distributions are the same.
- Logprobs are those of the processed distribution only with `logprobs_mode="processed_logprobs"`
  (vLLM >= 0.10.2; set here by default). Older vLLM returns raw-model logprobs: importance
  ratios against them are wrong when temperature != 1 or truncation is on.
- `seed` is vLLM's per-request seed: reproducible, but not the same samples as HFEngine.
- `update_weights` loads the trainer's weights into vLLM's model in place (`load_weights`); with
  vLLM's V1 engine in the same process (colocated training), start it with
  VLLM_ENABLE_V1_MULTIPROCESSING=0 so that the model object is reachable, as TRL does.
"""

from __future__ import annotations

from typing import Any

from grpokit.rollout.base import Completion, EngineCapabilities, eos_ids, register_engine
from grpokit.rollout.sampling import SamplingParams


@register_engine("vllm")
class VLLMEngine:
    """Args: model (a transformers model, its local path or hub id), tokenizer, and either a
    ready `vllm.LLM` as `llm=` or keyword arguments for `vllm.LLM(...)` (gpu_memory_utilization, ...).
    `max_batch_tokens` is accepted for parity with HFEngine and not used: vLLM bounds its KV
    memory itself (gpu_memory_utilization) and schedules the requests in pages."""

    capabilities = EngineCapabilities(images=False, kv_across_turns=False, exact_fp32_logprobs=False,
                                      sampler_differs_from_trainer=True, uses_model_generate=False)
    model = None
    """vLLM holds its own copy of the weights (`update_weights` loads the trainer's into it)."""

    def __init__(self, model, tokenizer, *, llm=None, max_batch_tokens: int | None = None,
                 generation_kwargs: dict | None = None, **llm_kwargs):
        import vllm

        self._vllm = vllm
        self.generation_kwargs = dict(generation_kwargs or {})  # more vllm.SamplingParams fields (TRL's)
        self.tokenizer = tokenizer
        # the ids vLLM stops on: the generation config's and the tokenizer's EOS
        self.eos_ids = eos_ids(None if isinstance(model, str) else model, tokenizer)
        if llm is None:
            path = model if isinstance(model, str) else getattr(model, "name_or_path", None)
            if not path:
                raise ValueError("VLLMEngine needs a model path (model.name_or_path) or a ready `llm=vllm.LLM(...)`")
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            llm_kwargs.setdefault("enable_prefix_caching", True)  # the G samples share the prompt's KV
            self.llm = vllm.LLM(model=path, **llm_kwargs)
            if not isinstance(model, str):
                self.update_weights(model)  # the trainer's weights may differ from those on disk
        else:
            self.llm = llm

    def generate(self, prompt_ids: list[list[int]], n: int = 1, params: SamplingParams | None = None,
                 images: list | None = None, image_features: Any = None) -> list[Completion]:
        if images is not None and any(v is not None for v in images):
            raise ValueError("the vLLM engine takes text prompts only (capabilities.images is False); sample "
                             "images with rollout_engine='hf' or 'hf-generate'.")
        params = params or SamplingParams()
        sp = self._vllm.SamplingParams(
            n=n, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1, min_p=params.min_p, seed=params.seed,
            repetition_penalty=params.repetition_penalty,
            stop=list(params.stop or []) or None, include_stop_str_in_output=True, skip_special_tokens=True,
            logprobs=0, **self.generation_kwargs,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outputs = self.llm.generate(prompts, sp, use_tqdm=False)
        results = []
        for i, request in enumerate(outputs):
            for out in request.outputs:
                ids = list(out.token_ids)
                logprobs = [step[t].logprob for step, t in zip(out.logprobs or [], ids)]
                results.append(Completion(prompt_index=i, token_ids=ids, logprobs=logprobs,
                                          finish_reason="length" if out.finish_reason == "length" else "stop",
                                          text=out.text))
        return results

    def update_weights(self, model) -> None:
        """Load the trainer's current weights into vLLM (a PEFT adapter is merged in meanwhile)."""
        peft = hasattr(model, "merge_adapter")
        if peft:
            model.merge_adapter()
        try:
            weights = _hf_named_weights(model)

            def load(vllm_model):
                vllm_model.load_weights(weights.items())

            if hasattr(self.llm, "apply_model"):
                self.llm.apply_model(load)
            else:  # older vLLM: the model lives on the driver worker
                load(self.llm.llm_engine.model_executor.driver_worker.model_runner.model)
        finally:
            if peft:
                model.unmerge_adapter()


def _hf_named_weights(model) -> dict:
    """The model's weights under the base model's HF names (PEFT wrappers and adapters removed)."""
    if not hasattr(model, "merge_adapter"):
        return dict(model.state_dict())
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "original_module" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        out[name.replace(".modules_to_save.default", "")] = tensor.detach()
    return out
