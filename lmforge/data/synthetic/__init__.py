"""The embedded default corpus: a generated bilingual world, documents about it, and derived task sets.

Why: lmforge trains its own tiny models with no model hub or downloads, so it generates the data every
stage needs, deterministically from a seed, with known answers to measure each stage's gain against.

    world = make_world(seed=0)                       # entities + facts, English and Chinese names
    for doc in generate_corpus(seed=0): ...          # {"text", "lang", "source", "doc_id"}
    write_corpus("data/synthetic", seed=0)           # train/ (noisy) + validation/ JSONL + manifest
    split = split_facts(world, seed=0)               # facts -> train / test
    sft_examples(world, split.train); mc_questions(world, split.test, "zh"); ...
"""
from .corpus import (CorpusConfig, Doc, SOURCES, generate_corpus, iter_documents, render_document, write_corpus,
                     write_corpus_from_config)
from .noise import NoiseConfig, NoiseReport, has_unicode_dirt, inject_noise
from .splits import (TOOL_SPECS, FactSplit, mc_questions, preference_pairs, qa_questions, rag_documents,
                     rag_questions, sft_examples, split_facts, tool_tasks, write_tasks)
from .world import REFERENCE_YEAR, Entity, Fact, World, WorldConfig, make_world, make_world_from_config

__all__ = [
    "make_world", "make_world_from_config", "World", "WorldConfig", "Entity", "Fact", "REFERENCE_YEAR",
    "generate_corpus", "iter_documents", "render_document", "write_corpus", "write_corpus_from_config",
    "CorpusConfig", "Doc", "SOURCES",
    "inject_noise", "NoiseConfig", "NoiseReport", "has_unicode_dirt",
    "split_facts", "FactSplit", "sft_examples", "mc_questions", "qa_questions", "preference_pairs", "rag_documents",
    "rag_questions", "tool_tasks", "write_tasks", "TOOL_SPECS",
]
