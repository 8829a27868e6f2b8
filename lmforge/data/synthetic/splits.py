"""Fact-level train/test splits and the derived task sets every later stage measures its gain on.

How the splits work (and why nothing leaks):
- Pretraining: every fact about a corpus entity is stated in the corpus (train documents); validation
  documents are other renderings of the same world (see corpus.py). Held-out people appear in no corpus
  document: they exist only in `rag_documents`, so RAG's gain is knowledge the model cannot have memorised.
- `split_facts` puts each corpus fact in train or test, deterministically from (seed, fact id), stratified
  per (kind, relation) so every relation is tested. Facts that give each other away share a split: a
  person's age and birth year; both directions of a friendship.
- SFT, preference pairs, multiple choice and tool tasks are built from one part of the split. SFT trains on
  questions about train facts and is tested on test facts: the model saw those facts in pretraining but
  never as a question/answer, so test accuracy measures whether SFT taught it to retrieve what it knows.
- `sft_skills_*` (skills.py): reading comprehension, JSON extraction and arithmetic, with exact-match
  answers; their test part holds unseen facts and unseen number pairs, so it measures a taught skill.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json, atomic_write_text

from . import text as T
from .corpus import render_document
from .skills import skill_examples
from .world import NUMBER_TYPES, REFERENCE_YEAR, SCHEMA, SYMMETRIC_RELATIONS, Fact, World, make_world

_SHARED_GROUP = {"birth_year": "age"}  # relations derivable from each other go to the same split
LETTERS = "ABCD"

# The two tools the tool tasks call, in OpenAI function-calling format (the agent stage registers them).
TOOL_SPECS = [
    {"type": "function", "function": {
        "name": "lookup", "description": "Look up one attribute of a person, city, country or company.",
        "parameters": {"type": "object", "required": ["entity", "attribute"], "properties": {
            "entity": {"type": "string", "description": "the entity's name, English or Chinese"},
            "attribute": {"type": "string", "enum": sorted({r for rels in SCHEMA.values() for r, _ in rels})}}}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression with + - * / and parentheses.",
        "parameters": {"type": "object", "required": ["expression"],
                       "properties": {"expression": {"type": "string"}}}}},
]


@dataclass(frozen=True)
class FactSplit:
    """Corpus facts divided into train and test; build with `split_facts`."""
    train: tuple[Fact, ...]
    test: tuple[Fact, ...]
    seed: int
    test_fraction: float

    def part(self, name: str) -> tuple[Fact, ...]:
        if name not in ("train", "test"):
            raise ConfigError(f"split part {name!r}: expected 'train' or 'test'")
        return self.train if name == "train" else self.test

    def to_dict(self) -> dict:
        return {"seed": self.seed, "test_fraction": self.test_fraction,
                "train": [f.fact_id for f in self.train], "test": [f.fact_id for f in self.test]}


def _group(fact: Fact) -> tuple[tuple[str, str], str]:
    """(stratum, member): facts with the same pair always share a split."""
    member = fact.subject
    if fact.relation in SYMMETRIC_RELATIONS:
        member = min(fact.subject, str(fact.object))
    return (fact.kind, _SHARED_GROUP.get(fact.relation, fact.relation)), member


def split_facts(world: World, seed: int = 0, test_fraction: float = 0.2) -> FactSplit:
    """Assign every corpus fact to train or test; same (world, seed, fraction), same split."""
    if not 0 <= test_fraction <= 1:
        raise ConfigError(f"test_fraction={test_fraction}: must be in [0, 1]")
    facts = world.facts()
    strata: dict[tuple[str, str], set[str]] = {}
    for f in facts:
        stratum, member = _group(f)
        strata.setdefault(stratum, set()).add(member)
    test_groups: set[tuple[tuple[str, str], str]] = set()
    for stratum in sorted(strata):
        members = sorted(strata[stratum], key=lambda m: hashlib.sha256(f"{seed}:{stratum}:{m}".encode()).hexdigest())
        test_groups |= {(stratum, m) for m in members[:round(len(members) * test_fraction)]}
    test = tuple(f for f in facts if _group(f) in test_groups)
    train = tuple(f for f in facts if _group(f) not in test_groups)
    return FactSplit(train, test, seed, test_fraction)


def _answer(world: World, fact: Fact, lang: str, rng: random.Random) -> str:
    return T.fill(rng.choice(T.fact_templates(fact, lang)), fact, world.entity(fact.subject), lang)


def _distractors(world: World, fact: Fact, lang: str, rng: random.Random, k: int) -> list[Fact]:
    """Up to k wrong versions of `fact`, objects drawn from the same relation's values, distinct as text."""
    valid = world.valid_objects(fact.subject, fact.relation)
    pool = [p for p in world.object_pool(fact.kind, fact.relation) if p[0] not in valid and p[0] != fact.subject]
    rng.shuffle(pool)
    seen, out = {fact.object_text(lang)}, []
    for value, en, zh in pool:
        wrong = replace(fact, object=value, object_en=en, object_zh=zh)
        if wrong.object_text(lang) not in seen and len(out) < k:
            seen.add(wrong.object_text(lang))
            out.append(wrong)
    return out


