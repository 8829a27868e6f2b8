"""The embedded corpus generator: determinism, coverage, noise accounting, leak-free splits, task sets."""
from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from lmforge.core.errors import DataError
from lmforge.data.synthetic import (NoiseConfig, generate_corpus, has_unicode_dirt, inject_noise, iter_documents,
                                    make_world, mc_questions, preference_pairs, rag_documents, rag_questions,
                                    sft_examples, split_facts, tool_tasks, write_corpus, write_tasks)
from lmforge.data.synthetic.noise import JUNK_MAX_CHARS
from lmforge.data.synthetic.text import answer_variants, zh_numeral
from lmforge.data.synthetic.world import NUMBER_TYPES, SYMMETRIC_RELATIONS

SMALL = dict(num_people=30, num_cities=8, num_countries=3, num_companies=8, num_held_out_people=6)


@pytest.fixture(scope="module")
def world():
    return make_world(7, **SMALL)


@pytest.fixture(scope="module")
def stream(world):
    """The whole small-world document stream, both splits."""
    return list(iter_documents(world, seed=7, target_chars=150_000))


@pytest.fixture(scope="module")
def fact_split(world):
    return split_facts(world, seed=1, test_fraction=0.25)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_corpus(tmp_path / name, seed=seed, target_chars=40_000, world=make_world(seed, **SMALL))
        write_tasks(tmp_path / name / "tasks", seed=seed, world=make_world(seed, **SMALL))
    a, b, c = (_tree_bytes(tmp_path / n) for n in "abc")
    assert a == b
    assert a["train/encyclopedia.jsonl"] != c["train/encyclopedia.jsonl"]
    assert {"manifest.json", "noise_report.json", "validation/news.jsonl", "tasks/sft_train.jsonl"} <= set(a)


def test_world_is_deterministic_with_unique_unambiguous_names():
    w1, w2, w3 = make_world(5, **SMALL), make_world(5, **SMALL), make_world(6, **SMALL)
    assert w1.facts() == w2.facts() and w1.facts(held_out=True) == w2.facts(held_out=True)
    assert w1.facts() != w3.facts()
    for lang in ("en", "zh"):
        names = [e.name(lang) for e in w1.entities.values()]
        assert len(set(names)) == len(names)
        assert not [(a, b) for a in names for b in names if a != b and a in b]
    person = w1.of_kind("person")[0]
    assert person.attrs["birth_year"] == 2024 - person.attrs["age"]
    assert w1.lookup(person.name_zh, "age") == str(person.attrs["age"])


def test_language_mix_is_roughly_the_requested_one(world):
    docs = list(generate_corpus(7, num_docs=2000, lang_mix={"en": 0.7, "zh": 0.3}, world=world))
    share = Counter(d["lang"] for d in docs)["en"] / len(docs)
    assert abs(share - 0.7) < 0.04
    assert {d["lang"] for d in generate_corpus(7, num_docs=200, lang_mix={"en": 1.0}, world=world)} == {"en"}
    assert set(docs[0]) == {"text", "lang", "source", "doc_id"}
    assert {d["source"] for d in docs} == {"encyclopedia", "news", "dialogue", "story", "list"}


def test_every_fact_is_stated_in_at_least_two_training_documents(world, stream):
    facts = {f.fact_id: f for f in world.facts()}
    mentions: Counter[str] = Counter()
    for split, doc in stream:
        if split != "train":
            continue
        mentions.update(set(doc.fact_ids))
        for fid in doc.fact_ids:  # the recorded facts really are in the text
            fact = facts[fid]
            assert fact.subject_name(doc.lang) in doc.text
            if doc.lang == "en" or fact.relation != "age":  # Chinese ages may be written 三十二
                assert fact.object_text(doc.lang) in doc.text, (fid, doc.text)
    assert min(mentions[fid] for fid in facts) >= 2


def test_held_out_people_never_appear_in_the_corpus(world, stream):
    held_out = [e for e in world.of_kind("person", held_out=True)]
    assert held_out
    for _, doc in stream:
        assert not any(p.name_en in doc.text or p.name_zh in doc.text for p in held_out)


