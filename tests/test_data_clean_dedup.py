"""Cleaner rules one by one, exact and MinHash dedup (English and Chinese), and weighted mixing."""
from __future__ import annotations

import random

import numpy as np
import pytest

from lmforge.core.errors import ConfigError
from lmforge.data.clean import Cleaner, char_repetition_ratio, words_of
from lmforge.data.config import CleanConfig, DedupConfig
from lmforge.data.dedup import Deduplicator, MinHasher, estimate_jaccard, optimal_bands
from lmforge.data.mix import WeightedMixer
from lmforge.data.readers import Document

EN_WORDS = ("river mountain paper window garden silver thunder quiet orange market bridge candle forest "
            "harbor pencil planet violet winter engine marble meadow rocket saddle timber velvet anchor "
            "basket cactus dragon falcon glacier hammer island jacket kettle lantern magnet needle oyster").split()
ZH_CHARS = ("天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈"
            "剑号巨阙珠称夜光果珍李柰菜重芥姜海咸河淡鳞潜羽翔龙师火帝鸟官人皇始制文字乃服衣裳推位让国有虞陶唐")


def _en_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(EN_WORDS) for _ in range(words)).capitalize() + "."


def _zh_text(rng: random.Random, chars: int) -> str:
    body = "".join(rng.choice(ZH_CHARS) for _ in range(chars))
    return "，".join(body[i:i + 12] for i in range(0, len(body), 12)) + "。"


def _doc(text: str, source: str = "s") -> Document:
    return Document(text, source, "mem", 1)


# ---- cleaner ---------------------------------------------------------------------------------------------

def test_html_is_stripped_to_visible_text_and_code_is_left_alone():
    cleaner = Cleaner(CleanConfig(min_chars=1))
    page = ("<html><head><title>T</title><style>p {color: red}</style></head><body><h1>Hello</h1>"
            "<p>Hello</p><p>Fish &amp; chips &#20013;&nbsp;here</p><script>evil()</script><div>Second</div></body></html>")
    out = cleaner(page)
    assert out == "Hello\n\nFish & chips 中 here\n\nSecond"  # the headline echoed as a paragraph collapses
    assert cleaner.modified["html"] == 1
    assert cleaner("Tom &amp; Jerry &lt;3") == "Tom & Jerry <3"
    code = "if (a<b && c>d) { return x; } // compare the values a<b"
    assert cleaner(code) == code


def test_nfkc_fixes_full_width_digits_but_keeps_chinese_punctuation():
    cleaner = Cleaner(CleanConfig(min_chars=1))
    assert cleaner("Ｈｅｌｌｏ　ｗｏｒｌｄ １２３ ﬁne") == "Hello world 123 fine"
    assert cleaner("价格是１２３元，对吗？（含税）") == "价格是123元，对吗？（含税）"
    strict = Cleaner(CleanConfig(min_chars=1, nfkc_keep_cjk_punctuation=False))
    assert strict("价格是１２３元，对吗？") == "价格是123元,对吗?"


def test_control_and_invisible_characters_are_removed_but_newlines_and_tabs_kept():
    cleaner = Cleaner(CleanConfig(min_chars=1, normalize_whitespace=False))
    assert cleaner("\ufeffa\x00b\x07c\td\r\ne\u200bf\u00adg") == "abc\td\nefg"
    assert cleaner.modified["control"] == 1


def test_whitespace_is_collapsed_but_indentation_kept():
    cleaner = Cleaner(CleanConfig(min_chars=1))
    assert cleaner("  a \t  b   \n\n\n\n    indented   line  \n") == "a b\n\n    indented line"


def test_boilerplate_lines_are_removed_in_english_and_chinese():
    cleaner = Cleaner(CleanConfig(min_chars=1))
    text = ("A real first paragraph about rivers.\nShare this article: Email | Print\n"
            "Copyright 2024 The Daily Courier. All rights reserved.\n真正的内容在这里。\n版权所有，未经许可不得转载。\n广告")
    assert cleaner(text) == "A real first paragraph about rivers.\n真正的内容在这里。"
    assert cleaner.boilerplate_lines_removed == 4
    prose = ("In the novel the lawyer insists that all rights reserved by the estate must pass to the heirs, "
             "and the heirs, who have waited for years in a cold house by the sea, do not believe a word of it. "
             "Nobody in the village does either, least of all the old harbour master who drafted the will.")
    assert Cleaner(CleanConfig(min_chars=1))(prose) == prose  # a long line is content, not furniture


