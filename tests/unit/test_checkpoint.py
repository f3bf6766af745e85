"""Checkpoints: exact resume, PEFT adapters, atomicity, rotation and clear errors."""

import json
import os
import random

import numpy as np
import pytest
import torch
import transformers

from grpokit.checkpoint import (
    CheckpointError,
    check_resume_compatible,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers import make_tiny_model

CONFIG = {"model_name_or_path": "tiny-llama", "learning_rate": 1e-3, "seed": 0,
          "num_generations": 4, "max_steps": 6, "output_dir": "out"}
TOTAL = 6  # steps of the straight run; the resumed run saves after TOTAL // 2

# tiny models run ~50x slower with 2 OpenMP threads on a busy 2-core machine
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed, **overrides):
    """A 64-id Llama with attention dropout (a resume must restore the torch RNG), training mode;
    `overrides`: config fields (hidden_size=48, ...)."""
    return make_tiny_model(arch="llama", vocab_size=64, num_kv_heads=None, max_positions=None, seed=seed,
                           eval_mode=False, attention_dropout=0.1, **overrides)


def build(seed, **overrides):
    """Model, AdamW, LambdaLR and a data generator, all built from scratch with ``seed``."""
    model = tiny_llama(seed, **overrides)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * TOTAL))
    generator = torch.Generator().manual_seed(seed + 7)
    return model, optimizer, scheduler, generator


def train_step(model, optimizer, scheduler, generator):
    """One step whose result depends on every RNG that a resume has to restore."""
    ids = torch.randint(0, 64, (2, 8), generator=generator)        # data order: the generator
    loss = model(input_ids=ids, labels=ids).loss                     # attention dropout: torch RNG
    noise = torch.randn_like(model.lm_head.weight)                   # torch RNG
    loss = loss + 1e-2 * (model.lm_head.weight * noise).sum()
    loss = loss * (1.0 + random.random()) * (1.0 + float(np.random.rand()))  # python, numpy RNG
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def straight_run():
    seed_all(0)
    model, optimizer, scheduler, generator = build(0)
    for _ in range(TOTAL):
        train_step(model, optimizer, scheduler, generator)
    return params(model), scheduler.get_last_lr()


def first_half(tmp_path):
    seed_all(0)
    model, optimizer, scheduler, generator = build(0)
    for _ in range(TOTAL // 2):
        train_step(model, optimizer, scheduler, generator)
    state = {"epoch": 0, "data_position": 6, "history": [{"step": 1, "reward": 0.5}],
             "sampler_weights": torch.arange(3.0), "generators": {"data": generator}}
    return save_checkpoint(tmp_path, TOTAL // 2, model=model, optimizer=optimizer,
                           scheduler=scheduler, trainer_state=state, config=CONFIG)


@pytest.mark.train
def test_resume_is_bit_for_bit_equal_to_a_straight_run(tmp_path):
    expected, expected_lr = straight_run()
    path = first_half(tmp_path)
    assert path == os.path.join(tmp_path, f"checkpoint-{TOTAL // 2}")
    assert find_latest_checkpoint(tmp_path) == path

    seed_all(999)  # a new process: every RNG elsewhere
    model, optimizer, scheduler, generator = build(123)
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                            generators={"data": generator})
    assert state["step"] == TOTAL // 2 and state["data_position"] == 6
    assert state["history"] == [{"step": 1, "reward": 0.5}]
    assert torch.equal(state["sampler_weights"], torch.arange(3.0))
    assert "generators" not in state
    for _ in range(TOTAL - TOTAL // 2):
        train_step(model, optimizer, scheduler, generator)
    assert_same(params(model), expected)
    assert scheduler.get_last_lr() == expected_lr


@pytest.mark.train
def test_resume_without_rng_restore_differs(tmp_path):
    """The step really depends on the RNGs, so the exact-resume test above can fail."""
    expected, _ = straight_run()
    path = first_half(tmp_path)
    model, optimizer, scheduler, generator = build(123)
    load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                    generators={"data": generator})
    torch.manual_seed(5)  # clobber only the torch RNG (dropout and noise)
    for _ in range(TOTAL - TOTAL // 2):
        train_step(model, optimizer, scheduler, generator)
    got = params(model)
    assert not all(torch.equal(got[k], expected[k]) for k in expected)


def test_checkpoint_layout_and_tied_weights_load_with_from_pretrained(tmp_path):
    model = tiny_llama(0, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=None, scheduler=None,
                           trainer_state={}, config=CONFIG)
    names = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "rng_state.pt", "trainer_state.json",
            "training_config.json", "COMPLETE"} <= names
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))
    reloaded = transformers.LlamaForCausalLM.from_pretrained(path)
    assert_same(params(reloaded), params(model))
    fresh = tiny_llama(1, tie_word_embeddings=True)
    load_checkpoint(path, model=fresh)
    assert_same(params(fresh), params(model))
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_tokenizer_is_saved(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")
    path = save_checkpoint(tmp_path, 1, model=tiny_llama(0), optimizer=None, scheduler=None,
                           trainer_state={}, config={}, tokenizer=tok)
    assert transformers.PreTrainedTokenizerFast.from_pretrained(path).get_vocab() == vocab


def lora_model(seed):
    import peft

    base = tiny_llama(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, config)


@pytest.mark.train
def test_peft_checkpoint_holds_only_the_adapter_and_round_trips(tmp_path):
    import peft
    from safetensors.torch import load_file

    model = lora_model(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # lora_B leaves zero, so a missed load would show
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=None,
                           trainer_state={"step": 1}, config=CONFIG)
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert not os.path.exists(os.path.join(path, "model.safetensors"))

    fresh = lora_model(0)  # same base weights, different adapter init
    torch.manual_seed(3)
    for name, p in fresh.named_parameters():
        if "lora_" in name:
            p.data.normal_()
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    load_checkpoint(path, model=fresh, optimizer=fresh_optimizer)
    assert_same(params(fresh), params(model))
    assert_same(fresh_optimizer.state_dict()["state"][0], optimizer.state_dict()["state"][0])

    via_peft = peft.PeftModel.from_pretrained(tiny_llama(0), path)
    assert_same(params(via_peft), params(model))


def test_peft_checkpoint_into_plain_model_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=lora_model(0), optimizer=None, scheduler=None,
                           trainer_state={}, config={})
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        load_checkpoint(path, model=tiny_llama(0))


