"""Per-document normalisation and quality filters, with a counter for every reason a document is dropped.

Normalisation (in order): HTML tags and entities out, Unicode NFKC (keeping Chinese full-width
punctuation), control characters out, boilerplate lines out (C4-style patterns), whitespace tidied.
Filters: length, duplicate lines, and the repetition heuristics of Gopher (Rae et al. 2021: top n-gram
and duplicate n-gram character fractions) and BLOOM (character 10-gram repetition ratio).
Chinese and Japanese have no spaces, so for them every CJK character counts as a word; the same
thresholds then work on character n-grams.
"""
from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from typing import Iterable, Iterator

import numpy as np

from .config import CleanConfig
from .dedup import codepoints, ngram_hashes
from .readers import Document

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")
# Only text with real HTML goes through the parser: a known tag name with well-formed attributes (or a
# closing tag, comment or doctype), so `if (a<b && c>d)` in code survives.
_TAG_NAMES = (r"html|head|body|p|div|span|a|br|hr|b|i|u|s|em|strong|small|sub|sup|code|pre|tt|ul|ol|li|dl|dt|dd|"
              r"h[1-6]|table|thead|tbody|tr|td|th|img|script|style|noscript|title|meta|link|iframe|section|"
              r"article|nav|header|footer|main|aside|blockquote|font|center|label|form|input|button|select|"
              r"option|textarea|figure|figcaption")
_HTML_TAG_RE = re.compile(
    rf"<!--|<!doctype\b|</(?:{_TAG_NAMES})\s*>"
    rf"|<(?:{_TAG_NAMES})(?:\s+[\w:-]+(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'<>=`]+))?)*\s*/?>",
    re.IGNORECASE,
)
_HAS_CJK_RE = re.compile(f"[{_CJK}]")
# Full-width punctuation (！，：；？（）［］｛｝～ ...) is how Chinese is written; NFKC would make it ASCII.
_FULLWIDTH_PUNCT_RE = re.compile("([\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff60]+)")
_BOILERPLATE_MAX_LINE = 200
_ENTITY_RE = re.compile(r"&(?:#\d+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]{1,31});")
_INNER_SPACE_RE = re.compile(r"(?<=\S)[^\S\n]+(?=\S)")
_TRAILING_SPACE_RE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_LINES_RE = re.compile(r"\n{3,}")

# Control characters (Cc) except \t and \n, plus invisible format characters that only add noise in
# English and Chinese (zero-width space/joiners, word joiner, BOM, soft hyphen; an emoji ZWJ sequence
# falls apart into its emoji, a cost accepted for clean text).
_CONTROL_TABLE: dict[int, str | None] = {cp: None for cp in [*range(0x00, 0x20), *range(0x7F, 0xA0)]}
del _CONTROL_TABLE[0x09], _CONTROL_TABLE[0x0A]
_CONTROL_TABLE.update({0x0D: "\n", 0x85: "\n", 0x2028: "\n", 0x2029: "\n\n"})
_CONTROL_TABLE.update({cp: None for cp in (0x00AD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF)})

REASONS = ("empty", "too_short", "too_long", "duplicate_lines", "top_ngram", "duplicate_ngrams", "char_repetition")


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML fragment; block elements become line breaks."""

    _SKIP = {"script", "style", "noscript", "template", "head"}
    _BLOCK = {"p", "div", "br", "hr", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
              "tr", "table", "section", "article", "header", "footer", "nav", "main", "aside", "blockquote",
              "pre", "title", "figure", "figcaption", "form"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self._SKIP:
            self._skip_depth += 1
        elif tag in self._BLOCK:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip_depth = max(0, self._skip_depth - 1)
        elif tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip_depth:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Visible text of `text` when it holds HTML tags; otherwise only its entities are decoded.

    A block repeating the block just before it is dropped: pages often repeat a headline as the first
    paragraph, and that echo is markup, not content.
    """
    if _HTML_TAG_RE.search(text):
        parser = _TextExtractor()
        parser.feed(text)
        parser.close()
        lines, previous = [], None
        for line in "".join(parser.parts).split("\n"):
            stripped = line.strip()
            if stripped and stripped == previous:
                continue
            lines.append(line)
            previous = stripped if stripped else previous
        return "\n".join(lines)
    if "&" in text and _ENTITY_RE.search(text):
        return html.unescape(text)
    return text