def test_length_filters_count_their_reasons():
    cleaner = Cleaner(CleanConfig(min_chars=10, max_chars=50))
    assert cleaner("   \n ") is None
    assert cleaner("short") is None
    assert cleaner("x" * 10 + " fine enough text") is not None
    assert cleaner("long " * 20) is None
    assert cleaner.removed["empty"] == 1 and cleaner.removed["too_short"] == 1 and cleaner.removed["too_long"] == 1
    assert cleaner.seen == 4 and cleaner.kept == 1


def test_repetition_filters_catch_spam_in_english_and_chinese_and_keep_normal_text():
    rng = random.Random(0)
    cleaner = Cleaner(CleanConfig())
    assert cleaner(_en_text(rng, 120)) is not None
    assert cleaner(_zh_text(rng, 200)) is not None
    # the same line over and over
    assert cleaner("\n".join(["Buy cheap watches today!"] * 6 + ["Contact us."])) is None
    assert cleaner.removed["duplicate_lines"] == 1
    # one phrase dominating a single line
    spam = " ".join(["click here to win"] * 20 + [rng.choice(EN_WORDS) for _ in range(20)])
    assert cleaner(spam) is None and cleaner.removed["top_ngram"] == 1
    # Chinese spam: a repeated phrase is a character n-gram
    assert cleaner("点击这里购买便宜手表" * 12) is None
    # a long passage repeated inside otherwise normal text
    passage = _en_text(rng, 40)
    assert cleaner(" ".join([_en_text(rng, 30), passage, _en_text(rng, 10), passage, passage])) is None
    assert cleaner.removed["duplicate_ngrams"] == 1
    # character-level garbage
    assert cleaner("Intro text. " + "=" * 300) is None and cleaner.removed["char_repetition"] == 1
    assert char_repetition_ratio("=" * 100) == 1.0


def test_chinese_characters_count_as_words():
    assert words_of("今天天气很好, it's fine 123") == ["今", "天", "天", "气", "很", "好", "it", "s", "fine", "123"]


def test_disabled_cleaner_passes_text_through():
    cleaner = Cleaner(CleanConfig(enabled=False))
    assert cleaner("<p>x</p>") == "<p>x</p>" and cleaner.kept == 1


# ---- dedup -----------------------------------------------------------------------------------------------

def _mutate_words(rng: random.Random, text: str, changes: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), changes):
        words[i] = rng.choice(EN_WORDS)
    return " ".join(words)


def test_exact_dedup_ignores_case_and_whitespace_and_counts_per_source():
    dedup = Deduplicator(DedupConfig(minhash=False))
    docs = [_doc("Hello   World\nagain", "a"), _doc("hello world again", "b"), _doc("Something else", "a"),
            _doc("HELLO WORLD AGAIN", "a")]
    kept = dedup.filter(docs)
    assert [d.text for d in kept] == ["Hello   World\nagain", "Something else"]
    assert dedup.exact_removed == {"b": 1, "a": 1} and dedup.stats()["exact"]["removed"] == 2


def test_minhash_removes_english_and_chinese_near_duplicates_and_keeps_distinct_docs():
    rng = random.Random(1)
    en = _en_text(rng, 300)
    zh = _zh_text(rng, 400)
    zh_near = zh[:100] + "龙" + zh[101:250] + "虎" + zh[251:]
    docs = [_doc(en), _doc(zh), _doc(_en_text(rng, 300)), _doc(_mutate_words(rng, en, 4)), _doc(zh_near),
            _doc(_zh_text(rng, 400)), _doc(_mutate_words(rng, en, 150))]
    dedup = Deduplicator(DedupConfig(exact=False, minhash=True, threshold=0.8), seed=3)
    kept = dedup.filter(docs)
    assert [docs.index(d) for d in kept] == [0, 1, 2, 5, 6]
    assert dedup.stats()["minhash"]["removed"] == 2