def test_crash_mid_save_leaves_no_checkpoint_and_keeps_the_latest(tmp_path, monkeypatch):
    model, optimizer, scheduler, _ = build(0)
    kwargs = dict(model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={},
                  config=CONFIG)
    first = save_checkpoint(tmp_path, 1, **kwargs)
    before = open(os.path.join(first, "COMPLETE")).read()
    real_save = torch.save

    def crash_on_scheduler(obj, f, *args, **kw):
        if str(f).endswith("scheduler.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", crash_on_scheduler)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, **kwargs)
    with pytest.raises(OSError, match="disk full"):  # overwriting an existing step
        save_checkpoint(tmp_path, 1, **kwargs)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert find_latest_checkpoint(tmp_path) == first
    assert open(os.path.join(first, "COMPLETE")).read() == before
    load_checkpoint(first, model=build(1)[0])


def test_leftovers_of_a_killed_save_are_ignored_then_cleaned(tmp_path):
    model = tiny_llama(0)
    first = save_checkpoint(tmp_path, 1, model=model, trainer_state={}, config={})
    os.makedirs(tmp_path / ".tmp-checkpoint-3-abcd")
    (tmp_path / ".tmp-checkpoint-3-abcd" / "model.safetensors").write_bytes(b"half")
    os.makedirs(tmp_path / "checkpoint-4")  # no COMPLETE marker
    assert find_latest_checkpoint(tmp_path) == first
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoint-4", model=model)
    # killed between "move the old checkpoint-1 aside" and "move the new one in"
    os.rename(first, tmp_path / ".old-checkpoint-1-0123abcd")
    assert find_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 2, model=model, trainer_state={}, config={})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    load_checkpoint(first, model=model)


