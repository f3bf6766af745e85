"""Model-based rewards on a tiny sequence classifier built here from a config (never downloaded)."""

import math

import pytest
import torch

from grpokit.rewards import PreferenceReward, RewardModelReward, RewardRunner, load_reward_funcs

WORDS = "the a cat dog sat ran on mat is good bad answer yes no why because hello hi user assistant".split()
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    from tests.helpers import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny_rm"), WORDS, TEMPLATE)


def manual_score(path, text):
    """One unpadded forward pass: the reference the batched scorer must match."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_reward_model_scores_batched_like_one_at_a_time(rm_path):
    rm = RewardModelReward(rm_path, device="cpu", batch_size=2)
    prompts = ["the cat", "the cat", "why", "hello"]
    completions = [" sat on the mat", " ran", " because the dog is bad bad bad bad", " hi"]
    scores = rm(prompts, completions)
    # different lengths in batches of 2, sorted by length and padded: order and values kept
    expected = [manual_score(rm_path, p + c) for p, c in zip(prompts, completions)]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4  # a real model: the scores differ


def test_conversational_rows_use_the_chat_template(rm_path):
    rm = RewardModelReward(rm_path, device="cpu")
    prompt = [{"role": "user", "content": "is the dog good"}]
    completion = [{"role": "assistant", "content": "yes the dog is good"}]
    (score,) = rm([prompt], [completion])
    text = "user : is the dog good assistant : yes the dog is good "  # TEMPLATE rendered by hand
    assert score == pytest.approx(manual_score(rm_path, text), abs=1e-5)
    (mixed,) = rm([prompt], ["yes the dog is good"])  # a string completion becomes the assistant turn
    assert mixed == pytest.approx(score, abs=1e-6)


def test_missing_chat_template_is_a_clear_error(rm_path):
    rm = RewardModelReward(rm_path, device="cpu")
    rm.scorer.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template; pass reward_kwargs chat_template"):
        rm([[{"role": "user", "content": "hi"}]], ["hello"])


def test_preference_against_a_reference_is_bradley_terry(rm_path):
    rm = RewardModelReward(rm_path, device="cpu")
    pref = PreferenceReward(rm_path, reference_column="chosen", device="cpu", temperature=2.0)
    prompts, comps, refs = ["why", "why", "hello"], [" because", " no", " hi"], [" yes", " yes", None]
    r = rm(prompts, comps)
    r_ref = rm(prompts[:2], refs[:2])
    out = pref(prompts, comps, chosen=refs)
    # P = sigmoid((r - r_ref) / T); a row without a reference is not applicable
    assert out[:2] == pytest.approx([1 / (1 + math.exp(-(a - b) / 2.0)) for a, b in zip(r[:2], r_ref)], abs=1e-6)
    assert out[2] is None


def test_preference_against_the_group(rm_path):
    pref = PreferenceReward(rm_path, device="cpu")
    prompts = ["the cat"] * 4 + ["why"] * 3 + ["hello"]
    comps = [" sat", " ran", " is good", " is bad", " because", " no", " yes", " hi"]
    out = pref(prompts, comps)
    assert all(0.0 < p < 1.0 for p in out)
    # sigmoid(x) + sigmoid(-x) = 1, so every group's win probabilities sum to G / 2
    assert sum(out[:4]) == pytest.approx(2.0) and sum(out[4:7]) == pytest.approx(1.5)
    assert out[7] == 0.5  # alone: nobody to compare with
    rm = RewardModelReward(rm_path, device="cpu")
    r = rm(prompts[:4], comps[:4])
    assert sorted(range(4), key=out.__getitem__) == sorted(range(4), key=r.__getitem__)  # same order as r


def test_preference_swiss_tournament_fits_bradley_terry(rm_path):
    """strategy='swiss': G=4 meets in 2 rounds (8 comparisons instead of 12); the rewards are the
    Bradley-Terry strengths of the outcomes, in the reward model's order. Through the runner the
    preference reward gets whole groups (it compares within them)."""
    from grpokit.rewards.judges.ranking import bradley_terry

    pref = PreferenceReward(rm_path, device="cpu", strategy="swiss")
    comps = [" sat", " ran", " is good", " is bad"]
    calls = []
    real = pref._win_probs
    pref._win_probs = lambda prompt, pairs: calls.append(len(pairs)) or real(prompt, pairs)
    out = pref(["the cat"] * 4, comps)
    assert calls == [4, 4] and sum(out) == pytest.approx(0.0, abs=1e-9)
    r = RewardModelReward(rm_path, device="cpu")(["the cat"] * 4, comps)
    assert sorted(range(4), key=out.__getitem__) == sorted(range(4), key=r.__getitem__)
    # the reward model's win probabilities are > 0.5 exactly when r is higher: the fit of those outcomes
    outcomes = [(a, b, 1.0 if r[a] > r[b] else 0.0) for a in range(4) for b in range(4) if a != b]
    full = bradley_terry(4, outcomes)
    assert sorted(range(4), key=full.__getitem__) == sorted(range(4), key=out.__getitem__)
    runner = RewardRunner([pref], group_size=4)
    assert runner._plans[0].groups
    assert runner(["the cat"] * 4 + ["why"] * 4, comps * 2).per_func[:4, 0].tolist() == pytest.approx(out)
    with pytest.raises(ValueError, match="strategy='knockout'"):
        PreferenceReward(rm_path, strategy="knockout")


def test_pairwise_mode_is_order_symmetric(rm_path):
    pref = PreferenceReward(rm_path, mode="pairwise", pairwise_template="{prompt} : {a} : {b}", device="cpu")
    out = pref(["why", "why"], [" because the dog", " no"])
    assert out[0] + out[1] == pytest.approx(1.0)  # P(a > b) + P(b > a) = 1
    with pytest.raises(ValueError, match="needs pairwise_template"):
        PreferenceReward(rm_path, mode="pairwise")


def test_reward_model_by_registry_name_in_the_runner(rm_path):
    funcs = load_reward_funcs(["reward_model"], reward_kwargs={"reward_model": {"model_name_or_path": rm_path,
                                                                               "device": "cpu"}})
    runner = RewardRunner(funcs, num_workers=2)  # use_process_pool=False: stays in this process
    assert runner._plans[0].in_pool is False
    out = runner(["why", "hello"], [" because", " hi"])
    assert out.names == ["reward_model"] and torch.isfinite(out.per_func).all()
    runner.close()


@pytest.mark.train
def test_reward_models_as_trl_takes_them(rm_path, tmp_path):
    """reward_funcs may name a reward model by path (or hub id), or hold a loaded sequence
    classifier, with or without reward_processing_classes; the reward is named after the model
    (TRL's name) and every step scores with it."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from grpokit.rewards.registry import is_reward_model_spec

    assert is_reward_model_spec(rm_path) and is_reward_model_spec("org/some-reward-model")
    assert not is_reward_model_spec("accuracy") and not is_reward_model_spec("my_rewards:exact")
    loaded = AutoModelForSequenceClassification.from_pretrained(rm_path)
    assert is_reward_model_spec(loaded)
    name = rm_path.rstrip("/").split("/")[-1]
    cases = {"path": dict(reward=[rm_path]),
             "loaded": dict(reward=[loaded], reward_processing_classes=[AutoTokenizer.from_pretrained(rm_path)]),
             "path+tokenizer": dict(reward=[rm_path, lambda prompts, completions, **kw: [0.0] * len(completions)],
                                    reward_processing_classes=[AutoTokenizer.from_pretrained(rm_path), None])}
    for label, kw in cases.items():
        out = tmp_path / label.replace("+", "_")
        from grpokit import GRPOConfig, GRPOTrainer
        from tests.helpers import make_char_tokenizer, make_tiny_model
        from datasets import Dataset

        tok = make_char_tokenizer()
        trainer = GRPOTrainer(model=make_tiny_model(tok, arch="qwen2", max_positions=64), reward_funcs=kw["reward"],
                              reward_processing_classes=kw.get("reward_processing_classes"), processing_class=tok,
                              train_dataset=Dataset.from_dict({"prompt": [f"q{i}:" for i in range(8)]}),
                              args=GRPOConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=8,
                                              num_generations=4, max_completion_length=4, use_cpu=True,
                                              disable_tqdm=True, plot=False, save_strategy="no"))
        trainer.train()
        row = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line][0]
        assert f"rewards/{name}/mean" in row and math.isfinite(row[f"rewards/{name}/mean"]), (label, row.keys())
    with pytest.raises(ValueError, match="one per reward function"):
        GRPOTrainer(reward_funcs=[rm_path], reward_processing_classes=[None, None])
