"""grpokit.sft: the loss goes down, the prompt is masked, configs from YAML values, the starter model."""

import json
from pathlib import Path

import datasets
import pytest
import torch

from grpokit.data import get_task
from grpokit.models import load_model, load_tokenizer, starter_model_path
from grpokit.sft import SFTConfig, run_sft
from grpokit.sft.data import collate, evaluate_on_task, tokenize_pairs
from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _cfg(tmp_path, **kw):
    base = dict(model_config=TINY, tokenizer="char", task="arithmetic",
                task_kwargs={"num_train": 64, "num_eval": 8, "max_operand": 20},
                output_dir=str(tmp_path / "out"), learning_rate=1e-2, max_steps=30,
                per_device_train_batch_size=16, seed=0, logging_steps=10, eval_pass_k=2, device="cpu")
    base.update(kw)
    return SFTConfig(**base)


@pytest.mark.train
def test_a_few_steps_lower_the_loss_and_save(tmp_path: Path):
    metrics = run_sft(_cfg(tmp_path))
    assert metrics["final_loss"] < 0.6 * metrics["first_loss"]
    assert metrics["first_loss"] > 3.0  # ~ln(101) for a fresh model
    assert {"eval_greedy_accuracy", "eval_pass@2", "eval_sample_accuracy"} <= set(metrics)
    out = tmp_path / "out"
    model, tok = load_model(str(out)), load_tokenizer(str(out))
    assert tok.padding_side == "left" and model.config.vocab_size == len(tok)
    assert json.loads((out / "sft_metrics.json").read_text())["train_steps"] == 30
    assert json.loads((out / "sft_config.json").read_text())["learning_rate"] == 1e-2


@pytest.mark.train
def test_same_seed_same_loss(tmp_path: Path):
    a = run_sft(_cfg(tmp_path, max_steps=5, save=False, eval_num_prompts=0))
    b = run_sft(_cfg(tmp_path, max_steps=5, save=False, eval_num_prompts=0))
    assert a["final_loss"] == b["final_loss"]


def test_completion_only_loss_masks_the_prompt():
    tok = make_char_tokenizer()
    examples = tokenize_pairs(["12+3=", "1+1="], ["15", "2"], tok, max_length=None)
    assert examples[0] == (tok("12+3=15")["input_ids"] + [tok.eos_token_id], 5)
    ids, mask, labels = collate(examples, tok.pad_token_id, completion_only_loss=True)
    # row 0: "12+3=" masked, "15<eos>" learned; row 1: "1+1=" masked, "2<eos>" learned, then padding
    assert labels[0].tolist() == [-100] * 5 + tok("15")["input_ids"] + [tok.eos_token_id]
    assert labels[1].tolist() == [-100] * 4 + tok("2")["input_ids"] + [tok.eos_token_id] + [-100] * 2
    assert mask[1].tolist() == [1] * 6 + [0] * 2
    _, _, all_labels = collate(examples, tok.pad_token_id, completion_only_loss=False)
    assert all_labels[0].tolist() == ids[0].tolist()


def test_completion_only_loss_ignores_prompt_tokens_in_the_gradient(tmp_path: Path):
    """Changing only the prompt's targets cannot change a completion-only loss; it changes the full loss."""
    tok = make_char_tokenizer()
    model = make_tiny_model(tok, arch="llama")
    ex = tokenize_pairs(["12+3="], ["15"], tok, max_length=None)
    ids, mask, labels = collate(ex, tok.pad_token_id, completion_only_loss=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100)
    manual = -torch.log_softmax(logits[0], -1)[torch.arange(4, 7), ids[0, 5:8]].mean()
    torch.testing.assert_close(loss, manual)


@pytest.mark.train
def test_conversational_prompt_completion_dataset(tmp_path: Path):
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1="}],
             "completion": [{"role": "assistant", "content": str(i + 1)}]} for i in range(16)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_dir = tmp_path / "tok"
    make_char_tokenizer(chat_template=CHAT_TEMPLATE).save_pretrained(str(tok_dir))
    metrics = run_sft(_cfg(tmp_path, task=None, dataset_name=str(path), tokenizer=str(tok_dir), max_steps=3,
                           save=False))
    assert metrics["train_examples"] == 16 and "eval_greedy_accuracy" not in metrics
    tok = load_tokenizer(str(tok_dir))
    (ids, prompt_len), = tokenize_pairs([rows[3]["prompt"]], [rows[3]["completion"]], tok, max_length=None)
    assert tok.decode(ids[:prompt_len]) == "<user>3+1=\n<assistant>"
    assert tok.decode(ids[prompt_len:]) == "4\n<eos>"  # the template put <assistant> in the prompt


