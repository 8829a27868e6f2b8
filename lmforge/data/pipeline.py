"""`lmforge data`: read -> clean -> dedup -> mix -> tokenize + pack -> stats, streaming chunk by chunk.

Each source is a lazy stream (its reader, its own Cleaner, the one shared Deduplicator, processed
`chunk_docs` at a time); the mixer draws from those streams by weight; the packer tokenizes the mixed
stream `chunk_docs` at a time. Only a few chunks are in memory at once, so memory does not grow with
the corpus (except the dedup state: a few hundred bytes per kept document, see dedup.py).
Output: shards + stats.json + stats.md, then meta.json last (its presence marks a complete dataset).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterator

from ..config import to_dict
from ..core.errors import ConfigError
from ..core.io import atomic_write_json, atomic_write_text
from .clean import Cleaner
from .config import DataConfig, SourceConfig, source_name
from .dedup import Deduplicator
from .mix import WeightedMixer
from .pack import Packer, chunked
from .readers import Document, ReadStats, read_source, resolve_paths
from .stats import build_report, render_markdown


def _source_stream(src: SourceConfig, cfg: DataConfig, stats: ReadStats, cleaner: Cleaner,
                   deduper: Deduplicator | None) -> Iterator[Document]:
    """One source's documents, read, cleaned and deduplicated a chunk at a time."""
    for chunk in chunked(read_source(src, cfg.on_error, stats), cfg.chunk_docs):
        kept = list(cleaner.filter(chunk))
        yield from (deduper.filter(kept) if deduper is not None else kept)


class _Progress:
    """Prints a progress line at most every `every` seconds."""

    def __init__(self, log: Callable[[str], None], every: float = 5.0) -> None:
        self.log, self.every = log, every
        self.start = self.last = time.monotonic()

    def update(self, read: int, written: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        rate = read / max(now - self.start, 1e-9)
        self.log(f"data: {read:,} documents read, {written:,} written, {tokens:,} tokens ({rate:,.0f} docs/s)")


def _load_tokenizer(cfg: DataConfig) -> Any:
    if not cfg.tokenizer:
        raise ConfigError("data.tokenizer is empty: give the directory of a trained tokenizer")
    from ..tokenizer import Tokenizer  # data depends on tokenizer, never the reverse (DESIGN, Layout)

    return Tokenizer.from_pretrained(cfg.tokenizer)


def run_data_pipeline(cfg: DataConfig, tokenizer: Any = None, log: Callable[[str], None] = print) -> dict:
    """Build a packed dataset in cfg.output_dir; returns the stats report (also in stats.json)."""
    cfg.validate()
    if not cfg.sources:
        raise ConfigError("data.sources is empty: list at least one {path: ..., weight: ...}")
    out = Path(cfg.output_dir).resolve()
    for i, src in enumerate(cfg.sources):  # fail on a missing path before any work is done
        for path, _ in resolve_paths(src):
            if out == path.resolve() or out in path.resolve().parents:
                raise ConfigError(f"data.sources[{i}] reads {path}, which is inside data.output_dir={cfg.output_dir}; "
                                  "write the dataset somewhere else")
    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(cfg)
    started = time.monotonic()
    packer = Packer(cfg.output_dir, tokenizer, shard_size_tokens=cfg.shard_size_tokens,
                    val_fraction=cfg.val_fraction, seed=cfg.seed, overwrite=cfg.overwrite)
    deduper = Deduplicator(cfg.dedup, cfg.seed) if (cfg.dedup.exact or cfg.dedup.minhash) else None
    names = [source_name(s) for s in cfg.sources]
    read = {n: ReadStats() for n in names}
    cleaners = {n: Cleaner(cfg.clean) for n in names}
    streams = {n: _source_stream(s, cfg, read[n], cleaners[n], deduper) for n, s in zip(names, cfg.sources)}
    mixer = WeightedMixer(streams, {n: s.weight for n, s in zip(names, cfg.sources)}, cfg.seed, cfg.mix_stopping)
    log(f"data: {len(names)} source(s) -> {cfg.output_dir} (chunk_docs={cfg.chunk_docs}, "
        f"dedup exact={cfg.dedup.exact} minhash={cfg.dedup.minhash}, val_fraction={cfg.val_fraction})")
    progress = _Progress(log)
    try:
        for chunk in chunked(mixer, cfg.chunk_docs):
            packer.add(chunk)
            split = packer.split_counts
            progress.update(sum(r.documents for r in read.values()),
                            split["train"]["documents"] + split["val"]["documents"],
                            split["train"]["tokens"] + split["val"]["tokens"])
    except BaseException:
        packer.abort()
        raise
    report = build_report(read, cleaners, deduper.stats() if deduper else None, mixer.stats(),
                          packer.summary(), time.monotonic() - started)
    atomic_write_json(out / "stats.json", report)
    atomic_write_text(out / "stats.md", render_markdown(report))
    packer.commit({"read": {n: r.to_dict() for n, r in read.items()},
                   "clean": {n: c.stats() for n, c in cleaners.items()},
                   "dedup": report["dedup"], "mix": report["mix"], "config": to_dict(cfg)})
    _log_summary(report, log)
    return {**report, "output_dir": str(cfg.output_dir)}


def _log_summary(report: dict, log: Callable[[str], None]) -> None:
    d, s, t = report["documents"], report["splits"], report["throughput"]
    log(f"data: read {d['read']:,} documents; cleaning removed {d['removed_by_cleaning']:,}, "
        f"exact dedup {d['exact_duplicates']:,}, near dedup {d['near_duplicates']:,}; "
        f"wrote {d['written']:,} ({s['train']['tokens']:,} train / {s['val']['tokens']:,} val tokens)")
    mix = report["mix"]
    shares = ", ".join(f"{name} {share:.2f} (target {mix['target_proportions'][name]:.2f})"
                       for name, share in mix["realised_proportions"].items())
    log(f"data: documents per source: {shares}")
    log(f"data: {t['seconds']} s, {t['documents_per_second']} docs/s, {t['tokens_per_second']} tokens/s; "
        f"report in stats.md")
