"""Text rewards by reference (chrf, bleu, rouge) and by consensus: each metric reward equals the
library's own score computed here (sacrebleu, rouge-score), consensus worked by hand and against
sacrebleu's chrF, the reference mix, groups of one, whole groups through the runner, the registry
names, the language guard (a fake detector) and the errors for bad options and missing packages."""

import math
import pickle
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from grpokit.rewards import (BleuReward, ChrfReward, ConsensusReward, RewardRunner, RougeReward, load_reward_funcs,
                             reward_name, scores_groups)
from grpokit.rewards import similarity as similarity_module

HYPS = ["The cat sat on the mat.", "A dog runs in the park", "completely unrelated words here",
        "the cat is on the mat", "", "Der Hund läuft im Park."]
REFS = ["The cat sat on the mat.",                                 # identical
        ["The dog is running in the park.", "A dog runs through the park."],  # two references
        "Nothing in common.",
        None,                                                      # no reference: None
        "An empty hypothesis.",
        ("Ein Hund rennt im Park.", None)]                         # a tuple; a None entry is dropped
EXPECTED_REFS = [[REFS[0]], REFS[1], [REFS[2]], None, [REFS[4]], ["Ein Hund rennt im Park."]]


def exact_match(hypothesis: str, reference: str) -> float:
    """A trivial similarity for worked examples (also reached as a 'module:function' path)."""
    return 1.0 if hypothesis == reference else 0.0


def german(text: str) -> str:
    """A detector that finds German everywhere (reached as a 'module:function' path)."""
    return "de"


def prefix_of(hypothesis: str, reference: str) -> float:
    """Not symmetric: 1 when the hypothesis starts the reference."""
    return 1.0 if reference.startswith(hypothesis) else 0.0


# ---- reference metrics against the libraries ----

@pytest.mark.parametrize("options", [{}, {"word_order": 2}, {"char_order": 4, "beta": 1}, {"beta": 3}])
def test_chrf_equals_sacrebleus_sentence_chrf_over_100(options):
    reward = ChrfReward(**options)
    got = reward(completions=HYPS, reference=REFS)
    for hyp, refs, value in zip(HYPS, EXPECTED_REFS, got):
        if refs is None:
            assert value is None
        else:
            assert value == pytest.approx(sacrebleu.sentence_chrf(hyp, refs, **options).score / 100, abs=1e-12)
    assert got[0] == pytest.approx(1.0) and 0.0 < got[1] < 1.0


@pytest.mark.parametrize("tokenize", ["13a", "intl", "char"])
def test_bleu_equals_sacrebleus_sentence_bleu_over_100(tokenize):
    got = BleuReward(tokenize=tokenize)(completions=HYPS, reference=REFS)
    for hyp, refs, value in zip(HYPS, EXPECTED_REFS, got):
        if refs is None:
            assert value is None
        else:  # sentence_bleu: effective order, exp smoothing; several references are multi-reference BLEU
            expected = sacrebleu.sentence_bleu(hyp, refs, tokenize=tokenize).score / 100
            assert value == pytest.approx(expected, abs=1e-12)
    assert got[0] == pytest.approx(1.0) and 0.0 < got[1] < 1.0


@pytest.mark.parametrize("rouge_type,measure,use_stemmer", [("rouge1", "f", False), ("rouge2", "p", False),
                                                             ("rougeL", "r", True), ("rougeLsum", "f", True)])
def test_rouge_equals_rouge_scores_scorer(rouge_type, measure, use_stemmer):
    got = RougeReward(rouge_type=rouge_type, measure=measure, use_stemmer=use_stemmer)(completions=HYPS,
                                                                                      reference=REFS)
    scorer = rouge_scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)
    attribute = {"f": "fmeasure", "p": "precision", "r": "recall"}[measure]
    for hyp, refs, value in zip(HYPS, EXPECTED_REFS, got):
        if refs is None:
            assert value is None
            continue
        # one reference: scorer.score(target, prediction); several: the best F-measure (score_multi)
        score = scorer.score(refs[0], hyp) if len(refs) == 1 else scorer.score_multi(refs, hyp)
        assert value == pytest.approx(getattr(score[rouge_type], attribute), abs=1e-12)
    assert got[0] == pytest.approx(1.0)


def test_conversational_completions_and_a_named_reference_column():
    reward = ChrfReward(reference_column="target")
    completion = [{"role": "assistant", "content": "The cat sat on the mat."}]
    assert reward(completions=[completion, "The cat"], target=["The cat sat on the mat."] * 2) == pytest.approx(
        [1.0, sacrebleu.sentence_chrf("The cat", ["The cat sat on the mat."]).score / 100])