def test_validation_documents_are_disjoint_from_training(stream):
    train = {d.text for s, d in stream if s == "train"}
    validation = [d.text for s, d in stream if s == "validation"]
    assert validation and not train & set(validation)
    assert 0.02 < len(validation) / (len(train) + len(validation)) < 0.09
    assert list(generate_corpus(7, target_chars=150_000, split="validation", world=make_world(7, **SMALL))) == \
        [d.record() for s, d in stream if s == "validation"]


def test_noise_report_matches_what_is_in_the_corpus(stream):
    clean = [d.record() for s, d in stream if s == "train"]
    assert min(len(r["text"]) for r in clean) > JUNK_MAX_CHARS
    assert not any(has_unicode_dirt(r["text"]) or "<p>" in r["text"] for r in clean)
    config = NoiseConfig(exact_duplicate_rate=0.05, near_duplicate_rate=0.03, html_rate=0.03, unicode_rate=0.03,
                         boilerplate_rate=0.06, short_junk_rate=0.02)
    dirty, report = inject_noise(clean, seed=7, config=config)
    texts = [r["text"] for r in dirty]
    assert len(dirty) == report.total_docs == len(clean) + report.exact_duplicates + report.near_duplicates + report.short_junk
    assert len(texts) - len({hashlib.sha256(t.encode()).hexdigest() for t in texts}) == report.exact_duplicates
    assert report.exact_duplicates == round(0.05 * len(clean))
    assert sum(bool(re.search(r"</?(p|html|div)\b", t)) for t in texts) == report.html == round(0.03 * len(clean))
    assert sum(has_unicode_dirt(t) for t in texts) == report.unicode > 0
    assert sum(len(t) < JUNK_MAX_CHARS for t in texts) == report.short_junk > 0
    lines = Counter(line for t in texts for line in set(t.split("\n")))
    assert report.boilerplate_lines and all(lines[k] == v for k, v in report.boilerplate_lines.items())
    by_id = {r["doc_id"]: r["text"] for r in dirty}
    assert report.near_duplicates > 0
    for copy_id, original_id in report.ids["near_duplicate"]:
        a, b = by_id[copy_id], by_id[original_id]
        grams = lambda s: {s[i:i + 5] for i in range(len(s) - 4)}  # noqa: E731
        assert a != b and len(grams(a) & grams(b)) / len(grams(a) | grams(b)) > 0.6
    assert [r["text"] for r in clean] == [d.text for s, d in stream if s == "train"]  # input untouched


def test_fact_split_is_deterministic_stratified_and_keeps_related_facts_together(world, fact_split):
    again = split_facts(world, seed=1, test_fraction=0.25)
    assert again == fact_split
    assert split_facts(world, seed=2, test_fraction=0.25).test != fact_split.test
    train, test = {f.fact_id for f in fact_split.train}, {f.fact_id for f in fact_split.test}
    assert not train & test and train | test == {f.fact_id for f in world.facts()}
    assert 0.15 < len(test) / len(world.facts()) < 0.35
    assert {(f.kind, f.relation) for f in fact_split.test} == {(f.kind, f.relation) for f in world.facts()}
    for f in fact_split.test:
        if f.relation == "age":
            assert f"{f.subject}/birth_year" in test
        if f.relation in SYMMETRIC_RELATIONS and world.fact(str(f.object), f.relation).object == f.subject:
            assert f"{f.object}/{f.relation}" in test


def test_sft_never_answers_a_test_fact_in_training(world, fact_split):
    train = sft_examples(world, fact_split.train, seed=1)
    assert all(m["role"] in ("user", "assistant") for ex in train for m in ex["messages"])
    assert any(len(ex["messages"]) > 2 for ex in train)
    answers = "\n".join(m["content"] for ex in train for m in ex["messages"] if m["role"] == "assistant")
    for f in fact_split.test:
        for lang in ("en", "zh"):
            for sentence in answer_variants(f, world.entity(f.subject), lang):
                assert sentence not in answers, sentence


def test_task_sets_are_disjoint_between_train_and_test(world, fact_split):
    def prompts(part):
        facts = fact_split.part(part)
        return ({m["content"] for ex in sft_examples(world, facts) for m in ex["messages"] if m["role"] == "user"}
                | {q["question"] for lang in ("en", "zh") for q in mc_questions(world, facts, lang)}
                | {p["prompt"] for p in preference_pairs(world, facts)}
                | {t["question"] for t in tool_tasks(world, facts)})
    train, test = prompts("train"), prompts("test")
    assert train and test and not train & test