def sft_examples(world: World, facts: Sequence[Fact], seed: int = 0, langs: Sequence[str] = ("en", "zh"),
                 multi_turn_fraction: float = 0.3) -> list[dict]:
    """{"messages": [...]} conversations asking about `facts` only: one per fact and language, plus
    multi-turn ones that ask 2-3 facts about the same subject."""
    rng = random.Random(f"lmforge-sft:{seed}")
    out = []
    for f in facts:
        for lang in langs:
            out.append({"messages": [{"role": "user", "content": T.render_question(f, lang, rng)},
                                     {"role": "assistant", "content": _answer(world, f, lang, rng)}]})
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    for group in by_subject.values():
        if len(group) >= 2 and rng.random() < multi_turn_fraction:
            lang = rng.choice(list(langs))
            messages = []
            for f in rng.sample(group, min(3, len(group))):
                messages += [{"role": "user", "content": T.render_question(f, lang, rng)},
                             {"role": "assistant", "content": _answer(world, f, lang, rng)}]
            out.append({"messages": messages})
    return out


def mc_questions(world: World, facts: Sequence[Fact], lang: str = "en", seed: int = 0) -> list[dict]:
    """MMLU-style {"question", "A".."D", "answer", "subject"}: one per fact, three distinct wrong options
    drawn from the same relation's values (never another true answer)."""
    rng = random.Random(f"lmforge-mc:{seed}:{lang}")
    out = []
    for f in facts:
        wrong = _distractors(world, f, lang, rng, 3)
        if len(wrong) < 3:
            continue
        options = [f.object_text(lang)] + [w.object_text(lang) for w in wrong]
        rng.shuffle(options)
        record = {"question": T.render_question(f, lang, rng)}
        record.update(zip(LETTERS, options))
        record.update(answer=LETTERS[options.index(f.object_text(lang))], subject=f"{f.kind}_{f.relation}")
        out.append(record)
    return out


def qa_questions(world: World, facts: Sequence[Fact], lang: str = "en", seed: int = 0) -> list[dict]:
    """Generative QA {"messages": [user question], "answer", "references", "lang", "subject"}: one per fact;
    `references` lists every right answer as text (a symmetric relation such as friend_of has several)."""
    rng = random.Random(f"lmforge-qa:{seed}:{lang}")
    out = []
    for f in facts:
        refs = sorted({world.value_text(v, f.object_type, lang) for v in world.valid_objects(f.subject, f.relation)}
                      - {f.object_text(lang)})
        out.append({"messages": [{"role": "user", "content": T.render_question(f, lang, rng)}],
                    "answer": f.object_text(lang), "references": [f.object_text(lang)] + refs, "lang": lang,
                    "subject": f"{f.kind}_{f.relation}"})
    return out