# ---- consensus ----

def test_consensus_worked_by_hand_with_exact_match_and_each_distinct_pair_scored_once():
    calls = []

    def counted(hypothesis, reference):
        calls.append((hypothesis, reference))
        return exact_match(hypothesis, reference)

    reward = ConsensusReward(similarity=counted)
    assert scores_groups(reward)
    # group a, a, b, c (G = 4, each u over the 3 others):
    #   u(a_1) = (sim(a, a_2)=1 + sim(a, b)=0 + sim(a, c)=0) / 3 = 1/3, and u(a_2) likewise
    #   u(b)   = (0 + 0 + 0) / 3 = 0;   u(c) = 0
    assert reward(completions=["a", "a", "b", "c"]) == pytest.approx([1 / 3, 1 / 3, 0.0, 0.0])
    # 12 ordered pairs, 7 distinct: (a,a) (a,b) (a,c) (b,a) (b,c) (c,a) (c,b), each scored once
    assert len(calls) == len(set(calls)) == 7


def test_consensus_scores_both_orders_of_a_pair():
    # prefix_of is not symmetric; group a, ab, b:
    #   u(a)  = (prefix_of(a, ab)=1 + prefix_of(a, b)=0) / 2 = 0.5
    #   u(ab) = (prefix_of(ab, a)=0 + prefix_of(ab, b)=0) / 2 = 0
    #   u(b)  = (prefix_of(b, a)=0 + prefix_of(b, ab)=0) / 2 = 0
    assert ConsensusReward(similarity=prefix_of)(completions=["a", "ab", "b"]) == [0.5, 0.0, 0.0]


def test_consensus_with_chrf_equals_the_mean_of_sacrebleus_chrf_against_the_others():
    group = ["The cat sat on the mat.", "A cat was sitting on the mat.", "The dog sat on a log."]
    got = ConsensusReward()(completions=group)
    for i, value in enumerate(got):
        others = [sacrebleu.sentence_chrf(group[i], [group[j]]).score / 100 for j in range(3) if j != i]
        assert value == pytest.approx(sum(others) / 2, abs=1e-12)
    # chrF is not symmetric, so u(y_i) is not the mean of sim(y_j, y_i)
    assert sacrebleu.sentence_chrf(group[0], [group[1]]).score != sacrebleu.sentence_chrf(group[1], [group[0]]).score
    # other built-in similarities, with their options
    bleu = ConsensusReward(similarity="bleu", similarity_kwargs={"tokenize": "char"})(completions=group)
    assert bleu[0] == pytest.approx((sacrebleu.sentence_bleu(group[0], [group[1]], tokenize="char").score
                                     + sacrebleu.sentence_bleu(group[0], [group[2]], tokenize="char").score) / 200)


def test_consensus_mixed_with_a_reference_score():
    reward = ConsensusReward(similarity=exact_match, reference_column="reference", reference_weight=0.25)
    # group x, x, y with reference y on rows 0 and 1, None on row 2:
    #   consensus: u(x) = (1 + 0) / 2 = 0.5 (twice), u(y) = 0
    #   row 0: 0.75 * 0.5 + 0.25 * sim(x, y)=0 = 0.375;  row 1 likewise
    #   row 2: no reference -> the consensus alone = 0
    got = reward(completions=["x", "x", "y"], reference=["y", "y", None])
    assert got == pytest.approx([0.375, 0.375, 0.0])
    # several references: the best one counts; row 2 now has reference y, so 0.75 * 0 + 0.25 * 1
    got = reward(completions=["x", "x", "y"], reference=[["z", "x"], "y", "y"])
    assert got == pytest.approx([0.75 * 0.5 + 0.25 * 1.0, 0.375, 0.25])
    # w = 1: the reference score alone; no reference -> None
    only_ref = ConsensusReward(similarity=exact_match, reference_column="reference", reference_weight=1.0)
    assert only_ref(completions=["x", "x", "y"], reference=["x", "y", None]) == [1.0, 0.0, None]


def test_a_group_of_one_has_no_consensus():
    assert ConsensusReward()(completions=["alone"]) == [None]
    mixed = ConsensusReward(reference_column="reference", reference_weight=0.5)
    got = mixed(completions=["The cat sat."], reference=["The cat sat on the mat."])
    assert got == pytest.approx([sacrebleu.sentence_chrf("The cat sat.", ["The cat sat on the mat."]).score / 100])
    assert mixed(completions=["alone"], reference=[None]) == [None]


