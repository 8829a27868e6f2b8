"""Fact recall: can the model complete a sentence about the synthetic world with the right fact?

A cheap, direct measure of what pretraining learned: for sampled facts, the prompt is a fact statement cut
just before its object ("Li Ming lives in"), and a hit is a model whose greedy prediction reproduces every
token of the object. The statement is tokenized whole and the object's tokens are checked under teacher
forcing: byte-level BPE merges across the prompt/object boundary (Chinese has no spaces, so "在青溪市" may
start with a token "在青"), and cutting the text before tokenizing would ask the model to continue a token
sequence it never saw. Reported per language; a random model scores ~0.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..data.synthetic import World
from ..data.synthetic.text import a_an, fact_templates, fill, zh_numeral


@dataclass
class ClozePrompt:
    prompt: str
    answer: str
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
                    answer = max((s for s in surface if s and text.startswith(s, cut)), key=len)
                    prompts.append(ClozePrompt(prefix, text[len(prefix):cut] + answer, lang, fact.fact_id))
                    break
    return prompts


def fact_recall(model, tokenizer, prompts: list[ClozePrompt], batch_size: int = 64
                ) -> tuple[dict[str, float], list[tuple[str, str, bool]]]:
    """Accuracy per language (and 'all') plus (prompt, greedy prediction of the object, hit) rows."""
    import torch

    rows: list[tuple[str, str, bool]] = []
    hits: dict[str, list[bool]] = {}
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        encoded = [tokenizer.backend.encode(p.prompt + p.answer, add_special_tokens=False) for p in chunk]
        width = max(len(e.ids) for e in encoded)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)] = torch.tensor(e.ids)  # right padding: causal attention never sees it
        with torch.inference_mode():
            predicted = model(ids.to(device)).argmax(-1).cpu()
        for row, (p, e) in enumerate(zip(chunk, encoded)):
            first = next(i for i, (_, end) in enumerate(e.offsets) if end > len(p.prompt))
            first = max(first, 1)
            target = e.ids[first:]
            guess = predicted[row, first - 1:len(e.ids) - 1].tolist()
            hit = guess == target
            rows.append((p.prompt, _shown(tokenizer, e.ids[:first], guess, p.prompt), hit))
            hits.setdefault(p.lang, []).append(hit)
    scores = {lang: sum(h) / len(h) for lang, h in hits.items()}
    every = [h for hs in hits.values() for h in hs]
    scores["all"] = sum(every) / len(every) if every else 0.0
    return scores, rows


def _shown(tokenizer, context: list[int], guess: list[int], prompt: str) -> str:
    """The predicted continuation as text. Byte-level pieces of Chinese often straddle characters (武港 is
    four pieces, two of them halves of both characters), so the guess alone may not decode to whole
    characters: decode it after its context and cut the prompt off."""
    full = tokenizer.decode(context + guess)
    return full[len(prompt):] if full.startswith(prompt) else tokenizer.decode(guess)