def nfkc(text: str, keep_cjk_punctuation: bool = True) -> str:
    """NFKC-normalised text; with `keep_cjk_punctuation`, a text holding CJK keeps its full-width punctuation."""
    if unicodedata.is_normalized("NFKC", text):
        return text
    if keep_cjk_punctuation and _HAS_CJK_RE.search(text):
        parts = _FULLWIDTH_PUNCT_RE.split(text)  # odd items are the protected punctuation runs
        return "".join(p if i % 2 else unicodedata.normalize("NFKC", p) for i, p in enumerate(parts))
    return unicodedata.normalize("NFKC", text)


def remove_lines(text: str, pattern: re.Pattern) -> tuple[str, int]:
    """`text` without the short lines (<= 200 chars) that `pattern` matches, and how many were removed."""
    kept, removed = [], 0
    for line in text.split("\n"):
        if len(line) <= _BOILERPLATE_MAX_LINE and pattern.search(line.strip()):
            removed += 1
        else:
            kept.append(line)
    return ("\n".join(kept) if removed else text), removed


def normalize_whitespace(text: str) -> str:
    """Single spaces between words, no trailing spaces, at most one blank line; indentation is kept."""
    text = _INNER_SPACE_RE.sub(" ", text)
    text = _TRAILING_SPACE_RE.sub("", text)
    text = _BLANK_LINES_RE.sub("\n\n", text)
    return text.strip()


def words_of(text: str) -> list[str]:
    """Words for the repetition filters: runs of letters/digits, and each CJK character on its own."""
    return _WORD_RE.findall(text)


