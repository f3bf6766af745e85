"""Engines declare what they can do (rollout.base.EngineCapabilities), once; the code that picks a
path reads the record (envs.run_turns, core.forward.sampler_logps_are_old_logps), never the
engine's class name, `hasattr` or its signature."""

import dataclasses
import sys
from types import SimpleNamespace

import pytest
import torch

from grpokit.envs import run_turns
from grpokit.rollout import Completion, Engine, SamplingParams, make_engine
from grpokit.rollout.base import EngineCapabilities, MultiTurnEngine, capabilities_of
from tests.helpers import make_char_tokenizer, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return make_char_tokenizer()


def test_each_engine_declares_what_it_can_do(tok):
    model = make_tiny_model(tok)
    hf = make_engine("hf", model, tok)
    assert hf.capabilities == EngineCapabilities(images=True, kv_across_turns=True, exact_fp32_logprobs=True,
                                                 sampler_differs_from_trainer=False, uses_model_generate=False)
    assert isinstance(hf, MultiTurnEngine) and hf.model is model
    generate = make_engine("hf-generate", model, tok)
    assert generate.capabilities == EngineCapabilities(images=True, kv_across_turns=False, exact_fp32_logprobs=False,
                                                       sampler_differs_from_trainer=False, uses_model_generate=True)
    assert isinstance(generate, Engine) and not isinstance(generate, MultiTurnEngine)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hf.capabilities.images = False  # type: ignore[misc]


def test_vllm_engine_declares_its_own_copy_of_the_weights(tok, monkeypatch):
    class LLM:  # the part of vllm.LLM the engine touches when given a ready one
        def generate(self, prompts, sp, use_tqdm=False):
            raise AssertionError("not reached: images are refused first")

    monkeypatch.setitem(sys.modules, "vllm", SimpleNamespace(SamplingParams=dict, LLM=None))
    engine = make_engine("vllm", make_tiny_model(tok), tok, llm=LLM())
    caps = engine.capabilities
    assert caps.sampler_differs_from_trainer and not caps.images and not caps.kv_across_turns
    assert not caps.exact_fp32_logprobs and engine.model is None and isinstance(engine, Engine)
    assert tok.eos_token_id in engine.eos_ids
    with pytest.raises(ValueError, match="text prompts only"):
        engine.generate([[5, 6]], n=2, images=[object()])


def test_exact_fp32_logprobs_follow_the_models_dtype_and_dropout(tok):
    """Decided at construction and re-read at update_weights, never per generate call."""
    model = make_tiny_model(tok)
    engine = make_engine("hf", model, tok)
    assert engine.capabilities.exact_fp32_logprobs
    model.to(torch.bfloat16)
    assert engine.capabilities.exact_fp32_logprobs  # not re-probed until the weights are synced
    engine.update_weights(model)
    assert not engine.capabilities.exact_fp32_logprobs
    model.to(torch.float32)
    engine.update_weights(model)
    assert engine.capabilities.exact_fp32_logprobs
    dropout = make_tiny_model(tok, attention_dropout=0.1)  # the training forward would drop, the engine does not
    assert not make_engine("hf", dropout, tok).capabilities.exact_fp32_logprobs
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_tiny_model(tok), LoraConfig(r=4, lora_dropout=0.05, target_modules=["q_proj"]))
    assert not make_engine("hf", lora, tok).capabilities.exact_fp32_logprobs
    lora = get_peft_model(make_tiny_model(tok), LoraConfig(r=4, lora_dropout=0.0, target_modules=["q_proj"]))
    assert make_engine("hf", lora, tok).capabilities.exact_fp32_logprobs


def test_an_engine_that_declares_nothing_is_a_text_generate_of_its_own_policy():
    caps = capabilities_of(SimpleNamespace(generate=lambda prompt_ids, n=1, params=None: []))
    assert caps == EngineCapabilities()
    assert not (caps.images or caps.kv_across_turns or caps.exact_fp32_logprobs or caps.uses_model_generate)
    assert caps.sampler_differs_from_trainer


class _OneTurn:
    """A driver whose samples all stop after their first turn."""

    processor = None

    def __init__(self):
        self.ended = []

    def turn_ended(self, sample, token_ids, logprobs, finish_reason):
        self.ended.append(sample)

    def continuations(self):
        return {}


class _Recording:
    """An engine with both methods; which one runs is decided by its declared capabilities only."""

    def __init__(self, caps):
        self.capabilities, self.calls = caps, []

    def generate(self, prompt_ids, n=1, params=None, images=None, image_features=None):
        self.calls.append("generate")
        return [Completion(prompt_index=i, token_ids=[7]) for i in range(len(prompt_ids)) for _ in range(n)]

    def generate_multiturn(self, prompt_ids, n, params, driver):
        self.calls.append("generate_multiturn")


def test_run_turns_keeps_kv_across_turns_only_where_the_engine_declares_it():
    params = SamplingParams(max_tokens=4, seed=0)
    kv = _Recording(EngineCapabilities(kv_across_turns=True))
    run_turns(kv, [[5, 6]], 2, params, _OneTurn())
    assert kv.calls == ["generate_multiturn"]
    plain = _Recording(EngineCapabilities(kv_across_turns=False))  # has the method, does not declare it
    driver = _OneTurn()
    run_turns(plain, [[5, 6]], 2, params, driver)
    assert plain.calls == ["generate"] and driver.ended == [0, 1]


class _ToolImage(_OneTurn):
    """A vision-language model's conversation whose tool answered with an image: one more turn."""

    processor = object()

    def __init__(self):
        super().__init__()
        self.asked = 0

    def continuations(self):
        self.asked += 1
        return {0: [9, 9]} if self.asked == 1 else {}

    def remaining(self, sample):
        return 3

    def context_ids(self, sample):
        return [5, 6, 7, 9, 9]

    def context_images(self, sample):
        return "the conversation's images"


def test_an_image_in_a_tool_result_needs_an_engine_that_takes_images():
    params = SamplingParams(max_tokens=8, seed=0)
    with pytest.raises(ValueError, match="cannot give the model"):
        run_turns(_Recording(EngineCapabilities(images=False)), [[5, 6]], 1, params, _ToolImage())
    seen = []

    class TakesImages(_Recording):
        def generate(self, prompt_ids, n=1, params=None, images=None, image_features=None):
            seen.append(images)
            return super().generate(prompt_ids, n, params)

    engine = TakesImages(EngineCapabilities(images=True, kv_across_turns=True))
    run_turns(engine, [[5, 6]], 1, params, _ToolImage())  # re-encoded each turn: the KV path is text-only
    assert engine.calls == ["generate", "generate"] and seen == [None, ["the conversation's images"]]


@pytest.mark.parametrize("name, engine_class", [("hf", "HFEngine"), ("hf-generate", "GenerateEngine")])
def test_the_run_builds_the_engine_named_by_rollout_engine(tok, tmp_path, name, engine_class):
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), rollout_engine=name, max_steps=1, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=4, use_cpu=True, report_to="none")
    trainer = GRPOTrainer(model=make_tiny_model(tok), reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["ab", "cd"]}), processing_class=tok)
    assert type(trainer.parts.engine).__name__ == engine_class