def test_through_the_runner_each_group_is_scored_separately():
    # group 1: x, x, y -> 0.5, 0.5, 0;  group 2: x, y, y -> 0, 0.5, 0.5
    # (scored as one group of 6 the x's would get 2/5 and 1/5: the groups must not mix)
    funcs = load_reward_funcs(["consensus"],
                              reward_kwargs={"consensus": {"similarity": "tests.unit.test_text_rewards:exact_match"}})
    runner = RewardRunner(funcs, group_size=3)
    out = runner(["p"] * 3 + ["q"] * 3, ["x", "x", "y", "x", "y", "y"])
    assert out.names == ["consensus"]
    assert out.per_func[:, 0].tolist() == [0.5, 0.5, 0.0, 0.0, 0.5, 0.5]


# ---- registry, columns, options ----

def test_registry_names_resolve_with_their_options():
    funcs = load_reward_funcs(["chrf", "bleu", "rouge"],
                              reward_kwargs={"chrf": {"word_order": 2, "reference_column": "ref"},
                                             "bleu": {"tokenize": "char", "reference_column": "ref"},
                                             "rouge": {"rouge_type": "rouge1", "reference_column": "ref"}})
    assert [reward_name(f) for f in funcs] == ["chrf", "bleu", "rouge"]
    hyp, ref = "The cat is on the mat", "The cat sat on the mat."
    chrf, bleu, rouge = (f(completions=[hyp], ref=[ref])[0] for f in funcs)
    assert chrf == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref], word_order=2).score / 100)
    assert bleu == pytest.approx(sacrebleu.sentence_bleu(hyp, [ref], tokenize="char").score / 100)
    assert rouge == pytest.approx(rouge_scorer.RougeScorer(["rouge1"]).score(ref, hyp)["rouge1"].fmeasure)
    consensus = load_reward_funcs(["consensus"])[0]
    assert reward_name(consensus) == "consensus" and scores_groups(consensus)


def test_a_missing_column_is_reported_before_step_one():
    runner = RewardRunner(load_reward_funcs(["chrf"]))
    with pytest.raises(ValueError, match="'chrf'.*column 'reference'"):
        runner.check_signature({"prompt", "target"})
    runner.check_signature({"prompt", "reference"})
    consensus = RewardRunner([ConsensusReward(reference_column="gold", reference_weight=0.5)], group_size=2)
    with pytest.raises(ValueError, match="column 'gold'"):
        consensus.check_signature({"prompt"})
    RewardRunner([ConsensusReward()], group_size=2).check_signature({"prompt"})  # reference-free: no column
    guarded = RewardRunner([ChrfReward(language_column="lang", detector=lambda t: "de")])
    with pytest.raises(ValueError, match="column 'lang'"):
        guarded.check_signature({"prompt", "reference"})