def preference_pairs(world: World, facts: Sequence[Fact], seed: int = 0, langs: Sequence[str] = ("en", "zh")) -> list[dict]:
    """{"prompt", "chosen", "rejected"}: the same sentence with the true object and with a wrong one,
    so the only thing the pair teaches is the fact."""
    rng = random.Random(f"lmforge-preference:{seed}")
    out = []
    for f in facts:
        entity = world.entity(f.subject)
        for lang in langs:
            wrong = _distractors(world, f, lang, rng, 1)
            if not wrong:
                continue
            template = rng.choice(T.fact_templates(f, lang))
            out.append({"prompt": T.render_question(f, lang, rng), "chosen": T.fill(template, f, entity, lang),
                        "rejected": T.fill(template, wrong[0], entity, lang)})
    return out


def rag_documents(world: World, langs: Sequence[str] = ("en", "zh")) -> list[dict]:
    """{"doc_id", "title", "text", "lang"}: one encyclopedia entry per held-out person and language."""
    out = []
    for person in world.of_kind("person", held_out=True):
        for lang in langs:
            rng = random.Random(f"lmforge-rag:{world.seed}:{person.id}:{lang}")
            text, _ = render_document(world, person, "encyclopedia", lang, rng)
            out.append({"doc_id": f"rag-{person.id}-{lang}", "title": person.name(lang), "text": text, "lang": lang})
    return out


def rag_questions(world: World, langs: Sequence[str] = ("en", "zh")) -> list[dict]:
    """{"question", "answer", "doc_id", "lang", "subject"} about held-out facts; doc_id is the gold document."""
    rng = random.Random(f"lmforge-rag-questions:{world.seed}")
    return [{"question": T.render_question(f, lang, rng), "answer": f.object_text(lang),
             "doc_id": f"rag-{f.subject}-{lang}", "lang": lang, "subject": f"{f.kind}_{f.relation}"}
            for f in world.facts(held_out=True) for lang in langs]


_TOOL_QUESTIONS = {  # (task kind, relation) -> (en, zh); {a} is larger/older/earlier than {b}
    ("difference", "age"): ("How many years older is {a} than {b}?", "{a}比{b}大几岁？"),
    ("difference", "birth_year"): ("How many years after {a} was {b} born?", "{b}比{a}晚出生几年？"),
    ("difference", "population"): ("How many more people live in {a} than in {b}?", "{a}比{b}多多少人口？"),
    ("difference", "founded_year"): ("How many years after {a} was {b} founded?", "{b}比{a}晚建立多少年？"),
    ("difference", "employees"): ("How many more employees does {a} have than {b}?", "{a}比{b}多多少名员工？"),
    ("sum", "population"): ("What is the combined population of {a} and {b}?", "{a}和{b}的人口加起来是多少？"),
    ("sum", "employees"): ("How many employees do {a} and {b} have together?", "{a}和{b}一共有多少名员工？"),
    ("future_age", "age"): ("It is " + str(REFERENCE_YEAR) + " now. How old will {a} be in {year}?",
                            "现在是" + str(REFERENCE_YEAR) + "年。到{year}年，{a}将会多少岁？"),
}


def _lookup_call(fact: Fact, lang: str) -> dict:
    return {"name": "lookup", "arguments": {"entity": fact.subject_name(lang), "attribute": fact.relation},
            "result": str(fact.object)}


