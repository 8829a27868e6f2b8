"""Controlled dirt for the synthetic corpus, with an exact report of what was injected.

Why: the cleaning stage (dedup, HTML stripping, Unicode normalisation, boilerplate and length filters)
must show a measured effect, so the corpus it cleans has to be dirty in the ways web text is, and the
amounts have to be known. Every kind of dirt touches its own documents (an exact copy is only ever made
of an untouched document), so each count in `NoiseReport` can be re-found independently:

- exact duplicates   extra copies of documents: len(docs) - len(set(texts))
- near duplicates    a copy of a long document with 2-3 words (Chinese: characters) replaced
- html               text wrapped in a page: tags, <p> per paragraph, entities (&amp; &nbsp; &#x27;)
- unicode            zero-width spaces plus some of: full-width digits/letters, NBSP, ligatures, control
                     characters, a BOM. NFKC fixes the full-width forms, NBSP and ligatures; the zero-width
                     and control characters need removing by category. See `has_unicode_dirt`.
- boilerplate        the same footer/header lines added to many documents
- short junk         documents shorter than JUNK_MAX_CHARS ("Page 3 of 17")
"""
from __future__ import annotations

import html
import random
import unicodedata
from dataclasses import asdict, dataclass, field

from lmforge.config import opt

JUNK_MAX_CHARS = 20      # junk documents are shorter than this; clean documents are never this short
NEAR_DUP_MIN_CHARS = 150  # near-duplicates are made from documents at least this long, so they stay near

BOILERPLATE = {
    "en": ["Subscribe to our newsletter for more stories like this.", "Share this article: Email | Print",
           "Copyright 2024 The Daily Courier. All rights reserved.", "Advertisement"],
    "zh": ["点击这里订阅我们的新闻简报。", "分享到：微信 | 微博", "版权所有，未经许可不得转载。", "广告"],
}
_JUNK = {"en": ["Page {a} of {b}", "Comments ({a})", "Loading {a}%", "test post {a}", "Read more ({a})"],
         "zh": ["第{a}页，共{b}页", "评论（{a}）", "加载中{a}%", "测试帖{a}", "阅读全文（{a}）"]}
_EN_SWAPS = ("very", "quite", "also", "really", "still", "often", "then", "just", "soon", "well")
_ZH_SWAPS = "的了也很都又还就才再"
_CONTROL = "\x07\x0b\x1b\x7f"
_DIRT_CHARS = frozenset("\u00a0\u200b\u200c\u200d\u2060\ufeff\u00ad" + "".join(chr(c) for c in range(0xFB00, 0xFB07)))
_HTML_PAGES = (
    '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title></head>\n<body>\n'
    '<nav><a href="/">Home</a> | <a href="/archive">Archive</a></nav>\n<div class="article">\n{body}\n</div>\n'
    '<footer>&copy; 2024 The Daily Courier &amp; Partners.&nbsp;All rights reserved.</footer>\n</body></html>',
    '<html>\n<head><title>{title} &mdash; Wiki</title></head>\n<body><div id="content">\n<h1>{title}</h1>\n{body}\n'
    '</div><div class="footer">Text is available under a free licence &amp; may be reused.</div></body>\n</html>',
    '<div class="post"><h2>{title}</h2>\n{body}\n<span class="meta">Posted&nbsp;by admin &middot; 3 comments</span></div>',
)


@dataclass
class NoiseConfig:
    """Rates are fractions of the clean training documents; each kind touches its own documents."""
    enabled: bool = opt(True, "inject dirt into the training split")
    exact_duplicate_rate: float = opt(0.03, "extra exact copies of documents")
    near_duplicate_rate: float = opt(0.02, "extra copies with 2-3 words changed")
    html_rate: float = opt(0.02, "documents wrapped in HTML")
    unicode_rate: float = opt(0.02, "documents with odd Unicode (full-width, zero-width, control chars)")
    boilerplate_rate: float = opt(0.05, "documents given repeated header/footer lines")
    short_junk_rate: float = opt(0.01, f"extra junk documents under {JUNK_MAX_CHARS} characters")


