"""`grpokit rm train` (issue 26): a Bradley-Terry reward model from people's rankings (a feedback
store written here) or a TRL preference dataset, on tiny models built here. The pairs a ranking
implies (ties give none, two labellers both count), the held-out split by prompt, TRL's dataset
forms; a tiny classifier learns a known preference (completions that say "good") well above
chance; full fine-tuning and LoRA (on a causal LM's fresh score head) both save a plain classifier
that scores through `reward_funcs=[path]` and as the `human` reward's fallback exactly as the final
evaluation did; bad input is one line."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from grpokit.cli import main
from grpokit.feedback.store import FeedbackStore
from grpokit.rewards import RewardModelReward, RewardRunner, load_reward_funcs
from grpokit.rm import RMConfig, load_preference_pairs, split_pairs, train_reward_model
from grpokit.rm.data import PreferencePair, extract_prompt
from grpokit.rm.trainer import bradley_terry_loss
from tests.helpers import CHAT_TEMPLATE, make_char_tokenizer, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = "the a cat dog sat ran on mat is good bad answer yes no why because hello hi user assistant".split()
PLAIN = [w for w in WORDS if w != "good"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"


# ------------------------------------------------------------------------------ models and data made here


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny Qwen2 sequence classifier (28k parameters, one label) with a byte-level BPE tokenizer
    and a chat template, seeded."""
    from tests.helpers import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("tiny_classifier"), WORDS, TEMPLATE)


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny Qwen2 causal LM (no score head) with the character tokenizer and a chat template."""
    tok = make_char_tokenizer(chat_template=CHAT_TEMPLATE)
    path = tmp_path_factory.mktemp("tiny_causal_lm")
    make_tiny_model(tok, arch="qwen2", max_positions=128).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def sentence(rng: random.Random, good: bool) -> str:
    """4-8 words, one of them "good" or not (the hidden preference; the lengths do not tell)."""
    words = [rng.choice(PLAIN) for _ in range(rng.randint(3, 7))]
    words.insert(rng.randrange(len(words) + 1), "good" if good else rng.choice(PLAIN))
    return " " + " ".join(words)


def preference_jsonl(path, prompts: int = 100, per_prompt: int = 4, seed: int = 0):
    """TRL's preference format, plain text with an explicit prompt: chosen says "good", rejected does not."""
    rng = random.Random(seed)
    rows = []
    for i in range(prompts):
        prompt = f"{rng.choice(['why', 'hello', 'the cat'])} {i}:"
        rows += [{"prompt": prompt, "chosen": sentence(rng, True), "rejected": sentence(rng, False)}
                 for _ in range(per_prompt)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ranked_store(folder, prompts: int = 60, seed: int = 0) -> FeedbackStore:
    """A run's feedback store: one group of 4 (2 say "good") per conversational prompt, ranked by two
    labellers who both prefer "good" and tie the rest: [[good ones], [others]] -> 4 pairs each."""
    rng = random.Random(seed)
    store = FeedbackStore(folder)
    for i in range(prompts):
        prompt = [{"role": "user", "content": f"{rng.choice(['why', 'hello'])} {i}"}]
        goods = [True, True, False, False]
        rng.shuffle(goods)
        candidates = [sentence(rng, g) for g in goods]
        gid = store.add_group(prompt, candidates, step=i // 10)
        ranking = [[k for k in range(4) if goods[k]], [k for k in range(4) if not goods[k]]]
        ranking = [tied for tied in ranking if tied]
        for labeller in ("ann", "bob"):
            store.add_ranking(gid, labeller, ranking)
    return store


def texts(pairs: list[PreferencePair]) -> tuple[list, list]:
    """(prompts, completions) scoring each pair's chosen then rejected, as reward_funcs are called."""
    prompts = [p.prompt for p in pairs for _ in range(2)]
    completions = [c for p in pairs for c in (p.chosen, p.rejected)]
    return prompts, completions


def flat(scores: list[tuple[float, float]]) -> list[float]:
    return [s for pair in scores for s in pair]


# ------------------------------------------------------------------------------ pairs


def test_a_store_gives_every_pair_its_rankings_imply(tmp_path):
    """Ties give no pair; two labellers' rankings of one group both count; a skip gives none; the
    conversational prompt gets chosen/rejected as assistant messages (TRL's form)."""
    store = FeedbackStore(tmp_path)
    prompt = [{"role": "user", "content": "hi"}]
    g1 = store.add_group(prompt, ["a", "b", "c", "d"])
    g2 = store.add_group("plain prompt", ["x", "y", "z"])
    store.add_ranking(g1, "ann", [[0], [1, 2], [3]])   # 0>1, 0>2, 0>3, 1>3, 2>3 (1 and 2 tied: none)
    store.add_ranking(g1, "bob", [3, 2, 1, 0])         # 6 pairs of a strict order of 4
    store.add_ranking(g2, "ann", [[0, 1, 2]])          # all tied: none
    store.add_ranking(g2, "bob", skipped=True)
    store.close()
    data = load_preference_pairs(str(tmp_path))
    assert len(data.pairs) == 5 + 6 and data.kind == "store"
    assert "3 rankings of 2 groups by 2 labellers" in data.summary
    got = [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in data.pairs]
    assert got[:5] == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]
    assert ("d", "a") in got[5:] and ("b", "c") not in got and ("c", "b") not in got[:5]
    assert all(p.prompt == prompt and p.chosen[0]["role"] == "assistant" for p in data.pairs)
    best = load_preference_pairs(str(tmp_path / "feedback.sqlite"), pairs="best")  # the .sqlite path too
    assert len(best.pairs) == 3 + 3                     # the top one over each worse one


def test_the_held_out_split_keeps_a_prompt_on_one_side_and_is_stable(tmp_path):
    pairs = load_preference_pairs(str(preference_jsonl(tmp_path / "p.jsonl"))).pairs
    train, heldout = split_pairs(pairs, 0.2)
    assert len(train) + len(heldout) == 400 and 40 <= len(heldout) <= 120
    assert not {p.prompt for p in train} & {p.prompt for p in heldout}
    assert split_pairs(list(reversed(pairs)), 0.2)[1] == list(reversed(heldout))  # order-free, stable
    assert split_pairs(pairs, 0.0) == (pairs, [])


def test_trl_preference_datasets_explicit_implicit_conversational_parquet(tmp_path):
    from datasets import Dataset

    chat = [{"role": "user", "content": "is it good"}]
    rows = [{"chosen": chat + [{"role": "assistant", "content": "yes good"}],          # implicit prompt
             "rejected": chat + [{"role": "assistant", "content": "no"}], "margin": 1.5},
            {"chosen": chat + [{"role": "assistant", "content": "same"}],
             "rejected": chat + [{"role": "assistant", "content": "same"}], "margin": 0.0}]  # no preference: dropped
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preference_pairs(str(path))
    assert data.pairs == [PreferencePair(chat, [{"role": "assistant", "content": "yes good"}],
                                         [{"role": "assistant", "content": "no"}], 1.5)]
    assert "1 with chosen = rejected left out" in data.summary
    assert extract_prompt("Q: 2+2? A: 4", "Q: 2+2? A: 5") == ("Q: 2+2? A: ", "4", "5")
    assert extract_prompt("abc", "abd") == (None, "abc", "abd")
    folder = tmp_path / "parquet"
    folder.mkdir()
    Dataset.from_list([{"prompt": "p", "chosen": " a", "rejected": " b"}]).to_parquet(str(folder / "train.parquet"))
    for source in (folder, folder / "train.parquet"):
        assert load_preference_pairs(str(source)).pairs == [PreferencePair("p", " a", " b")]


def test_bad_input_is_one_line(tmp_path, capsys, classifier):
    (tmp_path / "no_rejected.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    tied = FeedbackStore(tmp_path / "tied")
    tied.add_ranking(tied.add_group("p", ["a", "b"]), "ann", [[0, 1]])
    tied.close()
    cases = {
        "no_rejected.jsonl": "no 'rejected' column (columns: prompt, chosen)",
        "missing.jsonl": "no feedback store or preference dataset at",
        "missing_run/feedback.sqlite": "no feedback store at",
        "tied": "holds no preference pair: 1 ranking(s) (0 skip(s)); a ranking of tied candidates gives none",
    }
    for name, message in cases.items():
        code = main(["rm", "train", str(tmp_path / name), "--model", classifier, "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("grpokit rm: error: "), err
        assert message in err, (name, err)
    assert main(["rm", "train", str(tmp_path / "tied")]) == 2
    assert "give the model: model_name_or_path=" in capsys.readouterr().err
    assert main(["rm", "train", str(tmp_path / "tied"), "--model", classifier, "lr=1e-3"]) == 2
    assert "unknown rm train option(s) ['lr']" in capsys.readouterr().err
    assert main(["rm", "fit"]) == 2 and "one action: grpokit rm train DATA" in capsys.readouterr().err
    chat = FeedbackStore(tmp_path / "chat")
    chat.add_ranking(chat.add_group([{"role": "user", "content": "hi"}], ["a", "b"]), "ann", [1, 0])
    chat.close()
    with pytest.raises(ValueError, match="conversations but the tokenizer of .* has no chat template; pass chat_temp"):
        train_reward_model(RMConfig(dataset_name=str(tmp_path / "chat"), model_name_or_path=classifier,
                                    chat_template="", eval_fraction=0.0, output_dir=str(tmp_path / "o")))
    assert main(["rm", "train", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("use_peft", "lora_r", "center_rewards_coefficient", "eval_fraction", "max_length"):
        assert option in out


def test_the_loss_is_trl_s_bradley_terry_with_margin_and_centring():
    chosen, rejected = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.5])
    sig = torch.sigmoid
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(
        -torch.log(sig(chosen - rejected)).mean().item(), abs=1e-6)
    margin = torch.tensor([0.5, 0.0, 1.0])
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(
        -torch.log(sig(chosen - rejected - margin)).mean().item(), abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, None, 0.01).item() == pytest.approx(
        -torch.log(sig(chosen - rejected)).mean().item() + 0.01 * ((chosen + rejected) ** 2).mean().item(), abs=1e-6)


def test_scoring_pads_on_the_right_whatever_the_tokenizer_says(classifier, tmp_path):
    """GPT-2 numbers positions from 0 whatever the mask, so a left-padding tokenizer moved a short
    sequence's tokens to other positions: batched scores now equal one at a time."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    left = AutoTokenizer.from_pretrained(classifier, padding_side="left")
    torch.manual_seed(0)
    GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(left), n_embd=32, n_layer=2, n_head=4, n_positions=128, num_labels=1,
        pad_token_id=left.pad_token_id, bos_token_id=left.eos_token_id, eos_token_id=left.eos_token_id,
    )).save_pretrained(tmp_path)
    left.save_pretrained(tmp_path)
    prompts, completions = ["why", "the cat", "hello"], [" because the dog is good", " sat", " hi user"]
    batched = RewardModelReward(str(tmp_path), device="cpu", batch_size=3)(prompts, completions)
    alone = RewardModelReward(str(tmp_path), device="cpu", batch_size=1)(prompts, completions)
    assert batched == pytest.approx(alone, abs=1e-5)


# ------------------------------------------------------------------------------ training


@pytest.mark.train
def test_full_fine_tuning_learns_the_preference_and_scores_as_reward_funcs(tmp_path, classifier, capsys):
    """400 pairs (100 prompts), 2 epochs: held-out accuracy from chance to >= 0.85 in seconds; the
    saved model loads as a plain classifier and scores through reward_funcs=[path] (RewardModelReward,
    also through the runner) exactly as the final evaluation did."""
    from transformers import AutoModelForSequenceClassification

    data = preference_jsonl(tmp_path / "prefs.jsonl")
    out = tmp_path / "rm"
    t0 = time.perf_counter()
    result = train_reward_model(RMConfig(dataset_name=str(data), model_name_or_path=classifier, output_dir=str(out),
                                         learning_rate=1e-3, num_train_epochs=2, device="cpu", disable_tqdm=True))
    seconds = time.perf_counter() - t0
    m = result.metrics
    printed = capsys.readouterr().out
    assert f"held-out pairwise accuracy before training: {m['heldout_accuracy_before']:.3f}" in printed
    assert f"held-out pairwise accuracy after training: {m['heldout_accuracy_after']:.3f}" in printed
    assert abs(m["heldout_accuracy_before"] - 0.5) <= 0.2 and m["heldout_accuracy_after"] >= 0.85, m
    assert m["final_loss"] < 0.5 * m["first_loss"] and seconds < 20, (m, seconds)
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["pairs"] == 400 and m["train_pairs"] + m["heldout_pairs"] == 400 and m["head"] == "its own score head"

    loaded = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert loaded.config.num_labels == 1 and not (out / "adapter_config.json").exists()
    prompts, completions = texts(result.heldout)
    (reward,) = load_reward_funcs([str(out)])                 # TRL's way: a reward model by its path
    assert isinstance(reward, RewardModelReward) and reward.__name__ == "rm"
    assert reward(prompts, completions) == pytest.approx(flat(result.heldout_scores), abs=1e-5)
    group = RewardRunner([reward], group_size=2)(prompts, completions).per_func[:, 0].tolist()
    assert group == pytest.approx(flat(result.heldout_scores), abs=1e-5)


@pytest.mark.train
def test_lora_on_a_causal_lm_from_a_store_by_the_command_line(tmp_path, causal_lm, capsys):
    """The store's rankings (two labellers), a causal LM checkpoint with a fresh score head, LoRA,
    by `grpokit rm train RUN --use_peft`: learns the preference; the merged model is a plain
    classifier scoring conversations through RewardModelReward as the final evaluation did; it is
    the `human` reward's fallback, which scores the groups nobody ranks with it."""
    from grpokit.feedback.reward import HumanFeedbackReward

    run = tmp_path / "run"
    ranked_store(run).close()
    code = main(["rm", "train", str(run), "--model", causal_lm, "--use_peft", "--lora_r", "8",
                 "--learning_rate", "5e-3", "--num_train_epochs", "3", "--device", "cpu", "--seed", "1", "--dtype", "float32"])
    assert code == 0
    printed = capsys.readouterr().out
    out = run / "reward_model"                                 # the default: next to the store
    m = json.loads((out / "metrics.json").read_text())
    assert m["peft"] and m["head"] == "a fresh score head" and m["num_trainable"] < m["num_params"] / 5
    assert m["pairs"] == 60 * 2 * 4 and "120 rankings of 60 groups by 2 labellers" in printed
    assert "LoRA r=8 alpha=32 on q_proj, v_proj + the score head" in printed
    assert m["heldout_accuracy_after"] >= 0.85 and abs(m["heldout_accuracy_before"] - 0.5) <= 0.25, m
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()

    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(str(out)).config.num_labels == 1
    rows = [json.loads(line) for line in (out / "heldout.jsonl").read_text().splitlines()]
    heldout = [PreferencePair(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert heldout == split_pairs(load_preference_pairs(str(run)).pairs, 0.2)[1] and len(heldout) == m["heldout_pairs"]
    reward = RewardModelReward(str(out), device="cpu")
    prompts, completions = texts(heldout)
    scores = reward(prompts, completions)
    assert scores == pytest.approx([s for r in rows for s in (r["score_chosen"], r["score_rejected"])], abs=1e-5)
    accuracy = sum(c > r for c, r in zip(scores[::2], scores[1::2])) / len(heldout)
    assert accuracy == m["heldout_accuracy_after"]            # the printed figure, by the reward

    # the fallback of the human reward: nobody ranks (human_fraction 0), the reward model scores
    human = HumanFeedbackReward(store=tmp_path / "live", fallback=str(out), fallback_kwargs={"device": "cpu"},
                                human_fraction=0.0, deadline_s=5)
    try:
        group = [p.chosen for p in heldout[:2]] + [p.rejected for p in heldout[:2]]
        got = RewardRunner([human], group_size=4)([heldout[0].prompt] * 4, group).per_func[:, 0].tolist()
        assert got == pytest.approx(reward([heldout[0].prompt] * 4, group), abs=1e-5)
    finally:
        human.close()
