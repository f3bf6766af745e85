"""grpokit.models: loading by path, tokenizers without pad, LoRA and its reference, saving."""

import json
from pathlib import Path

import pytest
import torch

from grpokit.models import (
    apply_lora,
    default_dtype,
    load_model,
    load_reference_model,
    load_tokenizer,
    reference_logits_context,
    resolve_dtype,
    save_model,
)
from tests.helpers import make_char_tokenizer, make_tiny_model

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"], "lora_dropout": 0.0}


def _logits(model, tokenizer, text="12+34=") -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb_adapter(model, seed=0):
    """LoRA's B starts at zero (adapter == identity); give it weights so it changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_dtype_defaults():
    assert default_dtype("cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_load_model_by_local_path(tmp_path: Path, arch):
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch=arch)
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok))
    tok2 = load_tokenizer(str(tmp_path / "m"))
    assert tok2.padding_side == "left" and tok2("1+2=")["input_ids"] == tok("1+2=")["input_ids"]
    # spaces and newlines survive a save/load, also for qwen2, whose AutoTokenizer mapping would swap in
    # a byte-level Qwen2Tokenizer pipeline; the saved class name is one transformers v4 and v5 both know
    assert tok2.decode(tok2("1 + 2 =\n")["input_ids"]) == "1 + 2 =\n"
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast")


def test_load_model_passes_objects_and_casts_on_request(tiny_model):
    assert load_model(tiny_model) is tiny_model
    assert load_model(tiny_model, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/no/such/model")


def test_tokenizer_without_pad_token_gets_eos():
    tok = make_char_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None
    tok = load_tokenizer(tok, padding_side="right")
    assert tok.pad_token == tok.eos_token == "<eos>" and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "right"
    batch = tok(["1", "123"], padding=True)
    assert batch["input_ids"][0] == [tok.convert_tokens_to_ids("1"), tok.eos_token_id, tok.eos_token_id]
    assert batch["attention_mask"][0] == [1, 0, 0]


def test_tokenizer_without_pad_or_eos_adds_pad():
    tok = make_char_tokenizer()
    tok.pad_token = None
    tok.eos_token = None
    n = len(tok)
    with pytest.warns(UserWarning, match="resize"):
        tok = load_tokenizer(tok)
    assert tok.pad_token is not None and len(tok) >= n


def test_char_tokenizer_round_trip_and_special_ids(tiny_tokenizer):
    text = "Using the numbers [3, 5], make 8!\n<answer>3 + 5</answer>"
    ids = tiny_tokenizer(text)["input_ids"]
    assert len(ids) == len(text) and tiny_tokenizer.decode(ids) == text
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (0, 1, 2)
    assert tiny_tokenizer.decode([*ids[:2], 2, 0], skip_special_tokens=True) == text[:2]


def test_lora_freezes_base_and_trains_adapter(tiny_model):
    model = apply_lora(tiny_model, LORA)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="already has"):
        apply_lora(model, LORA)


def test_reference_context_gives_base_logits(tiny_tokenizer):
    base = make_tiny_model(tiny_tokenizer, arch="llama")
    base_logits = _logits(base, tiny_tokenizer)
    model = apply_lora(base, LORA)
    _perturb_adapter(model)
    policy_logits = _logits(model, tiny_tokenizer)
    assert (policy_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    with reference_logits_context(model) as ref:
        ids = torch.tensor([tiny_tokenizer("12+34=")["input_ids"]])
        ref_logits = ref(input_ids=ids).logits
        assert not ref_logits.requires_grad  # no graph is built for the reference
    torch.testing.assert_close(ref_logits, base_logits)
    torch.testing.assert_close(_logits(model, tiny_tokenizer), policy_logits)  # adapter back on afterwards


def test_reference_context_refuses_plain_models(tiny_model):
    with pytest.raises(ValueError, match="load_reference_model"):
        with reference_logits_context(tiny_model):
            pass


def test_load_reference_model_is_a_frozen_copy(tiny_model, tiny_tokenizer, tmp_path: Path):
    ref = load_reference_model(tiny_model)
    assert ref is not tiny_model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    with torch.no_grad():
        next(tiny_model.parameters()).add_(1.0)  # training the policy does not move the reference
    assert not torch.equal(_logits(ref, tiny_tokenizer), _logits(tiny_model, tiny_tokenizer))
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    from_disk = load_reference_model(str(tmp_path / "m"))
    torch.testing.assert_close(_logits(from_disk, tiny_tokenizer), _logits(tiny_model, tiny_tokenizer))
    with pytest.raises(ValueError, match="reference_logits_context"):
        load_reference_model(apply_lora(tiny_model, LORA))


def test_merged_lora_matches_adapter_and_round_trips(tiny_tokenizer, tmp_path: Path):
    save_model(make_tiny_model(tiny_tokenizer, arch="qwen2"), tiny_tokenizer, tmp_path / "base")
    model = apply_lora(load_model(str(tmp_path / "base")), LORA)  # the adapter records its base's path
    _perturb_adapter(model, seed=1)
    expected = _logits(model, tiny_tokenizer)
    merged_dir = save_model(model, tiny_tokenizer, tmp_path / "run", merge_lora=True)
    assert merged_dir == tmp_path / "run" / "merged"
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    merged = load_model(str(merged_dir))
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, tiny_tokenizer), expected, atol=1e-5, rtol=1e-5)
    # the adapter directory loads back as base + adapter, trainable
    reloaded = load_model(str(tmp_path / "run"))
    torch.testing.assert_close(_logits(reloaded, tiny_tokenizer), expected, atol=1e-5, rtol=1e-5)
    assert any(p.requires_grad for n, p in reloaded.named_parameters() if "lora_" in n)
    # the model being trained keeps its adapter after a merged save
    assert any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, tiny_tokenizer), expected)


def test_adapter_without_base_path_gets_a_clear_error(tiny_model, tiny_tokenizer, tmp_path: Path):
    save_model(apply_lora(tiny_model, LORA), tiny_tokenizer, tmp_path / "adapter")  # base made in memory
    with pytest.raises(ValueError, match="does not name its base model"):
        load_model(str(tmp_path / "adapter"))
