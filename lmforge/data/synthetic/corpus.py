"""The embedded pretraining corpus: documents about the world, in English and Chinese, from several sources.

Why it is planned rather than sampled: a tiny model only learns a fact it meets several times, in
different words. The generator walks over every corpus entity once per pass, renders one document
about it (source and language drawn from the mixes), and, inside a document, prefers the facts seen
least often so far. It stops once the training text reaches `target_chars` AND every fact has been
stated in at least `min_mentions` training documents.

Validation documents come from the same stream: a document goes to validation when the SHA-256 of its
text falls in the lowest `validation_fraction` of the hash range. Identical texts therefore always land
in the same split, so the two splits can never share a document, and either split can be generated
alone by replaying the stream.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lmforge.config import opt
from lmforge.core.errors import ConfigError, DataError
from lmforge.core.io import atomic_write_json, atomic_write_text

from . import text as T
from .noise import NoiseConfig, inject_noise
from .world import Entity, Fact, World, WorldConfig, make_world, make_world_from_config

SOURCES = ("encyclopedia", "news", "dialogue", "story", "list")
DEFAULT_LANG_MIX = {"en": 0.5, "zh": 0.5}
DEFAULT_SOURCE_MIX = {"encyclopedia": 0.3, "news": 0.2, "dialogue": 0.2, "story": 0.15, "list": 0.15}
DEFAULT_TARGET_CHARS = 2_500_000  # about 4 MB of UTF-8 at the default language mix
MIN_DOC_CHARS = 30                # every clean document is at least this long (noise junk is shorter)
SPLITS = ("train", "validation")


@dataclass
class CorpusConfig:
    """What `write_corpus_from_config` generates; the help text feeds `lmforge data --help`."""
    seed: int = opt(0, "seed of the world and of the documents; same seed, same bytes")
    target_chars: int = opt(DEFAULT_TARGET_CHARS, "characters of clean training text to generate")
    num_docs: int = opt(0, "stop after this many training documents instead (0: use target_chars)")
    lang_mix: dict[str, float] = opt(dict(DEFAULT_LANG_MIX), "share of documents per language (en, zh)")
    source_mix: dict[str, float] = opt(dict(DEFAULT_SOURCE_MIX), f"share of documents per source {list(SOURCES)}")
    validation_fraction: float = opt(0.05, "share of generated documents routed to the validation split")
    min_mentions: int = opt(2, "every fact is stated in at least this many training documents")
    world: WorldConfig = opt(WorldConfig, "size of the generated world")
    noise: NoiseConfig = opt(NoiseConfig, "dirt injected into the training split for the cleaning stage")


@dataclass
class Doc:
    """One generated document plus the ids of the facts it states (kept out of the JSONL records)."""
    text: str
    lang: str
    source: str
    doc_id: str
    fact_ids: tuple[str, ...]

    def record(self) -> dict[str, str]:
        return {"text": self.text, "lang": self.lang, "source": self.source, "doc_id": self.doc_id}


class _Planner:
    """Counts how often each fact was stated in training documents and picks the least-stated ones."""

    def __init__(self, facts: list[Fact], rng: random.Random, min_mentions: int) -> None:
        self.rng = rng
        self.min_mentions = min_mentions
        self.total = {f.fact_id: 0 for f in facts}
        self.by_lang: dict[tuple[str, str], int] = {}
        self.below = len(facts) if min_mentions > 0 else 0

    def pick(self, facts: list[Fact], k: int, lang: str) -> list[Fact]:
        ranked = sorted(facts, key=lambda f: (self.by_lang.get((f.fact_id, lang), 0), self.total.get(f.fact_id, 0),
                                              self.rng.random()))
        return ranked[:k]

    def record(self, fact_ids: tuple[str, ...], lang: str) -> None:
        for fid in set(fact_ids):
            if fid not in self.total:
                continue
            self.total[fid] += 1
            self.by_lang[(fid, lang)] = self.by_lang.get((fid, lang), 0) + 1
            if self.total[fid] == self.min_mentions:
                self.below -= 1


@dataclass
class _Ctx:
    world: World
    rng: random.Random
    planner: _Planner


def _join(sentences: list[str], lang: str) -> str:
    return ("" if lang == "zh" else " ").join(s for s in sentences if s)


def _statements(ctx: _Ctx, entity: Entity, facts: list[Fact], lang: str, name_first: bool = True) -> list[str]:
    """Sentences for `facts`, the first naming the subject and later ones often using a pronoun."""
    return [T.render_fact(f, entity, lang, ctx.rng, pronoun=(i > 0 or not name_first) and ctx.rng.random() < 0.5)
            for i, f in enumerate(facts)]


def _encyclopedia(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    facts = ctx.world.facts_about(entity.id)
    ctx.rng.shuffle(facts)
    sentences = _statements(ctx, entity, facts, lang)
    cut = len(sentences) // 2 if len(sentences) > 4 else len(sentences)
    paragraphs = [_join(sentences[:cut], lang), _join(sentences[cut:], lang)]
    return entity.name(lang) + "\n\n" + "\n\n".join(p for p in paragraphs if p), facts


def _news(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    facts = ctx.planner.pick(ctx.world.facts_about(entity.id), ctx.rng.randint(2, 4), lang)
    ref = T.subject_ref(entity, lang, pronoun=False)[0]
    event = ctx.rng.choice(T.NEWS_EVENTS[lang][entity.kind]).format(S=ref)
    body = [event] + _statements(ctx, entity, facts, lang, name_first=False) + [ctx.rng.choice(T.NEWS_CLOSERS[lang])]
    headline = ctx.rng.choice(T.NEWS_HEADLINES[lang][entity.kind]).format(name=entity.name(lang))
    return headline + "\n\n" + _join(body, lang), facts


def _dialogue(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    facts = ctx.planner.pick(ctx.world.facts_about(entity.id), ctx.rng.randint(2, 4), lang)
    asker, answerer = ctx.rng.choice(T.DIALOGUE_SPEAKERS[lang])
    colon = "：" if lang == "zh" else ": "
    lines = []
    for f in facts:
        lines.append(asker + colon + T.render_question(f, lang, ctx.rng))
        lines.append(answerer + colon + T.render_fact(f, entity, lang, ctx.rng, pronoun=ctx.rng.random() < 0.6))
    return "\n".join(lines), facts


def _story(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    facts = ctx.planner.pick(ctx.world.facts_about(entity.id), ctx.rng.randint(3, 5), lang)
    sentences = [ctx.rng.choice(T.STORY_OPENERS[lang][entity.kind]).format(name=entity.name(lang))]
    events = list(T.STORY_EVENTS[lang][entity.kind])
    ctx.rng.shuffle(events)
    for f in facts:
        if events and ctx.rng.random() < 0.5:
            ref = T.subject_ref(entity, lang, pronoun=ctx.rng.random() < 0.6)[0]
            event = events.pop().format(S=ref)
            sentences.append(event[0].upper() + event[1:])
        connective = ctx.rng.choice(T.STORY_CONNECTIVES[lang])
        sentences.append(connective + T.render_fact(f, entity, lang, ctx.rng, pronoun=ctx.rng.random() < 0.6,
                                                    after_connective=bool(connective)))
    sentences.append(ctx.rng.choice(T.STORY_CLOSERS[lang]))
    return _join(sentences, lang), facts


def _fact_sheet(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    facts = ctx.world.facts_about(entity.id)
    ctx.rng.shuffle(facts)
    title = ctx.rng.choice(T.SHEET_TITLES[lang]).format(name=entity.name(lang))
    return title + "\n" + "\n".join(T.field_line(f, lang) for f in facts), facts


_MEMBERSHIP = {"city": ("person", "lives_in", "occupation"), "company": ("person", "works_at", "occupation"),
               "country": ("city", "located_in", "population")}


def _list(ctx: _Ctx, entity: Entity, lang: str) -> tuple[str, list[Fact]]:
    """A fact sheet for people; for places and companies, half the time a list of who or what belongs there."""
    if entity.kind == "person" or ctx.rng.random() < 0.5:
        return _fact_sheet(ctx, entity, lang)
    member_kind, relation, detail = _MEMBERSHIP[entity.kind]
    links = [ctx.world.fact(m.id, relation) for m in ctx.world.of_kind(member_kind)
             if ctx.world.fact(m.id, relation).object == entity.id]
    if not links:
        return _fact_sheet(ctx, entity, lang)
    facts: list[Fact] = []
    lines = [ctx.rng.choice(T.MEMBER_TITLES[lang][entity.kind]).format(name=entity.name(lang))]
    for link in ctx.planner.pick(links, 8, lang):
        facts.append(link)
        item = "- " + link.subject_name(lang)
        if ctx.rng.random() < 0.5:
            extra = ctx.world.fact(link.subject, detail)
            facts.append(extra)
            shown = extra.object_text(lang)
            if detail == "population":
                item += f"（人口{shown}）" if lang == "zh" else f" (population {shown})"
            else:
                item += f"（{shown}）" if lang == "zh" else f", {shown}"
        lines.append(item)
    return "\n".join(lines), facts


RENDERERS: dict[str, Callable[[_Ctx, Entity, str], tuple[str, list[Fact]]]] = {
    "encyclopedia": _encyclopedia, "news": _news, "dialogue": _dialogue, "story": _story, "list": _list,
}


def render_document(world: World, entity: Entity, source: str, lang: str, rng: random.Random) -> tuple[str, list[Fact]]:
    """One document of `source` about `entity` (used by RAG to write documents outside the corpus)."""
    planner = _Planner(world.facts_about(entity.id), rng, 0)
    return RENDERERS[source](_Ctx(world, rng, planner), entity, lang)


def _weights(mix: dict[str, float] | None, default: dict[str, float], allowed: tuple[str, ...], key: str) -> dict[str, float]:
    mix = dict(default if mix is None else mix)
    bad = sorted(set(mix) - set(allowed))
    if bad or any(not isinstance(w, (int, float)) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ConfigError(f"{key}={mix!r}: weights must be >= 0, not all zero, with keys from {list(allowed)}")
    return {k: float(mix[k]) for k in allowed if mix.get(k, 0) > 0}


def _hash_bucket(text: str) -> tuple[str, float]:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return digest, int(digest[:8], 16) / 2 ** 32


def iter_documents(world: World, seed: int = 0, target_chars: int | None = None, num_docs: int | None = None,
                   lang_mix: dict[str, float] | None = None, source_mix: dict[str, float] | None = None,
                   validation_fraction: float = 0.05, min_mentions: int = 2) -> Iterator[tuple[str, Doc]]:
    """(split, Doc) pairs of the whole stream, both splits interleaved; the Docs carry their fact ids."""
    langs = _weights(lang_mix, DEFAULT_LANG_MIX, ("en", "zh"), "lang_mix")
    sources = _weights(source_mix, DEFAULT_SOURCE_MIX, SOURCES, "source_mix")
    if not 0 <= validation_fraction < 1:
        raise ConfigError(f"validation_fraction={validation_fraction}: must be in [0, 1)")
    if num_docs is None and target_chars is None:
        target_chars = DEFAULT_TARGET_CHARS
    rng = random.Random(f"lmforge-corpus:{seed}")
    entities = [e for e in world.entities.values() if not e.held_out]
    ctx = _Ctx(world, rng, _Planner(world.facts(), rng, min_mentions))
    seen: set[str] = set()
    train_chars = train_docs = index = 0
    for _ in range(100_000):  # passes; the loop always ends far earlier, this only guards a bad config
        order = entities[:]
        rng.shuffle(order)
        for entity in order:
            lang = rng.choices(list(langs), list(langs.values()))[0]
            source = rng.choices(list(sources), list(sources.values()))[0]
            text, facts = RENDERERS[source](ctx, entity, lang)
            if len(text) < MIN_DOC_CHARS:
                text, facts = _encyclopedia(ctx, entity, lang)
            digest, bucket = _hash_bucket(text)
            if len(text) < MIN_DOC_CHARS or digest in seen:
                continue
            seen.add(digest)
            split = "validation" if bucket < validation_fraction else "train"
            doc = Doc(text, lang, source, f"{split}-{index:07d}", tuple(f.fact_id for f in facts))
            index += 1
            if split == "train":
                ctx.planner.record(doc.fact_ids, lang)
                train_chars += len(text)
                train_docs += 1
            yield split, doc
            if (train_docs >= num_docs) if num_docs else (train_chars >= (target_chars or 0) and ctx.planner.below == 0):
                return
    raise ConfigError(f"corpus generation did not finish (min_mentions={min_mentions}, source_mix={source_mix})")


def generate_corpus(seed: int = 0, target_chars: int | None = None, num_docs: int | None = None,
                    lang_mix: dict[str, float] | None = None, source_mix: dict[str, float] | None = None, *,
                    split: str = "train", validation_fraction: float = 0.05, min_mentions: int = 2,
                    world: World | None = None) -> Iterator[dict[str, str]]:
    """{"text", "lang", "source", "doc_id"} records of one split of the clean corpus for `seed`.

    Generation stops when the training text reaches `target_chars` (default 2.5M characters, about 4 MB)
    and every fact is in `min_mentions` training documents; `num_docs`, if given, wins instead (and then
    coverage is not guaranteed). `world` defaults to `make_world(seed)`.
    """
    if split not in SPLITS:
        raise ConfigError(f"split={split!r}: expected one of {list(SPLITS)}")
    world = world if world is not None else make_world(seed)
    for doc_split, doc in iter_documents(world, seed, target_chars, num_docs, lang_mix, source_mix,
                                         validation_fraction, min_mentions):
        if doc_split == split:
            yield doc.record()


def _stats(records: list[dict[str, str]]) -> dict:
    out: dict = {"docs": len(records), "chars": 0, "bytes": 0, "by_lang": {}, "by_source": {}}
    for r in records:
        n, b = len(r["text"]), len(r["text"].encode("utf-8"))
        out["chars"] += n
        out["bytes"] += b
        for key, group in (("by_lang", r["lang"]), ("by_source", r["source"])):
            slot = out[key].setdefault(group, {"docs": 0, "chars": 0})
            slot["docs"] += 1
            slot["chars"] += n
    for key in ("by_lang", "by_source"):
        out[key] = dict(sorted(out[key].items()))
    return out


def write_corpus(out_dir: str | Path, seed: int = 0, target_chars: int | None = None, num_docs: int | None = None,
                 lang_mix: dict[str, float] | None = None, source_mix: dict[str, float] | None = None, *,
                 validation_fraction: float = 0.05, min_mentions: int = 2, noise: NoiseConfig | None = None,
                 world: World | None = None, overwrite: bool = False) -> dict:
    """Write <out>/{train,validation}/<source>.jsonl, noise_report.json and manifest.json; returns the manifest.

    Noise (default `NoiseConfig()`; pass `NoiseConfig(enabled=False)` for none) dirties the training split
    only; validation stays clean so its loss measures the model, not the dirt.
    """
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:
        raise DataError(f"{out / 'manifest.json'} exists: pass overwrite=True to replace this corpus")
    world = world if world is not None else make_world(seed)
    noise = noise if noise is not None else NoiseConfig()
    splits: dict[str, list[dict[str, str]]] = {s: [] for s in SPLITS}
    mentions: dict[str, int] = {f.fact_id: 0 for f in world.facts()}
    for split, doc in iter_documents(world, seed, target_chars, num_docs, lang_mix, source_mix,
                                     validation_fraction, min_mentions):
        splits[split].append(doc.record())
        if split == "train":
            for fid in set(doc.fact_ids):
                mentions[fid] += 1
    clean_stats = _stats(splits["train"])
    splits["train"], report = inject_noise(splits["train"], seed, noise)
    files = {}
    for split, records in splits.items():
        for source in SOURCES:
            lines = [json.dumps(r, ensure_ascii=False) for r in records if r["source"] == source]
            if lines:
                rel = f"{split}/{source}.jsonl"
                data = "\n".join(lines) + "\n"
                atomic_write_text(out / rel, data)
                files[rel] = {"docs": len(lines), "sha256": hashlib.sha256(data.encode("utf-8")).hexdigest()}
    counts = sorted(mentions.values())
    manifest = {
        "generator": "lmforge.data.synthetic", "format_version": 1, "seed": seed,
        "settings": {"target_chars": target_chars, "num_docs": num_docs, "lang_mix": lang_mix or DEFAULT_LANG_MIX,
                     "source_mix": source_mix or DEFAULT_SOURCE_MIX, "validation_fraction": validation_fraction,
                     "min_mentions": min_mentions},
        "world": {"config": vars(world.config), **world.summary()},
        "fact_mentions": {"min": counts[0] if counts else 0, "median": counts[len(counts) // 2] if counts else 0},
        "splits": {"train_clean": clean_stats, "train": _stats(splits["train"]), "validation": _stats(splits["validation"])},
        "noise": report.to_dict(with_ids=False),
        "files": files,
    }
    atomic_write_json(out / "noise_report.json", report.to_dict())  # per-document ids, for cleaner tests
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def write_corpus_from_config(out_dir: str | Path, config: CorpusConfig, overwrite: bool = False) -> dict:
    """`write_corpus` driven by a `CorpusConfig` (what the `lmforge data` command calls)."""
    world = make_world_from_config(config.seed, config.world)
    return write_corpus(out_dir, config.seed, None if config.num_docs else config.target_chars,
                        config.num_docs or None, config.lang_mix, config.source_mix,
                        validation_fraction=config.validation_fraction, min_mentions=config.min_mentions,
                        noise=config.noise, world=world, overwrite=overwrite)