@pytest.mark.parametrize("factory,kwargs,match", [
    (ChrfReward, {"char_order": 0}, "char_order"),
    (ChrfReward, {"word_order": -1}, "word_order"),
    (ChrfReward, {"beta": 0}, "beta"),
    (ChrfReward, {"reference_column": ""}, "reference_column"),
    (BleuReward, {"tokenize": "bogus"}, "tokenize"),
    (BleuReward, {"smooth_method": "bogus"}, "smooth_method"),
    (RougeReward, {"rouge_type": "rougeX"}, "rouge_type"),
    (RougeReward, {"measure": "x"}, "measure"),
    (ConsensusReward, {"similarity": "nope"}, "similarity"),
    (ConsensusReward, {"similarity": 3}, "not callable"),
    (ConsensusReward, {"similarity": "no.such.module:fn"}, "cannot import"),
    (ConsensusReward, {"similarity": exact_match, "similarity_kwargs": {"beta": 1}}, "similarity_kwargs"),
    (ConsensusReward, {"similarity_kwargs": {"bogus": 1}}, "unknown option"),
    (ConsensusReward, {"reference_weight": 1.5, "reference_column": "r"}, "reference_weight"),
    (ConsensusReward, {"reference_weight": 0.5}, "needs reference_column"),
    (ConsensusReward, {"reference_column": "r"}, "no effect"),
    (ChrfReward, {"target_language": "German!", "detector": str}, "target_language"),
    (ChrfReward, {"target_language": "de", "detector": "de"}, "detector"),
    (ChrfReward, {"guard_penalty": math.nan, "target_language": "de", "detector": str}, "guard_penalty"),
])
def test_bad_options_raise_value_error(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_bad_options_through_the_registry_and_bad_reference_values():
    with pytest.raises(ValueError, match="'chrf'.*bad keyword arguments"):
        load_reward_funcs(["chrf"], reward_kwargs={"chrf": {"no_such_option": 1}})
    with pytest.raises(ValueError, match="reference column 'reference'"):
        ChrfReward()(completions=["a"], reference=[["ok", 3]])
    with pytest.raises(ValueError, match="returned None"):
        ConsensusReward(similarity=lambda h, r: None)(completions=["a", "b"])


# ---- the language guard ----

class FakeDetector:
    """text -> ISO 639-1 code by a table; counts its calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, text):
        self.calls.append(text)
        return self.table.get(text)


def test_the_guard_replaces_off_language_scores_with_the_penalty():
    detector = FakeDetector({"Der Hund läuft.": "de", "The dog runs.": "en", "Die Katze.": "DE-at"})
    reward = ChrfReward(target_language="de", guard_penalty=-1.0, detector=detector)
    completions = ["Der Hund läuft.", "The dog runs.", "Die Katze.", "???", "The dog runs.", "The dog runs."]
    refs = ["Der Hund rennt."] * 5 + [None]
    got = reward(completions=completions, reference=refs)
    plain = ChrfReward()(completions=completions, reference=refs)
    # de kept; en -> -1; 'DE-at' is German; undetected (None) is not penalised; a None reward stays None
    assert got == [plain[0], -1.0, plain[2], plain[3], -1.0, None]
    assert detector.calls == ["Der Hund läuft.", "The dog runs.", "Die Katze.", "???"]  # each text once


def test_the_guard_by_a_language_column_and_on_consensus():
    detector = FakeDetector({"bonjour": "fr", "hallo": "de"})
    reward = RougeReward(language_column="lang", detector=detector)
    got = reward(completions=["bonjour", "bonjour", "hallo"], reference=["bonjour"] * 3, lang=["fr", "de", None])
    assert got == [1.0, 0.0, 0.0]  # row 1 wants German: guarded; row 2 has no target: its score (0) stands
    consensus = ConsensusReward(similarity=exact_match, target_language="fr", guard_penalty=-0.5, detector=detector)
    # u(bonjour) = (1 + 0) / 2 = 0.5 twice; hallo is German -> -0.5 (it still counts in the others' mean)
    assert consensus(completions=["bonjour", "bonjour", "hallo"]) == [0.5, 0.5, -0.5]


def test_the_guard_without_an_installed_detector_names_what_to_install(monkeypatch):
    monkeypatch.setattr(similarity_module, "_installed", lambda module: False)
    for factory in (ChrfReward, BleuReward, RougeReward, ConsensusReward):
        with pytest.raises(ValueError, match="pip install lingua-language-detector"):
            factory(target_language="de")
    with pytest.raises(ValueError, match="pip install lingua-language-detector"):
        ChrfReward(language_column="lang")
    ChrfReward()  # no guard asked for: no detector needed
    ChrfReward(target_language="de", detector=lambda text: "de")  # an injected detector needs nothing installed
    by_path = load_reward_funcs(["chrf"], reward_kwargs={"chrf": {
        "target_language": "en", "guard_penalty": -1.0, "detector": "tests.unit.test_text_rewards:german"}})[0]
    assert by_path(completions=["Hallo"], reference=["Hallo"]) == [-1.0]  # a config names it by path


def test_a_missing_metric_package_names_the_extra(monkeypatch):
    for module in ("sacrebleu", "sacrebleu.metrics"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'grpokit\[text\]'"):
        ChrfReward()
    with pytest.raises(ImportError, match=r"pip install 'grpokit\[text\]'"):
        ConsensusReward(similarity="bleu")
    ConsensusReward(similarity=exact_match)  # a user similarity needs no package
    for module in ("rouge_score", "rouge_score.rouge_scorer"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"pip install 'grpokit\[text\]'"):
        RougeReward()


def test_rewards_pickle_for_worker_processes():
    reward = ChrfReward(word_order=2, target_language="de", detector=FakeDetector({"Hallo Welt": "de"}))
    copy = pickle.loads(pickle.dumps(reward))
    assert copy(completions=["Hallo Welt"], reference=["Hallo, Welt!"]) == reward(completions=["Hallo Welt"],
                                                                                   reference=["Hallo, Welt!"])