def test_trainer_state_that_cannot_be_restored_fails_at_save_time(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['sampler'\]"):
        save_checkpoint(tmp_path, 1, model=tiny_llama(0), trainer_state={"sampler": object()},
                        config={})
    assert os.listdir(tmp_path) == []


def test_replacing_a_checkpoint_of_the_same_step(tmp_path):
    model = tiny_llama(0)
    save_checkpoint(tmp_path, 1, model=model, trainer_state={"version": 1}, config={})
    path = save_checkpoint(tmp_path, 1, model=model, trainer_state={"version": 2}, config={})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert load_checkpoint(path, model=model)["version"] == 2


def test_save_total_limit_keeps_the_newest(tmp_path):
    model = tiny_llama(0)
    for step in (10, 20, 5, 30):  # step order, not save order, decides what is oldest
        save_checkpoint(tmp_path, step, model=model, trainer_state={}, config={},
                        save_total_limit=2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-20", "checkpoint-30"]
    assert find_latest_checkpoint(tmp_path).endswith("checkpoint-30")
    assert find_latest_checkpoint(tmp_path / "nowhere") is None


def test_missing_path_names_the_available_checkpoints(tmp_path):
    model = tiny_llama(0)
    save_checkpoint(tmp_path, 7, model=model, trainer_state={}, config={})
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*checkpoint-8.*checkpoint-7"):
        load_checkpoint(tmp_path / "checkpoint-8", model=model)
    with pytest.raises(CheckpointError, match=r"output directory.*checkpoint-7"):
        load_checkpoint(tmp_path, model=model)


def test_truncated_file_is_reported(tmp_path):
    model, optimizer, _, _ = build(0)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={},
                           config={})
    with open(os.path.join(path, "optimizer.pt"), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=r"optimizer.pt \(10 bytes"):
        load_checkpoint(path, model=model, optimizer=optimizer)


def test_weights_flipped_in_place_are_refused_naming_the_file(tmp_path):
    """4 KiB of the weights overwritten, same size: the marker's content hash catches it at load
    (sizes alone did not: training went on with broken weights)."""
    model, optimizer, _, _ = build(0)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={}, config={})
    marker = json.load(open(os.path.join(path, "COMPLETE")))
    assert set(marker["files"]["model.safetensors"]) == {"size", "sha256"}
    file = os.path.join(path, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.seek(size // 2)
        block = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    assert os.path.getsize(file) == size
    with pytest.raises(CheckpointError, match=r"model.safetensors \(its content changed since the save"):
        load_checkpoint(path, model=model, optimizer=optimizer)
    # the resume-compatibility check reads sizes only (it runs before the load, which verifies)
    check_resume_compatible(path, {}, [])


def test_a_marker_without_hashes_still_loads(tmp_path):
    """Checkpoints written before content hashes were recorded (sizes only) still resume."""
    model, optimizer, _, _ = build(0)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={}, config={})
    marker_file = os.path.join(path, "COMPLETE")
    marker = json.load(open(marker_file))
    marker["files"] = {k: v["size"] for k, v in marker["files"].items()}
    json.dump(marker, open(marker_file, "w"))
    load_checkpoint(path, model=model, optimizer=optimizer)


def test_mismatched_weights_name_the_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=tiny_llama(0), trainer_state={}, config={})
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*embed_tokens.weight: "
                                              r"checkpoint \(64, 32\) vs model \(64, 48\)"):
        load_checkpoint(path, model=tiny_llama(0, hidden_size=48))
    with pytest.raises(CheckpointError, match=r"missing keys: model.layers.2"):
        load_checkpoint(path, model=tiny_llama(0, num_hidden_layers=3))
    with pytest.raises(CheckpointError, match=r"unexpected keys: model.layers.1"):
        load_checkpoint(path, model=tiny_llama(0, num_hidden_layers=1))


@pytest.mark.train
def test_optimizer_that_does_not_fit_is_a_clear_error(tmp_path):
    model, optimizer, _, _ = build(0)
    train_step(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
               torch.Generator())
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={},
                           config={})
    other = torch.optim.AdamW([model.lm_head.weight], lr=1e-2)
    with pytest.raises(CheckpointError, match="optimizer state"):
        load_checkpoint(path, model=model, optimizer=other)
    with pytest.raises(CheckpointError, match=r"generator\(s\) \['data'\]"):
        load_checkpoint(path, model=model, generators={"data": torch.Generator()})


def test_incompatible_config_names_each_field_and_both_values(tmp_path):
    path = save_checkpoint(tmp_path, 1, model=tiny_llama(0), trainer_state={}, config=CONFIG)
    changed = dict(CONFIG, learning_rate=2e-3, num_generations=8,
                   max_steps=100, output_dir="elsewhere", logging_steps=5)
    with pytest.raises(CheckpointError) as err:
        check_resume_compatible(path, changed)
    message = str(err.value)
    assert "learning_rate: 0.001 -> 0.002" in message
    assert "num_generations: 4 -> 8" in message
    assert "max_steps:" not in message and "elsewhere" not in message
    # fields that may change, and fields the old config did not record, are fine
    check_resume_compatible(path, dict(CONFIG, max_steps=100, save_steps=3, beta=0.04))
    with pytest.raises(CheckpointError, match=r"seed: 0 -> 1"):
        check_resume_compatible(path, dict(CONFIG, seed=1), keys=("seed",))


def test_nested_config_is_compared_by_field_name(tmp_path):
    nested = {"model": {"model_name_or_path": "a"}, "train": {"learning_rate": 1e-3}}
    path = save_checkpoint(tmp_path, 1, model=tiny_llama(0), trainer_state={}, config=nested)
    with open(os.path.join(path, "training_config.json")) as f:
        assert json.load(f) == nested
    with pytest.raises(CheckpointError, match=r"train.learning_rate: 0.001 -> 0.01"):
        check_resume_compatible(path, {"model": {"model_name_or_path": "a"},
                                       "train": {"learning_rate": 1e-2}})

