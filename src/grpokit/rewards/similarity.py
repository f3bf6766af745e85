"""Text rewards by reference and by consensus: chrF and BLEU (sacrebleu), ROUGE (Google's
rouge-score), and `consensus`, each completion's mean similarity to the other completions of its
group (C-GRPO's reference-free reward, the MBR utility), optionally mixed with a reference score.

Every score is on a 0..1 scale: sacrebleu's chrF and BLEU are 0..100 and are divided by 100;
rouge-score's are 0..1 already. The metrics are the libraries' own (`pip install 'grpokit[text]'`);
nothing here reimplements them.

A language-ID guard (`target_language`, or a per-row `language_column`) gives `guard_penalty`
instead of the score to a completion written in another language, using a maintained detector
where one is installed (lingua-language-detector, else langid) or a `detector=` callable
(text -> ISO 639-1 code; a 'module:function' path from a config file).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

from grpokit.rewards.registry import import_path
from grpokit.rewards.text import completion_text, is_conversational

__all__ = ["ChrfReward", "BleuReward", "RougeReward", "ConsensusReward", "TextMetric", "default_detector"]

_ROUGE_TYPE = re.compile(r"rouge[1-9]|rougeL|rougeLsum")
_MEASURES = {"f": "fmeasure", "p": "precision", "r": "recall"}
_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]+)*")
_DETECTORS = (("lingua", "lingua-language-detector"), ("langid", "langid"))


def _import(module: str, who: str) -> Any:
    from grpokit.tracking import import_optional  # the command line prints its error as one line

    return import_optional(module, f"{who} needs {module.split('.')[0]}", "text")


# ---- the metrics: (hypothesis, references) -> 0..1 ----

class TextMetric:
    """A sentence-level metric from its library: `metric(hypothesis, references) -> float in 0..1`.

    kind "chrf": sacrebleu's CHRF(char_order, word_order, beta, lowercase); chrF++ with
    word_order=2. With several references, sacrebleu keeps the best-scoring one.
    kind "bleu": sacrebleu's sentence BLEU (effective_order=True, as `sacrebleu.sentence_bleu`) with
    `tokenize` (13a, intl, zh, char, none, ...), `smooth_method`, `lowercase`; several references
    are multi-reference BLEU.
    kind "rouge": rouge-score's RougeScorer([rouge_type], use_stemmer); `measure` f / p / r. With
    several references, the one with the best F-measure is used (rouge-score's `score_multi`).
    rouge-score's tokenizer keeps only ASCII letters and digits: use chrF for other scripts.
    """

    def __init__(self, kind: str, **options: Any):
        who = options.pop("who", kind)
        self.kind = kind
        if kind == "chrf":
            char_order = options.pop("char_order", 6)
            word_order = options.pop("word_order", 0)
            beta = options.pop("beta", 2)
            lowercase = bool(options.pop("lowercase", False))
            self._no_options_left(who, options)
            for name, value, low in (("char_order", char_order, 1), ("word_order", word_order, 0), ("beta", beta, 1)):
                if isinstance(value, bool) or not isinstance(value, int) or value < low:
                    raise ValueError(f"{who}: {name} must be an integer >= {low}, got {value!r}.")
            metrics = _import("sacrebleu.metrics", who)
            self._metric = metrics.CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
        elif kind == "bleu":
            tokenize = options.pop("tokenize", "13a")
            smooth_method = options.pop("smooth_method", "exp")
            smooth_value = options.pop("smooth_value", None)
            lowercase = bool(options.pop("lowercase", False))
            self._no_options_left(who, options)
            metrics = _import("sacrebleu.metrics", who)
            tokenizers = sorted(metrics.BLEU.TOKENIZERS)
            if tokenize not in tokenizers:
                raise ValueError(f"{who}: tokenize={tokenize!r}; use one of {tokenizers}.")
            if smooth_method not in metrics.BLEU.SMOOTH_DEFAULTS:
                raise ValueError(f"{who}: smooth_method={smooth_method!r}; use one of "
                                 f"{sorted(metrics.BLEU.SMOOTH_DEFAULTS)}.")
            self._metric = metrics.BLEU(tokenize=tokenize, smooth_method=smooth_method, smooth_value=smooth_value,
                                        lowercase=lowercase, effective_order=True)
        elif kind == "rouge":
            rouge_type = options.pop("rouge_type", "rougeL")
            measure = options.pop("measure", "f")
            use_stemmer = bool(options.pop("use_stemmer", False))
            self._no_options_left(who, options)
            if not isinstance(rouge_type, str) or not _ROUGE_TYPE.fullmatch(rouge_type):
                raise ValueError(f"{who}: rouge_type={rouge_type!r}; use rouge1 .. rouge9, rougeL or rougeLsum.")
            if measure not in _MEASURES:
                raise ValueError(f"{who}: measure={measure!r}; use f (F-measure), p (precision) or r (recall).")
            scorer = _import("rouge_score.rouge_scorer", who)
            self._metric = scorer.RougeScorer([rouge_type], use_stemmer=use_stemmer)
            self.rouge_type, self.attribute = rouge_type, _MEASURES[measure]
        else:
            raise ValueError(f"{who}: unknown metric {kind!r}; use chrf, bleu or rouge.")

    @staticmethod
    def _no_options_left(who: str, options: dict) -> None:
        if options:
            raise ValueError(f"{who}: unknown option(s) {sorted(options)}.")

    def __call__(self, hypothesis: str, references: Sequence[str]) -> float:
        if self.kind == "rouge":
            # rouge-score's argument order is (targets, prediction)
            score = self._metric.score_multi(list(references), hypothesis)[self.rouge_type]
            return float(getattr(score, self.attribute))
        score = float(self._metric.sentence_score(hypothesis, list(references)).score) / 100.0
        return min(1.0, max(0.0, score))  # 100.0 / 100 can come out as 1.0000000000000004


# ---- the language guard ----

def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _normalise_language(code: Any) -> str | None:
    """'de', 'DE', 'de-AT', 'de_at' -> 'de'; None or '' -> None."""
    if code is None:
        return None
    code = str(code).strip()
    if not code:
        return None
    return re.split(r"[-_]", code, maxsplit=1)[0].lower()


class _LinguaDetector:
    """lingua-language-detector, all languages, built on first use (it loads its models lazily)."""

    def __init__(self) -> None:
        self._detector: Any = None

    def __call__(self, text: str) -> str | None:
        if self._detector is None:
            lingua = importlib.import_module("lingua")
            self._detector = lingua.LanguageDetectorBuilder.from_all_languages().build()
        language = self._detector.detect_language_of(text)
        if language is None:
            return None
        code = language.iso_code_639_1
        return str(getattr(code, "name", code)).rsplit(".", 1)[-1].lower()

    def __getstate__(self) -> dict:  # a worker process builds its own
        return {"_detector": None}


def _langid_detector(text: str) -> str | None:
    langid = importlib.import_module("langid")
    return str(langid.classify(text)[0])


def default_detector(who: str = "the language guard") -> Callable[[str], str | None]:
    """The installed detector (lingua-language-detector, else langid) as `text -> ISO 639-1 code`;
    ValueError naming what to install when neither is."""
    if _installed("lingua"):
        return _LinguaDetector()
    if _installed("langid"):
        return _langid_detector
    raise ValueError(f"{who}: the language guard needs a language detector: pip install "
                     f"lingua-language-detector (or langid), or pass detector=<text -> ISO 639-1 code>.")


# ---- the references ----

def _references(value: Any, column: str) -> list[str] | None:
    """A reference column value -> its reference strings; None (no usable reference) -> None."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) or is_conversational(value):
        return [completion_text(value)]
    if isinstance(value, (list, tuple)):
        refs = []
        for r in value:
            if r is None:
                continue
            if not isinstance(r, str):
                raise ValueError(f"reference column {column!r}: a list of references must hold strings, "
                                 f"got {type(r).__name__} ({r!r:.80}).")
            refs.append(r)
        return refs or None
    raise ValueError(f"reference column {column!r}: expected a string or a list of strings, got "
                     f"{type(value).__name__} ({value!r:.80}).")


class _TextReward:
    """What the reference rewards and `consensus` share: the reference column, the language guard."""

    name = "text"
    use_process_pool = True
    target_language: str | None
    language_column: str | None
    guard_penalty: float
    guarded: bool
    detector: Callable[[str], Any] | None

    def _init_guard(self, target_language: str | None, language_column: str | None, guard_penalty: float,
                    detector: Callable[[str], Any] | str | None) -> None:
        if target_language is not None and (not isinstance(target_language, str)
                                            or not _LANGUAGE_CODE.fullmatch(target_language)):
            raise ValueError(f"{self.name}: target_language={target_language!r}; give an ISO 639-1 code such as 'de'.")
        if language_column is not None and not isinstance(language_column, str):
            raise ValueError(f"{self.name}: language_column must be a column name, got {language_column!r}.")
        if isinstance(detector, str) and ":" in detector:  # from a config file: 'module:function'
            detector = import_path(detector, kind="detector")
        if detector is not None and not callable(detector):
            raise ValueError(f"{self.name}: detector must be a callable text -> ISO 639-1 code (or a "
                             f"'module:function' path to one), got {detector!r}.")
        if isinstance(guard_penalty, bool) or not isinstance(guard_penalty, numbers.Real) \
                or not math.isfinite(guard_penalty):
            raise ValueError(f"{self.name}: guard_penalty must be a finite number, got {guard_penalty!r}.")
        self.target_language = _normalise_language(target_language)
        self.language_column = language_column
        self.guard_penalty = float(guard_penalty)
        self.guarded = target_language is not None or language_column is not None
        self.detector = (detector or default_detector(self.name)) if self.guarded else None

    def _check_column(self, column: str | None, what: str, columns: set[str]) -> None:
        if column is not None and column not in columns:
            raise ValueError(f"{self.name} needs the {what} in column {column!r}, which the dataset does not have "
                             f"(columns: {sorted(columns) or 'none besides prompt'}).")

    def _column(self, columns: dict, column: str, n: int) -> list:
        if column not in columns:
            raise ValueError(f"{self.name} needs the column {column!r} (columns: {sorted(columns)}).")
        values = list(columns[column])
        if len(values) != n:
            raise ValueError(f"{self.name}: column {column!r} has {len(values)} values for {n} completions.")
        return values

    def _off_language(self, texts: list[str], columns: dict) -> list[bool]:
        """Per completion: whether the guard finds it in another language than the row's target.
        A row without a target (its language column None, and no target_language) is not guarded;
        a text the detector cannot place (None) is not penalised."""
        if not self.guarded:
            return [False] * len(texts)
        targets: list[str | None] = [self.target_language] * len(texts)
        if self.language_column is not None:
            targets = [_normalise_language(v) or self.target_language
                       for v in self._column(columns, self.language_column, len(texts))]
        detected: dict[str, str | None] = {}
        out = []
        assert self.detector is not None  # set whenever guarded
        for text, target in zip(texts, targets):
            if target is None:
                out.append(False)
                continue
            if text not in detected:
                detected[text] = _normalise_language(self.detector(text))
            out.append(detected[text] is not None and detected[text] != target)
        return out

    def _guard(self, scores: list[float | None], texts: list[str], columns: dict) -> list[float | None]:
        """A score (not a None: 'not applicable' stays so) becomes guard_penalty where off-language."""
        off = self._off_language(texts, columns)
        return [self.guard_penalty if (bad and s is not None) else s for s, bad in zip(scores, off)]


class _ReferenceReward(_TextReward):
    """A completion scored against the references in `reference_column` by one metric, 0..1."""

    kind = ""
    reference_column: str

    def __init__(self, reference_column: str = "reference", target_language: str | None = None,
                 language_column: str | None = None, guard_penalty: float = 0.0,
                 detector: Callable[[str], Any] | str | None = None, **metric_options: Any):
        self.__name__ = self.name
        if not isinstance(reference_column, str) or not reference_column:
            raise ValueError(f"{self.name}: reference_column must be a column name, got {reference_column!r}.")
        self.reference_column = reference_column
        self.metric = TextMetric(self.kind, who=self.name, **metric_options)
        self._init_guard(target_language, language_column, guard_penalty, detector)

    def check_columns(self, columns: set[str]) -> None:
        self._check_column(self.reference_column, "references", columns)
        self._check_column(self.language_column, "target language", columns)

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        refs = self._column(columns, self.reference_column, len(texts))
        scores: list[float | None] = []
        for text, value in zip(texts, refs):
            references = _references(value, self.reference_column)
            scores.append(None if references is None else self.metric(text, references))
        return self._guard(scores, texts, columns)


class ChrfReward(_ReferenceReward):
    """chrF (sacrebleu's `sentence_chrf`) of the completion against the row's reference(s), / 100.

    reference_column: a string, or a list of reference strings (the best one counts); None -> None.
    char_order (6), word_order (0; 2 = chrF++), beta (2: recall weighted twice), lowercase.
    target_language / language_column / guard_penalty / detector: the language guard (module doc).
    """

    name, kind = "chrf", "chrf"

    def __init__(self, reference_column: str = "reference", char_order: int = 6, word_order: int = 0, beta: int = 2,
                 lowercase: bool = False, target_language: str | None = None, language_column: str | None = None,
                 guard_penalty: float = 0.0, detector: Callable[[str], Any] | str | None = None):
        super().__init__(reference_column, target_language, language_column, guard_penalty, detector,
                         char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)


class BleuReward(_ReferenceReward):
    """Sentence BLEU (sacrebleu's `sentence_bleu`: effective order, exp smoothing) against the
    row's reference(s) (multi-reference BLEU), / 100.

    tokenize ("13a"; "intl", "zh", "char", "none", ...), smooth_method ("exp"), smooth_value, lowercase.
    """

    name, kind = "bleu", "bleu"

    def __init__(self, reference_column: str = "reference", tokenize: str = "13a", smooth_method: str = "exp",
                 smooth_value: float | None = None, lowercase: bool = False, target_language: str | None = None,
                 language_column: str | None = None, guard_penalty: float = 0.0,
                 detector: Callable[[str], Any] | str | None = None):
        super().__init__(reference_column, target_language, language_column, guard_penalty, detector,
                         tokenize=tokenize, smooth_method=smooth_method, smooth_value=smooth_value,
                         lowercase=lowercase)


class RougeReward(_ReferenceReward):
    """ROUGE (rouge-score) of the completion against the row's reference(s), 0..1.

    rouge_type: rouge1 / rouge2 (.. rouge9) / rougeL / rougeLsum (sentences split by newlines);
    measure: f (F-measure), p (precision) or r (recall); use_stemmer (Porter). With several
    references the one with the best F-measure counts (`score_multi`).
    """

    name, kind = "rouge", "rouge"

    def __init__(self, reference_column: str = "reference", rouge_type: str = "rougeL", measure: str = "f",
                 use_stemmer: bool = False, target_language: str | None = None, language_column: str | None = None,
                 guard_penalty: float = 0.0, detector: Callable[[str], Any] | str | None = None):
        super().__init__(reference_column, target_language, language_column, guard_penalty, detector,
                         rouge_type=rouge_type, measure=measure, use_stemmer=use_stemmer)


# ---- consensus ----

class _CallableSimilarity:
    """A user similarity `(hypothesis, reference) -> float`; several references: the best one."""

    def __init__(self, fn: Callable[[str, str], float], who: str):
        self.fn, self.who = fn, who

    def __call__(self, hypothesis: str, references: Sequence[str]) -> float:
        values: list[float] = []
        for ref in references:
            v = self.fn(hypothesis, ref)
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"{self.who}: the similarity {self.fn!r} returned {v!r}; it must return a number.")
            values.append(float(v))
        return max(values)