def test_mc_answers_are_true_and_distractors_distinct(world):
    for lang in ("en", "zh"):
        for f in world.facts():
            pool = {text: value for value, *texts in world.object_pool(f.kind, f.relation) for text in texts}
            valid = world.valid_objects(f.subject, f.relation)
            records = mc_questions(world, [f], lang)
            if not records:  # only when the world has too few values (e.g. 3 countries) for 3 distractors
                assert len({v for v in pool.values() if v not in valid and v != f.subject}) < 3
                continue
            (record,) = records
            options = [record[k] for k in "ABCD"]
            assert len(set(options)) == 4 and record[record["answer"]] == f.object_text(lang)
            assert not [o for o in options if o != f.object_text(lang) and pool[o] in valid]
            assert record["subject"] == f"{f.kind}_{f.relation}"


def test_preference_pairs_prefer_the_true_sentence(world, fact_split):
    pairs = preference_pairs(world, fact_split.test, seed=3)
    assert len(pairs) == 2 * len(fact_split.test)
    true_sentences = {s for f in fact_split.test for lang in ("en", "zh")
                      for s in answer_variants(f, world.entity(f.subject), lang)}
    assert all(p["chosen"] in true_sentences and p["rejected"] not in true_sentences for p in pairs)


def _calculate(expression: str) -> int:
    tokens = expression.split()
    total = int(tokens[0])
    for op, number in zip(tokens[1::2], tokens[2::2]):
        total = total + int(number) if op == "+" else total - int(number)
    return total


def test_tool_tasks_replay_against_the_world(world, fact_split):
    tasks = tool_tasks(world, fact_split.train, seed=2)
    assert {t["kind"] for t in tasks} >= {"lookup", "difference", "sum", "future_age"}
    numeric_train = {(f.subject_en, f.relation) for f in fact_split.train if f.object_type in NUMBER_TYPES}
    for t in tasks:
        for call in t["calls"]:
            if call["name"] == "lookup":
                args = call["arguments"]
                assert world.lookup(args["entity"], args["attribute"], t["lang"]) == call["result"]
                entity = world.find(args["entity"])
                assert (entity.name_en, args["attribute"]) in numeric_train
            else:
                assert str(_calculate(call["arguments"]["expression"])) == call["result"]
        assert t["calls"][-1]["result"] == t["answer"]
        if t["kind"] == "difference":
            assert int(t["answer"]) > 0


def test_rag_documents_answer_the_rag_questions(world):
    docs = {d["doc_id"]: d for d in rag_documents(world)}
    questions = rag_questions(world)
    assert len(docs) == 2 * len(world.of_kind("person", held_out=True))
    assert len(questions) == 2 * len(world.facts(held_out=True))
    for q in questions:
        doc = docs[q["doc_id"]]
        assert doc["lang"] == q["lang"]
        if q["lang"] == "en" or q["subject"] != "person_age":
            assert q["answer"] in doc["text"], (q, doc["text"])


def test_write_corpus_refuses_to_overwrite(tmp_path):
    small = make_world(1, **SMALL)
    write_corpus(tmp_path, seed=1, num_docs=100, world=small, noise=NoiseConfig(enabled=False))
    with pytest.raises(DataError, match="overwrite"):
        write_corpus(tmp_path, seed=1, num_docs=100, world=small)
    manifest = write_corpus(tmp_path, seed=1, num_docs=100, world=small, overwrite=True)
    assert manifest["splits"]["train"]["docs"] == manifest["noise"]["total_docs"]
    on_disk = sum(1 for p in (tmp_path / "train").glob("*.jsonl") for _ in p.open(encoding="utf-8"))
    assert on_disk == manifest["splits"]["train"]["docs"]
    assert json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8")) == manifest


def test_chinese_numerals():
    assert [zh_numeral(n) for n in (0, 10, 15, 32, 70, 105)] == ["零", "十", "十五", "三十二", "七十", "一百零五"]


def test_default_corpus_size_and_speed():
    """The documented default: about 3-6 MB of clean training text, generated in well under 10 s."""
    start = time.perf_counter()
    docs = list(generate_corpus(0))
    seconds = time.perf_counter() - start
    size = sum(len(d["text"].encode("utf-8")) for d in docs)
    assert 3e6 <= size <= 6e6, size
    assert seconds < 10, seconds
