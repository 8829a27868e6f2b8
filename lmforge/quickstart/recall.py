"""Fact recall: can the model complete a sentence about the synthetic world with the right fact?

A cheap, direct measure of what pretraining learned: for sampled facts, the prompt is a fact statement cut
just before its object ("Li Ming lives in"), the model continues greedily, and a hit is a continuation that
starts with the object. Reported per language; a random model scores ~0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.synthetic import World
from ..data.synthetic.text import a_an, fact_templates, fill, zh_numeral


@dataclass
class ClozePrompt:
    prompt: str
    answers: list[str]
    lang: str
    fact_id: str


def cloze_prompts(world: World, num_facts: int = 100, seed: int = 0, langs: tuple[str, ...] = ("en", "zh")
                  ) -> list[ClozePrompt]:
    """Deterministic prompts: a statement of each sampled fact cut before its object."""
    rng = random.Random(f"cloze:{seed}")
    facts = sorted(world.facts(), key=lambda f: f.fact_id)
    rng.shuffle(facts)
    prompts: list[ClozePrompt] = []
    for fact in facts:
        if len({p.fact_id for p in prompts}) >= num_facts:
            break
        entity = world.entities[fact.subject]
        for lang in langs:
            obj = fact.object_text(lang)
            surface = [obj, a_an(obj)] + ([zh_numeral(int(obj))] if lang == "zh" and obj.isdigit() else [])
            for template in rng.sample(fact_templates(fact, lang), k=len(fact_templates(fact, lang))):
                text = fill(template, fact, entity, lang)
                cut = min((text.find(s) for s in surface if s and text.find(s) > 0), default=-1)
                prefix = text[:cut].rstrip() if lang == "en" else text[:cut]
                if cut > 0 and fact.subject_name(lang) in prefix:
                    answers = sorted({s for s in surface if s and text.startswith(s, cut)}, key=len, reverse=True)
                    prompts.append(ClozePrompt(prefix, answers or [obj], lang, fact.fact_id))
                    break
    return prompts


def fact_recall(model, tokenizer, prompts: list[ClozePrompt], max_new_tokens: int = 12,
                batch_size: int = 64) -> tuple[dict[str, float], list[tuple[str, str, bool]]]:
    """Accuracy per language (and 'all') plus (prompt, completion, hit) rows."""
    from ..infer import generate

    rows: list[tuple[str, str, bool]] = []
    hits: dict[str, list[bool]] = {}
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else None
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer.encode(p.prompt) for p in chunk]
        outputs = generate(model, ids, max_new_tokens, eos_token_id=stop)
        for p, out in zip(chunk, outputs):
            completion = tokenizer.decode(out, skip_special_tokens=True)
            hit = any(completion.strip().startswith(a) for a in p.answers)
            rows.append((p.prompt, completion, hit))
            hits.setdefault(p.lang, []).append(hit)
    scores = {lang: sum(h) / len(h) for lang, h in hits.items()}
    every = [h for hs in hits.values() for h in hs]
    scores["all"] = sum(every) / len(every) if every else 0.0
    return scores, rows