@dataclass
class NoiseReport:
    """What was injected; `ids` lists the documents per kind ([copy, original] pairs for duplicates)."""
    clean_docs: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    html: int = 0
    unicode: int = 0
    boilerplate_docs: int = 0
    short_junk: int = 0
    boilerplate_lines: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list] = field(default_factory=dict)
    junk_max_chars: int = JUNK_MAX_CHARS

    @property
    def total_docs(self) -> int:
        return self.clean_docs + self.exact_duplicates + self.near_duplicates + self.short_junk

    def to_dict(self, with_ids: bool = True) -> dict:
        out = {**asdict(self), "total_docs": self.total_docs}
        if not with_ids:
            del out["ids"]
        return out


def has_unicode_dirt(text: str) -> bool:
    """True if `text` holds a character the unicode noise injects and clean text never has."""
    for ch in text:
        code = ord(ch)
        if ch in _DIRT_CHARS or 0xFF10 <= code <= 0xFF19 or 0xFF21 <= code <= 0xFF3A or 0xFF41 <= code <= 0xFF5A:
            return True
        if ch not in "\n\t\r" and unicodedata.category(ch) == "Cc":
            return True
    return False


def html_wrap(text: str, rng: random.Random) -> str:
    """`text` as a small web page: escaped paragraphs inside navigation and footer markup."""
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    body = "\n".join("<p>" + html.escape(p).replace("\n", "<br>") + "</p>" for p in paragraphs)
    return rng.choice(_HTML_PAGES).format(title=html.escape(text.split("\n", 1)[0]), body=body)


def _fullwidth(s: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalnum() else c for c in s)


def unicode_dirt(text: str, rng: random.Random) -> str:
    """`text` with zero-width spaces plus one or two other kinds of odd Unicode."""
    ops = ["digits", "word", "nbsp", "ligature", "control", "bom"]
    for op in rng.sample(ops, rng.randint(1, 2)):
        if op == "digits":
            text = "".join(_fullwidth(c) if c.isdigit() else c for c in text)
        elif op == "word":
            words = [w for w in text.split(" ") if w.isascii() and w.isalpha()]
            if words:
                target = rng.choice(words)
                text = text.replace(target, _fullwidth(target), 1)
        elif op == "nbsp":
            text = "".join("\u00a0" if c == " " and rng.random() < 0.3 else c for c in text)
        elif op == "ligature":
            text = text.replace("fi", "\ufb01").replace("fl", "\ufb02")
        elif op == "control":
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(_CONTROL) + text[at:]
        else:
            text = "\ufeff" + text
    for _ in range(rng.randint(1, 3)):  # always at least one, so every touched document is really dirty
        at = rng.randrange(1, len(text))
        text = text[:at] + "\u200b" + text[at:]
    return text


def near_duplicate(text: str, lang: str, rng: random.Random) -> str:
    """`text` with 2-3 words (Chinese: characters) replaced by different ones."""
    if lang == "zh":
        chars = list(text)
        spots = [i for i, c in enumerate(chars) if "\u4e00" <= c <= "\u9fff"]
        for i in rng.sample(spots, min(len(spots), rng.randint(2, 3))):
            chars[i] = rng.choice([c for c in _ZH_SWAPS if c != chars[i]])
        return "".join(chars)
    words = text.split(" ")
    spots = [i for i, w in enumerate(words) if w.isalpha() and w.islower() and len(w) >= 3]
    for i in rng.sample(spots, min(len(spots), rng.randint(2, 3))):
        words[i] = rng.choice([w for w in _EN_SWAPS if w != words[i]])
    return " ".join(words)


def _junk(lang: str, rng: random.Random) -> str:
    a = rng.randint(1, 999)
    return rng.choice(_JUNK[lang]).format(a=a, b=rng.randint(a, 999))