class ConsensusReward(_TextReward):
    """C-GRPO's consensus (the MBR utility): each completion's mean similarity to the others of its group,

        u(y_i) = 1/(G-1) * sum_{j != i} sim(y_i, y_j)          (reference-free)

    optionally mixed with a reference score: reward = (1 - w) * u(y_i) + w * sim(y_i, reference).

    similarity: "chrf" (default), "bleu", "rouge" (0..1, options in `similarity_kwargs`), a callable
    `(hypothesis, reference) -> float` or a "module:function" path to one. sim(y_i, y_j) scores y_i
    as the hypothesis against y_j as the reference; it need not be symmetric (chrF is not), so both
    orders are computed. Each distinct (hypothesis, reference) pair is scored once per group, so
    identical completions cost nothing more: at most G*(G-1) similarity calls per group.
    reference_column / reference_weight w in [0, 1]: mix in sim(y_i, the row's reference(s));
    w > 0 needs the column and the column needs w > 0.
    A group of one has no consensus (None): the reward is then the reference part alone, or None.
    Likewise a row whose reference is None gets the consensus alone; both missing -> None. With
    w = 1 the consensus is not computed (the reward is the reference score, None without one).
    The language guard (target_language / language_column) replaces the reward of an off-language
    completion by guard_penalty; that completion still counts in the others' consensus.
    """

    scores_groups = True
    name = "consensus"
    reference_column: str | None
    reference_weight: float
    similarity: Callable[[str, Sequence[str]], float]

    def __init__(self, similarity: str | Callable[[str, str], float] = "chrf", similarity_kwargs: dict | None = None,
                 reference_column: str | None = None, reference_weight: float = 0.0,
                 target_language: str | None = None, language_column: str | None = None,
                 guard_penalty: float = 0.0, detector: Callable[[str], Any] | str | None = None):
        self.__name__ = self.name
        if isinstance(reference_weight, bool) or not isinstance(reference_weight, numbers.Real) \
                or not 0.0 <= reference_weight <= 1.0:
            raise ValueError(f"consensus: reference_weight must be a number in [0, 1], got {reference_weight!r}.")
        if reference_weight > 0 and reference_column is None:
            raise ValueError(f"consensus: reference_weight={reference_weight} needs reference_column (the column "
                             "holding the references).")
        if reference_column is not None and reference_weight == 0:
            raise ValueError(f"consensus: reference_column={reference_column!r} has no effect with reference_weight=0; "
                             "set reference_weight in (0, 1].")
        if reference_column is not None and (not isinstance(reference_column, str) or not reference_column):
            raise ValueError(f"consensus: reference_column must be a column name, got {reference_column!r}.")
        self.reference_column, self.reference_weight = reference_column, float(reference_weight)
        self.similarity = self._similarity(similarity, dict(similarity_kwargs or {}))
        self._init_guard(target_language, language_column, guard_penalty, detector)

    @staticmethod
    def _similarity(spec: Any, kwargs: dict) -> Callable[[str, Sequence[str]], float]:
        if isinstance(spec, str) and spec in ("chrf", "bleu", "rouge"):
            return TextMetric(spec, who=f"consensus (similarity={spec!r})", **kwargs)
        if kwargs:
            raise ValueError(f"consensus: similarity_kwargs are for the built-in similarities (chrf, bleu, rouge), "
                             f"not for {spec!r}.")
        if isinstance(spec, str):
            if ":" not in spec:
                raise ValueError(f"consensus: similarity={spec!r}; use chrf, bleu, rouge, a callable "
                                 "(hypothesis, reference) -> float or a 'module:function' path.")
            spec = import_path(spec, kind="similarity")
        if not callable(spec):
            raise ValueError(f"consensus: similarity={spec!r} is not callable; use chrf, bleu, rouge, a callable "
                             "(hypothesis, reference) -> float or a 'module:function' path.")
        return _CallableSimilarity(spec, "consensus")

    def check_columns(self, columns: set[str]) -> None:
        self._check_column(self.reference_column, "references", columns)
        self._check_column(self.language_column, "target language", columns)

    def __call__(self, prompts=None, completions: Sequence = (), completion_ids=None, **columns) -> list[float | None]:
        texts = [completion_text(c) for c in completions]
        g = len(texts)
        cache: dict[tuple[str, tuple[str, ...]], float] = {}

        def sim(hypothesis: str, references: tuple[str, ...]) -> float:
            key = (hypothesis, references)
            if key not in cache:
                cache[key] = self.similarity(hypothesis, references)
            return cache[key]

        consensus: list[float | None] = [None] * g
        if self.reference_weight < 1.0 and g > 1:
            consensus = [math.fsum(sim(texts[i], (texts[j],)) for j in range(g) if j != i) / (g - 1)
                         for i in range(g)]
        reference: list[float | None] = [None] * g
        if self.reference_column is not None:
            for i, value in enumerate(self._column(columns, self.reference_column, g)):
                refs = _references(value, self.reference_column)
                if refs is not None:
                    reference[i] = sim(texts[i], tuple(refs))
        w = self.reference_weight
        scores: list[float | None] = []
        for c, r in zip(consensus, reference):
            if c is not None and r is not None:
                scores.append((1.0 - w) * c + w * r)
            else:
                scores.append(c if c is not None else r)
        return self._guard(scores, texts, columns)