def tool_tasks(world: World, facts: Sequence[Fact], seed: int = 0, langs: Sequence[str] = ("en", "zh")) -> list[dict]:
    """{"question", "answer", "lang", "kind", "calls"}: lookups and arithmetic over numeric facts, every
    fact a task reads taken from `facts`; `calls` is the reference tool trace (lookup, calculator)."""
    rng = random.Random(f"lmforge-tools:{seed}")
    numeric = [f for f in facts if f.object_type in NUMBER_TYPES]
    peers: dict[tuple[str, str], list[Fact]] = {}
    for f in numeric:
        peers.setdefault((f.kind, f.relation), []).append(f)
    out = []
    for i, f in enumerate(numeric):
        lang = langs[i % len(langs)]
        kinds = ["lookup"] + [k for k, r in _TOOL_QUESTIONS if r == f.relation]
        kind = rng.choice(kinds)
        others = [p for p in peers[(f.kind, f.relation)] if p.object != f.object]
        if kind in ("difference", "sum") and not others:
            kind = "lookup"
        if kind == "lookup":
            out.append({"question": T.render_question(f, lang, rng), "answer": str(f.object), "lang": lang,
                        "kind": kind, "calls": [_lookup_call(f, lang)]})
            continue
        calls = [_lookup_call(f, lang)]
        if kind == "future_age":
            year = REFERENCE_YEAR + rng.randint(1, 30)
            expression, answer = f"{f.object} + {year} - {REFERENCE_YEAR}", int(f.object) + year - REFERENCE_YEAR
            a, b = f, f
        else:
            other = rng.choice(others)
            calls.append(_lookup_call(other, lang))
            larger_first = f.relation not in ("birth_year", "founded_year")  # for years, {a} is the earlier
            a, b = sorted((f, other), key=lambda x: int(x.object), reverse=larger_first)
            sign = "+" if kind == "sum" else "-"
            x, y = (a.object, b.object) if larger_first or kind == "sum" else (b.object, a.object)
            expression = f"{x} {sign} {y}"
            answer = int(x) + int(y) if kind == "sum" else int(x) - int(y)
            year = 0
        template = _TOOL_QUESTIONS[(kind, f.relation)][1 if lang == "zh" else 0]
        calls.append({"name": "calculator", "arguments": {"expression": expression}, "result": str(answer)})
        out.append({"question": template.format(a=a.subject_name(lang), b=b.subject_name(lang), year=year),
                    "answer": str(answer), "lang": lang, "kind": kind, "calls": calls})
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_tasks(out_dir: str | Path, seed: int = 0, world: World | None = None, test_fraction: float = 0.2,
                overwrite: bool = False) -> dict:
    """Write every derived set (SFT, MC, preference, tools per split; RAG) as JSONL plus tasks.json."""
    out = Path(out_dir)
    if (out / "tasks.json").exists() and not overwrite:
        raise DataError(f"{out / 'tasks.json'} exists: pass overwrite=True to replace these task sets")
    world = world if world is not None else make_world(seed)
    split = split_facts(world, seed, test_fraction)
    sets: dict[str, list[dict]] = {}
    for part in ("train", "test"):
        facts = split.part(part)
        sets[f"sft_{part}"] = sft_examples(world, facts, seed)
        sets[f"sft_skills_{part}"] = skill_examples(world, facts, part, seed)
        sets[f"preference_{part}"] = preference_pairs(world, facts, seed)
        sets[f"tools_{part}"] = tool_tasks(world, facts, seed)
        for lang in ("en", "zh"):
            sets[f"mc_{lang}_{part}"] = mc_questions(world, facts, lang, seed)
            sets[f"qa_{lang}_{part}"] = qa_questions(world, facts, lang, seed)
    sets["rag_documents"] = rag_documents(world)
    sets["rag_questions"] = rag_questions(world)
    for name, records in sets.items():
        _write_jsonl(out / f"{name}.jsonl", records)
    atomic_write_json(out / "fact_split.json", split.to_dict())
    manifest = {"seed": seed, "test_fraction": test_fraction, "world": world.summary(),
                "facts": {"train": len(split.train), "test": len(split.test)},
                "files": {f"{name}.jsonl": len(records) for name, records in sets.items()}, "tools": TOOL_SPECS}
    atomic_write_json(out / "tasks.json", manifest)
    return manifest