def test_config_accepts_yaml_strings_and_rejects_nonsense(tmp_path: Path):
    cfg = _cfg(tmp_path, learning_rate="1e-3", max_steps="20", completion_only_loss="false", max_length="null")
    assert cfg.learning_rate == 1e-3 and cfg.max_steps == 20 and cfg.completion_only_loss is False
    assert cfg.max_length is None
    assert isinstance(_cfg(tmp_path, learning_rate=1).learning_rate, float)
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        _cfg(tmp_path, model_name_or_path="x")
    with pytest.raises(ValueError, match="exactly one of task"):
        _cfg(tmp_path, dataset_name="x.jsonl")
    with pytest.raises(ValueError, match="not a built-in task"):
        _cfg(tmp_path, task="chess")
    with pytest.raises(ValueError, match="learning_rate"):
        _cfg(tmp_path, learning_rate=0)
    with pytest.raises(ValueError, match="learning_rate='fast' is not a valid float"):
        _cfg(tmp_path, learning_rate="fast")
    with pytest.raises(ValueError, match="unknown SFT config key"):
        SFTConfig.from_dict({"model_name_or_path": "x", "task": "arithmetic", "lr": 1})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        _cfg(tmp_path, tokenizer=None)


def test_config_parses_a_json_model_config(tmp_path: Path):
    # a dict field given as a string (CLI key=value, YAML) is read as JSON; it raised NameError (no `import json`)
    assert _cfg(tmp_path, model_config=json.dumps(TINY)).model_config == TINY
    cfg = SFTConfig(model_config='{"model_type": "llama", "x": 1}', tokenizer="char", task="arithmetic")
    assert cfg.model_config == {"model_type": "llama", "x": 1}
    with pytest.raises(ValueError, match="model_config='{nope' is not a valid"):
        _cfg(tmp_path, model_config="{nope")


@pytest.mark.train
def test_next_stage_continues_the_same_model(tmp_path: Path):
    cfg = _cfg(tmp_path, max_steps=20, eval_num_prompts=0,
               next_stage={"task_kwargs": {"num_train": 64, "num_eval": 8, "max_operand": 20,
                                           "reference_slip_rate": 1.0},
                           "max_steps": 5, "learning_rate": "1e-3"})
    stage2 = cfg.stage_config(cfg.next_stage)
    assert stage2.max_steps == 5 and stage2.learning_rate == 1e-3 and stage2.next_stage is None
    assert stage2.model_config == cfg.model_config and stage2.seed == cfg.seed
    metrics = run_sft(cfg)
    assert metrics["stage1/train_steps"] == 20 and metrics["train_steps"] == 5
    # stage 2 starts where stage 1 ended: its first loss is far below a fresh model's ~4.6
    assert metrics["first_loss"] < metrics["stage1/first_loss"] - 1.0
    saved = json.loads((tmp_path / "out" / "sft_config.json").read_text())  # the whole recipe, both stages
    assert saved["max_steps"] == 20 and saved["next_stage"]["task_kwargs"]["reference_slip_rate"] == 1.0
    assert json.loads((tmp_path / "out" / "sft_metrics.json").read_text())["stage1/train_steps"] == 20
    with pytest.raises(ValueError, match="unknown key"):
        _cfg(tmp_path, next_stage={"lr": 1})
    with pytest.raises(ValueError, match="cannot set"):
        _cfg(tmp_path, next_stage={"model_config": TINY})


@pytest.mark.train
def test_missing_completion_column(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    datasets.Dataset.from_dict({"prompt": ["a"]}).to_json(str(path))
    with pytest.raises(ValueError, match=r"lacks \['completion'\]"):
        run_sft(_cfg(tmp_path, task=None, dataset_name=str(path)))


def test_shipped_starter_model_answers_a_number():
    path = starter_model_path()
    assert Path(path, "model.safetensors").stat().st_size < 8 * 2**20
    model, tok = load_model(path), load_tokenizer(path)
    assert model.dtype == torch.float32 and tok.padding_side == "left"
    task = get_task("arithmetic", seed=0, num_eval=50)
    metrics = evaluate_on_task(model, tok, task.eval_dataset, task.is_correct, num_samples=8, max_new_tokens=8)
    # the warm start knows arithmetic (it samples right answers) but often prefers a carry slip
    # (see configs/starter_sft.yaml for the full-split numbers)
    assert 0.05 <= metrics["greedy_accuracy"] <= 0.7
    assert metrics["pass@8"] >= 0.6
    ids = tok(["12+34=", "71-25="], return_tensors="pt", padding=True)
    out = model.generate(**ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    for text in tok.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True):
        assert text.isdigit(), text  # a number, then EOS