def duplicate_line_fraction(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier line."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if len(lines) < 2:
        return 0.0
    return (len(lines) - len(set(lines))) / len(lines)


def top_ngram_fraction(ids: np.ndarray, word_chars: np.ndarray, n: int) -> float:
    """Characters in all occurrences of the most frequent word n-gram over all word characters (Gopher)."""
    if len(ids) < n:
        return 0.0
    grams = ngram_hashes(ids, n, mix=False)
    _, first, counts = np.unique(grams, return_index=True, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 2:
        return 0.0
    start = int(first[best])
    return float(counts[best] * word_chars[start:start + n].sum() / word_chars.sum())


def duplicate_ngram_fraction(ids: np.ndarray, word_chars: np.ndarray, n: int) -> float:
    """Word characters covered by repeats (not first occurrences) of any word n-gram (Gopher)."""
    if len(ids) < n:
        return 0.0
    grams = ngram_hashes(ids, n, mix=False)
    _, first = np.unique(grams, return_index=True)
    repeat = np.ones(len(grams), dtype=bool)
    repeat[first] = False
    if not repeat.any():
        return 0.0
    starts = np.flatnonzero(repeat)
    size = len(ids) + 1
    depth = np.bincount(starts, minlength=size) - np.bincount(starts + n, minlength=size)
    covered = np.cumsum(depth[:-1]) > 0
    return float(word_chars[covered].sum() / word_chars.sum())


def char_repetition_ratio(text: str, n: int = 10) -> float:
    """Share of character n-grams taken by the sqrt(#distinct) most frequent ones (BLOOM/ROOTS)."""
    chars = codepoints(text)
    if len(chars) < n:
        return 0.0
    _, counts = np.unique(ngram_hashes(chars, n, mix=False), return_counts=True)
    top = max(1, int(np.sqrt(len(counts))))
    counts = np.sort(counts)[::-1]
    return float(counts[:top].sum() / counts.sum())


class Cleaner:
    """Normalises documents and drops low-quality ones, counting what it changed and why it dropped."""

    def __init__(self, cfg: CleanConfig | None = None) -> None:
        self.cfg = cfg or CleanConfig()
        self.seen = 0
        self.kept = 0
        self.chars_in = 0
        self.chars_out = 0
        self.removed: Counter[str] = Counter({reason: 0 for reason in REASONS})
        self.modified: Counter[str] = Counter(
            {"html": 0, "nfkc": 0, "control": 0, "boilerplate": 0, "whitespace": 0})
        self.boilerplate_lines_removed = 0
        patterns = self.cfg.boilerplate_patterns
        self._boilerplate = re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None

    def normalize(self, text: str) -> str:
        """The text after HTML stripping, NFKC, control-character and boilerplate-line removal, whitespace tidying."""
        cfg = self.cfg
        if cfg.strip_html:
            out = strip_html(text)
            self.modified["html"] += out != text
            text = out
        if cfg.nfkc:
            out = nfkc(text, cfg.nfkc_keep_cjk_punctuation)
            self.modified["nfkc"] += out != text
            text = out
        if cfg.strip_control:
            out = text.replace("\r\n", "\n").translate(_CONTROL_TABLE)
            self.modified["control"] += out != text
            text = out
        if self._boilerplate is not None:
            text, removed = remove_lines(text, self._boilerplate)
            self.modified["boilerplate"] += removed > 0
            self.boilerplate_lines_removed += removed
        if cfg.normalize_whitespace:
            out = normalize_whitespace(text)
            self.modified["whitespace"] += out != text
            text = out
        return text

    def reject_reason(self, text: str) -> str | None:
        """Why a normalised text should be dropped (one of REASONS), or None to keep it."""
        cfg = self.cfg
        if not text.strip():
            return "empty"
        if len(text) < cfg.min_chars:
            return "too_short"
        if cfg.max_chars and len(text) > cfg.max_chars:
            return "too_long"
        if cfg.max_duplicate_line_fraction < 1.0 and duplicate_line_fraction(text) > cfg.max_duplicate_line_fraction:
            return "duplicate_lines"
        if cfg.max_char_repetition < 1.0 and char_repetition_ratio(text) > cfg.max_char_repetition:
            return "char_repetition"
        if cfg.top_ngram_fractions or cfg.duplicate_ngram_fractions:
            words = words_of(text)
            if len(words) >= max(cfg.min_words_for_repetition, 1):
                return self._word_repetition(words)
        return None

    def _word_repetition(self, words: list[str]) -> str | None:
        """'top_ngram' or 'duplicate_ngrams' when a Gopher word-repetition limit is exceeded, else None."""
        vocab: dict[str, int] = {}
        ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
        word_chars = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        for n, limit in enumerate(self.cfg.top_ngram_fractions, start=2):
            if top_ngram_fraction(ids, word_chars, n) > limit:
                return "top_ngram"
        # coverage only shrinks as n grows (a repeated (n+1)-gram holds two repeated n-grams), so once a
        # fraction is under every remaining limit, no larger n can fail
        limits = self.cfg.duplicate_ngram_fractions
        for n, limit in enumerate(limits, start=5):
            fraction = duplicate_ngram_fraction(ids, word_chars, n)
            if fraction > limit:
                return "duplicate_ngrams"
            if fraction <= min(limits[n - 5:]):
                break
        return None

    def __call__(self, text: str) -> str | None:
        """The cleaned text, or None when the document is dropped (the reason is counted)."""
        self.seen += 1
        self.chars_in += len(text)
        if not self.cfg.enabled:
            self.kept += 1
            self.chars_out += len(text)
            return text
        text = self.normalize(text)
        reason = self.reject_reason(text)
        if reason is not None:
            self.removed[reason] += 1
            return None
        self.kept += 1
        self.chars_out += len(text)
        return text

    def filter(self, docs: Iterable[Document]) -> Iterator[Document]:
        """The kept documents, with their text cleaned in place."""
        for doc in docs:
            text = self(doc.text)
            if text is not None:
                doc.text = text
                yield doc

    def stats(self) -> dict:
        """Counts: seen, kept, removed per reason, documents changed per normalisation step, characters."""
        return {"seen": self.seen, "kept": self.kept, "removed": dict(self.removed),
                "modified": dict(self.modified), "boilerplate_lines_removed": self.boilerplate_lines_removed,
                "chars_in": self.chars_in, "chars_out": self.chars_out}
