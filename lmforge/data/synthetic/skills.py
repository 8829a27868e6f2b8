"""Instruction-following SFT tasks about the synthetic world: reading comprehension, JSON extraction, arithmetic.

Fact questions ("Where does Li Ming live?") test what pretraining stored; these test skills SFT can teach
and that carry over to unseen items, so the held-out split measures generalisation, not recall:

- `context_qa`: a short passage of fact sentences, then a question one of them answers (reply: the answer);
- `extract_json`: one fact sentence to turn into {"subject", "relation", "value"} JSON;
- `arithmetic`: "What is 7 + 12?" over small numbers, held-out pairs never seen in training.

Every record is {"messages": [user, assistant], "answer", "category", "lang", "match": "exact"}: the reply is
the answer and nothing else, so scoring is exact match.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Sequence

from . import text as T
from .world import Fact, World

SKILLS = ("context_qa", "extract_json", "arithmetic")

_CONTEXT_QA = {"en": "Read the text and answer the question with just the answer.\n\n{passage}\n\nQuestion: {question}",
               "zh": "阅读下面的文字，只回答答案。\n\n{passage}\n\n问题：{question}"}
_EXTRACT = {"en": 'Extract the fact as JSON with the keys "subject", "relation" and "value".\n\n{sentence}',
            "zh": "把下面句子中的事实提取为 JSON，键为 \"subject\"、\"relation\" 和 \"value\"。\n\n{sentence}"}
_ARITHMETIC = {"en": ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} plus {b} equals?"],
               "zh": ["{a}加{b}等于多少？", "计算{a}+{b}。", "{a}与{b}的和是多少？"]}


def _literal_sentence(world: World, fact: Fact, lang: str, rng: random.Random) -> str:
    """A sentence stating `fact` whose object appears verbatim (not "四十三岁" for 43), so the answer can be
    copied from it."""
    entity = world.entity(fact.subject)
    sentences = [T.fill(t, fact, entity, lang) for t in T.fact_templates(fact, lang)]
    literal = [s for s in sentences if fact.object_text(lang) in s]
    return rng.choice(literal or sentences)


def _passage(world: World, fact: Fact, others: Sequence[Fact], lang: str, rng: random.Random) -> str:
    chosen = [fact] + rng.sample(list(others), k=min(2, len(others)))
    rng.shuffle(chosen)
    sep = "" if lang == "zh" else " "
    return sep.join(_literal_sentence(world, f, lang, rng) for f in chosen)


def context_qa(world: World, facts: Sequence[Fact], lang: str, rng: random.Random) -> list[dict]:
    """One passage + question per fact; the passage's other sentences come from the same fact set."""
    out = []
    for fact in facts:
        others = [f for f in facts if f.fact_id != fact.fact_id and f.relation != fact.relation]
        prompt = _CONTEXT_QA[lang].format(passage=_passage(world, fact, others, lang, rng),
                                          question=T.render_question(fact, lang, rng))
        out.append(_record(prompt, fact.object_text(lang), "context_qa", lang))
    return out


def extract_json(world: World, facts: Sequence[Fact], lang: str, rng: random.Random) -> list[dict]:
    """One sentence per fact -> its (subject, relation, value) as compact JSON."""
    out = []
    for fact in facts:
        sentence = _literal_sentence(world, fact, lang, rng)
        answer = json.dumps({"subject": fact.subject_name(lang), "relation": fact.relation,
                             "value": fact.object_text(lang)}, ensure_ascii=False)
        out.append(_record(_EXTRACT[lang].format(sentence=sentence), answer, "extract_json", lang))
    return out


def arithmetic_pairs(part: str, seed: int, max_operand: int = 20, test_fraction: float = 0.2) -> list[tuple[int, int]]:
    """The (a, b) pairs of one split: a pair and its mirror (b, a) always share a split."""
    def held_out(a: int, b: int) -> bool:
        lo, hi = min(a, b), max(a, b)
        digest = hashlib.sha256(f"arith:{seed}:{lo}:{hi}".encode()).digest()
        return digest[0] < 256 * test_fraction
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)
            if held_out(a, b) == (part == "test")]


def arithmetic(pairs: Sequence[tuple[int, int]], lang: str, rng: random.Random) -> list[dict]:
    return [_record(rng.choice(_ARITHMETIC[lang]).format(a=a, b=b), str(a + b), "arithmetic", lang) for a, b in pairs]


def _record(prompt: str, answer: str, category: str, lang: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "answer": answer, "category": category, "lang": lang, "match": "exact"}


def skill_examples(world: World, facts: Sequence[Fact], part: str, seed: int = 0,
                   langs: Sequence[str] = ("en", "zh"), skills: Sequence[str] = SKILLS) -> list[dict]:
    """Every skill's records for one split (`facts` = that split's facts, `part` = "train" | "test")."""
    unknown = [s for s in skills if s not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skills {unknown}; known: {list(SKILLS)}")
    rng = random.Random(f"lmforge-skills:{seed}:{part}")
    out: list[dict] = []
    for lang in langs:
        if "context_qa" in skills:
            out += context_qa(world, facts, lang, rng)
        if "extract_json" in skills:
            out += extract_json(world, facts, lang, rng)
        if "arithmetic" in skills:
            out += arithmetic(arithmetic_pairs(part, seed), lang, rng)
    return out
