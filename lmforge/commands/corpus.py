"""Write the embedded synthetic corpus (a generated bilingual world) as JSONL sources.

    lmforge corpus --config recipes/quickstart/corpus.yaml
    lmforge corpus out_dir=runs/corpus corpus.target_chars=1000000 corpus.seed=7

Writes <out_dir>/train/<source>.jsonl (with injected dirt for the cleaning stage), validation/, and
task sets derived from the same world (SFT, multiple choice, preference, RAG, tools) under tasks/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..data.synthetic import CorpusConfig, make_world_from_config, write_corpus_from_config, write_tasks


@dataclass
class Config:
    out_dir: str = opt("runs/corpus", "output directory")
    corpus: CorpusConfig = opt(CorpusConfig, "what to generate")
    tasks: bool = opt(True, "also write the derived task sets (tasks/)")
    overwrite: bool = opt(False, "replace a corpus already in out_dir")


def run(cfg: Config) -> dict:
    manifest = write_corpus_from_config(cfg.out_dir, cfg.corpus, overwrite=cfg.overwrite)
    if cfg.tasks:
        world = make_world_from_config(cfg.corpus.seed, cfg.corpus.world)  # the world the corpus describes
        write_tasks(Path(cfg.out_dir) / "tasks", seed=cfg.corpus.seed, world=world, overwrite=cfg.overwrite)
    splits = manifest["splits"]
    print(f"corpus: {manifest['world']['facts']} facts; train {splits['train']['docs']:,} docs "
          f"({splits['train']['chars']:,} chars incl. injected dirt), validation {splits['validation']['docs']:,} docs "
          f"-> {cfg.out_dir}")
    return manifest