def inject_noise(records: list[dict], seed: int, config: NoiseConfig | None = None) -> tuple[list[dict], NoiseReport]:
    """A dirty copy of `records` (input untouched) and the report of exactly what was done to it."""
    config = config if config is not None else NoiseConfig()
    docs = [dict(r) for r in records]
    report = NoiseReport(clean_docs=len(docs))
    if not config.enabled or not docs:
        return docs, report
    rng = random.Random(f"lmforge-noise:{seed}")
    n = len(docs)
    count = lambda rate: min(n, int(round(rate * n)))  # noqa: E731
    order = list(range(n))
    rng.shuffle(order)
    k_html, k_uni, k_boiler = count(config.html_rate), count(config.unicode_rate), count(config.boilerplate_rate)
    html_idx = order[:k_html]
    uni_idx = order[k_html:k_html + k_uni]
    boiler_idx = order[k_html + k_uni:k_html + k_uni + k_boiler]
    untouched = sorted(order[k_html + k_uni + k_boiler:])

    for i in html_idx:
        docs[i]["text"] = html_wrap(docs[i]["text"], rng)
    for i in uni_idx:
        docs[i]["text"] = unicode_dirt(docs[i]["text"], rng)
    for i in boiler_idx:
        lines = rng.sample(BOILERPLATE[docs[i]["lang"]], rng.randint(1, 2))
        head = [lines.pop()] if len(lines) > 1 and rng.random() < 0.5 else []
        docs[i]["text"] = "\n".join(head + [docs[i]["text"]] + lines)
        for line in head + lines:
            report.boilerplate_lines[line] = report.boilerplate_lines.get(line, 0) + 1
    report.html, report.unicode, report.boilerplate_docs = len(html_idx), len(uni_idx), len(boiler_idx)
    report.ids = {"html": [docs[i]["doc_id"] for i in html_idx], "unicode": [docs[i]["doc_id"] for i in uni_idx],
                  "boilerplate": [docs[i]["doc_id"] for i in boiler_idx],
                  "near_duplicate": [], "exact_duplicate": [], "short_junk": []}

    texts = {d["text"] for d in docs}
    prefix = docs[0]["doc_id"].split("-", 1)[0]
    extras: list[tuple[str, dict, str]] = []  # (kind, record, original id)
    long_docs = [i for i in untouched if len(docs[i]["text"]) >= NEAR_DUP_MIN_CHARS]
    for i in rng.sample(long_docs, min(len(long_docs), count(config.near_duplicate_rate))):
        changed = near_duplicate(docs[i]["text"], docs[i]["lang"], rng)
        if changed not in texts:
            texts.add(changed)
            extras.append(("near_duplicate", {**docs[i], "text": changed}, docs[i]["doc_id"]))
    for _ in range(count(config.exact_duplicate_rate) if untouched else 0):
        i = rng.choice(untouched)
        extras.append(("exact_duplicate", dict(docs[i]), docs[i]["doc_id"]))
    langs = sorted({d["lang"] for d in docs})
    sources = sorted({d["source"] for d in docs})
    for _ in range(count(config.short_junk_rate)):
        lang = rng.choice(langs)
        text = _junk(lang, rng)
        while text in texts:
            text = _junk(lang, rng)
        texts.add(text)
        extras.append(("short_junk", {"text": text, "lang": lang, "source": rng.choice(sources), "doc_id": ""}, ""))

    for j, (kind, record, original) in enumerate(extras):
        record["doc_id"] = f"{prefix}-n{j:06d}"
        report.ids[kind].append([record["doc_id"], original] if original else record["doc_id"])
        docs.insert(rng.randrange(len(docs) + 1), record)
    report.near_duplicates = len(report.ids["near_duplicate"])
    report.exact_duplicates = len(report.ids["exact_duplicate"])
    report.short_junk = len(report.ids["short_junk"])
    report.boilerplate_lines = dict(sorted(report.boilerplate_lines.items()))
    return docs, report
