"""Text metrics for generated answers: exact match, token F1, BLEU, ROUGE-L, and pass@k for code.

Each metric is pinned to its reference so our numbers can be compared with published ones:
- EM / F1 normalise as the official SQuAD v2 script does (lowercase, strip `string.punctuation`, drop the
  articles a/an/the, collapse whitespace; F1 over bags of tokens; an empty side scores 1 only against an
  empty side). Chinese has no spaces between words, so the CJK-aware variant (`lang="zh"`, or `"auto"` when
  either side holds CJK characters) makes every Han/kana character its own token and also strips Unicode
  punctuation (，。！？…), as CMRC-style Chinese QA scoring does.
- BLEU is sacrebleu's corpus BLEU (tokenize="13a", or "zh" for Chinese), the number papers report.
- ROUGE-L is rouge-score's F-measure; its default tokenizer keeps only [a-z0-9], which would erase
  Chinese, so Chinese is scored on characters instead.
- pass@k is the unbiased estimator of Chen et al. (2021), 1 - C(n-c, k) / C(n, k), computed as a product
  so huge binomials never appear.
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Iterable, Literal, Sequence

from ..core.errors import MissingDependencyError

Lang = Literal["en", "zh", "auto"]

# Han ideographs (basic, extension A, compatibility) and Japanese kana: scripts written without spaces.
_CJK_CHAR = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff"
_CJK_RE = re.compile(f"[{_CJK_CHAR}]")
_CJK_OR_WORD_RE = re.compile(f"[{_CJK_CHAR}]|[^\\s{_CJK_CHAR}]+")
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_ASCII_PUNCT = set(string.punctuation)


def has_cjk(text: str) -> bool:
    """True when `text` holds a Han or kana character (then it is scored character by character)."""
    return _CJK_RE.search(text) is not None


def _resolve_lang(lang: Lang, *texts: str) -> str:
    if lang not in ("en", "zh", "auto"):
        raise ValueError(f"lang={lang!r} is not one of 'en', 'zh', 'auto'")
    if lang != "auto":
        return lang
    return "zh" if any(has_cjk(t) for t in texts) else "en"


def _is_punctuation(char: str) -> bool:
    return char in _ASCII_PUNCT or unicodedata.category(char).startswith("P")


def normalize_answer(text: str, lang: Lang = "en") -> str:
    """`text` normalised for EM/F1: SQuAD's rules for "en"; for "zh" also Unicode punctuation removed and
    every CJK character set apart by spaces (so "北京" and "北 京" compare equal)."""
    lang = _resolve_lang(lang, text)
    text = text.lower()
    if lang == "en":  # the SQuAD script, step for step
        text = "".join(ch for ch in text if ch not in _ASCII_PUNCT)
        text = _ARTICLES_RE.sub(" ", text)
        return " ".join(text.split())
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(_CJK_OR_WORD_RE.findall(text))


def answer_tokens(text: str, lang: Lang = "en") -> list[str]:
    """The tokens F1 counts: whitespace words of the normalised text (CJK: one per character)."""
    return normalize_answer(text, lang).split()


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference answer is needed")
    return refs


def exact_match(prediction: str, references: str | Sequence[str], lang: Lang = "auto") -> float:
    """1.0 when the normalised prediction equals some normalised reference, else 0.0 (max over references)."""
    best = 0.0
    for ref in _as_references(references):
        pair_lang = _resolve_lang(lang, prediction, ref)
        best = max(best, float(normalize_answer(prediction, pair_lang) == normalize_answer(ref, pair_lang)))
    return best


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:  # SQuAD v2: unanswerable questions score 1 only when both are empty
        return float(pred_tokens == ref_tokens)
    same = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str], lang: Lang = "auto") -> float:
    """SQuAD token F1 of the prediction against its best-matching reference."""
    best = 0.0
    for ref in _as_references(references):
        pair_lang = _resolve_lang(lang, prediction, ref)
        best = max(best, _f1(answer_tokens(prediction, pair_lang), answer_tokens(ref, pair_lang)))
    return best


def _reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference entries")
    return [_as_references(r) for r in references]


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], lang: Lang = "auto") -> float:
    """Corpus BLEU (0-100) from sacrebleu; each prediction has one reference or a list of them.

    Tokenisation is sacrebleu's "13a" (its default, what WMT reports) or "zh" for Chinese, which splits
    every Chinese character; "auto" picks "zh" when any prediction or reference holds CJK characters."""
    try:
        import sacrebleu
    except ImportError:  # pragma: no cover - an optional dependency
        raise MissingDependencyError("BLEU needs sacrebleu: pip install 'lmforge[eval]' (or bash scripts/setup.sh)") from None
    refs = _reference_lists(predictions, references)
    lang = _resolve_lang(lang, *predictions, *(r for rs in refs for r in rs))
    # sacrebleu wants reference *streams* (the i-th reference of every sentence); None marks a missing one.
    width = max((len(r) for r in refs), default=1)
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams, tokenize="zh" if lang == "zh" else "13a").score)


class CJKTokenizer:
    """rouge-score tokenizer for Chinese: each CJK character a token, plus lowercased [a-z0-9] words."""

    _word = re.compile(f"[{_CJK_CHAR}]|[a-z0-9]+")

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]], lang: Lang = "auto") -> float:
    """Mean ROUGE-L F-measure (0-1) from rouge-score; with several references a prediction takes its best.

    "en" uses rouge-score's own tokenizer (lowercase, [a-z0-9] words, no stemming); "zh" scores characters;
    "auto" decides per pair."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - an optional dependency
        raise MissingDependencyError("ROUGE needs rouge-score: pip install 'lmforge[eval]' (or bash scripts/setup.sh)") from None
    refs = _reference_lists(predictions, references)
    if not predictions:
        return 0.0
    scorers = {"en": rouge_scorer.RougeScorer(["rougeL"]),
               "zh": rouge_scorer.RougeScorer(["rougeL"], tokenizer=CJKTokenizer())}
    total = 0.0
    for prediction, rs in zip(predictions, refs):
        scorer = scorers[_resolve_lang(lang, prediction, *rs)]
        total += scorer.score_multi(rs, prediction)["rougeL"].fmeasure  # rouge-score's order: (targets, prediction)
    return total / len(predictions)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

    Written as 1 - prod_{i=n-c+1..n} (1 - k/i), which equals the ratio of binomials without forming them
    (C(200, 100) has 59 digits); when fewer than k samples failed, every k-subset holds a pass: 1.0."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (k samples drawn from n), got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (samples n, passed c)."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(values) / len(values)