def test_dedup_result_does_not_depend_on_chunking_and_repeats_with_the_seed():
    rng = random.Random(2)
    base = [_en_text(rng, 80) for _ in range(30)]
    docs = [_doc(t) for t in base] + [_doc(_mutate_words(rng, t, 1)) for t in base[:10]] + [_doc(base[3])]
    rng.shuffle(docs)

    def run(chunk: int) -> list[str]:
        dedup = Deduplicator(DedupConfig(), seed=7)
        return [d.text for i in range(0, len(docs), chunk) for d in dedup.filter(docs[i:i + chunk])]

    assert run(len(docs)) == run(7) == run(1)
    assert len(run(5)) == 30


def test_minhash_estimates_jaccard_within_tolerance():
    rng = random.Random(3)
    hasher = MinHasher(num_perm=256, shingle_size=5, seed=0)
    errors = []
    for _ in range(12):
        a = _en_text(rng, 120)
        b = _mutate_words(rng, a, rng.randint(0, 60))
        sa, sb = hasher.shingles(a), hasher.shingles(b)
        true = len(sa & sb) / len(sa | sb)
        sig = hasher.signatures([a, b])
        errors.append(estimate_jaccard(sig[0], sig[1]) - true)
    zh_a = _zh_text(rng, 300)
    zh_b = zh_a[:150] + _zh_text(rng, 60) + zh_a[150:]
    sa, sb = hasher.shingles(zh_a), hasher.shingles(zh_b)
    sig = hasher.signatures([zh_a, zh_b])
    errors.append(estimate_jaccard(sig[0], sig[1]) - len(sa & sb) / len(sa | sb))
    errors = np.abs(errors)
    # standard error at 256 permutations is <= 0.031
    assert errors.mean() < 0.035 and errors.max() < 0.1


def test_signatures_match_the_reference_definition_and_are_batch_independent():
    hasher = MinHasher(num_perm=16, shingle_size=3, seed=5)
    texts = ["hello world", "ab", "", "今天天气很好，我们一起去公园", "x" * 5000]
    sig = hasher.signatures(texts)
    for i, text in enumerate(texts):
        values, _ = hasher.shingle_hashes([text])
        reference = ((hasher.a[:, None] * values[None, :] + hasher.b[:, None]) % np.uint64((1 << 31) - 1)).min(axis=1)
        assert (sig[i] == reference).all()
        assert (hasher.signatures([text])[0] == sig[i]).all()


def test_optimal_bands_fit_num_perm_and_put_the_s_curve_near_the_threshold():
    for threshold, num_perm in ((0.8, 128), (0.5, 64), (0.9, 256)):
        bands, rows = optimal_bands(threshold, num_perm)
        assert bands * rows <= num_perm
        assert abs((1 / bands) ** (1 / rows) - threshold) < 0.12


# ---- mixing ----------------------------------------------------------------------------------------------

def test_mix_follows_weights_until_the_first_source_runs_dry():
    streams = {"a": (("a", i) for i in range(6000)), "b": (("b", i) for i in range(6000))}
    mixer = WeightedMixer(streams, {"a": 3.0, "b": 1.0}, seed=0, stopping="first_exhausted")
    items = list(mixer)
    share = mixer.proportions()
    assert abs(share["a"] - 0.75) < 0.02 and mixer.drawn["a"] == 6000
    assert [i for s, i in items if s == "b"] == list(range(mixer.drawn["b"]))  # each stream keeps its order


def test_mix_all_exhausted_uses_every_item_and_is_deterministic():
    def run(seed: int) -> list:
        streams = {"a": iter(range(100)), "b": iter(range(1000, 1300)), "c": iter([])}
        return list(WeightedMixer(streams, {"a": 1, "b": 1, "c": 5}, seed=seed))

    first = run(0)
    assert sorted(first) == list(range(100)) + list(range(1000, 1300))
    assert first == run(0) and first != run(1)
    early = first[:100]
    assert 30 < sum(x < 1000 for x in early) < 70  # equal weights while both run


def test_mix_rejects_bad_weights():
    with pytest.raises(ConfigError, match="weight of source 'a'"):
        WeightedMixer({"a": iter([])}, {"a": 0.0})
    with pytest.raises(ConfigError, match="name different sources"):
        WeightedMixer({"a": iter([])}, {"b": 1.0})
