"""Tokenize documents chunk by chunk and pack them into flat token shards plus `meta.json` (DESIGN, Data).

Layout of `<out>/`: `train-00000.bin`, ... and `val-00000.bin`, ...: token ids back to back, uint16 when
the vocabulary has at most 65535 entries else uint32, every document followed by EOS; shards hold exactly
`shard_size_tokens` tokens except a split's last one (a document may continue in the next shard; the
loader reads a split as one stream). `meta.json` is written last: its presence marks a complete dataset.
Shards are written under `.partial` names and renamed only when the run completes.

Memory stays flat as the corpus grows: one chunk of documents and its token ids are held at a time.
The train/val choice is a seeded hash of each document's text, so it is independent of chunking and
order, and identical texts always land in the same split.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from itertools import chain
from pathlib import Path
from typing import Any, BinaryIO, Iterable

import numpy as np

from ..core.errors import DataError
from ..core.io import atomic_write_json, fsync_dir

SPLITS = ("train", "val")
FORMAT = "lmforge-token-shards"
_SHARD_RE = re.compile(r"^(train|val)-\d{5}\.bin(\.partial)?$")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def split_of(text: str, seed: int, val_fraction: float) -> str:
    """'val' for a seeded-hash fraction `val_fraction` of texts, else 'train' (the same text, the same split)."""
    if val_fraction <= 0:
        return "train"
    key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()  # any int seed fits the 64-byte key limit
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return "val" if int.from_bytes(digest, "little") / 2.0**64 < val_fraction else "train"


def tokenizer_info(tokenizer: Any) -> dict:
    """vocab_size, eos_id and fingerprint of a tokenizer (anything with those members)."""
    vocab_size = tokenizer.vocab_size() if callable(tokenizer.vocab_size) else tokenizer.vocab_size
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is None:
        raise DataError("the tokenizer has no eos_id: packing separates documents with EOS, so one is required")
    fingerprint = tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None
    return {"vocab_size": int(vocab_size), "eos_id": int(eos_id), "fingerprint": fingerprint}


def prepare_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Make `out_dir` ready for a new dataset: refuse to replace a complete one unless `overwrite`.

    meta.json goes first, so a run interrupted while replacing a dataset never leaves one that looks
    complete; then old and partial shards (only files named like ours) are removed.
    """
    out = Path(out_dir)
    meta = out / "meta.json"
    if meta.exists():
        if not overwrite:
            raise DataError(f"{out} already holds a complete dataset ({meta}); set data.overwrite=true to replace it")
        meta.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for entry in out.iterdir():
        if _SHARD_RE.match(entry.name):
            entry.unlink()
    return out


class ShardWriter:
    """Appends token arrays to `<split>-NNNNN.bin.partial` files, starting a new shard every N tokens."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_size_tokens: int) -> None:
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_size_tokens = shard_size_tokens
        self.shards: list[dict] = []  # {"file": final name, "tokens": n}
        self._file: BinaryIO | None = None
        self._in_shard = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.out_dir / (name + ".partial"), "wb")
        self.shards.append({"file": name, "tokens": 0})
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens, splitting them across shard boundaries."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        start = 0
        while start < len(tokens):
            if self._file is None or self._in_shard == self.shard_size_tokens:
                self._open_next()
            take = min(len(tokens) - start, self.shard_size_tokens - self._in_shard)
            self._file.write(tokens[start:start + take].data)
            self._in_shard += take
            self.shards[-1]["tokens"] += take
            start += take

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    def commit(self) -> list[dict]:
        """Close the last shard and give every shard its final name; returns the shard list."""
        self._close_current()
        for shard in self.shards:
            os.replace(self.out_dir / (shard["file"] + ".partial"), self.out_dir / shard["file"])
        return self.shards

    def abort(self) -> None:
        """Close and delete this writer's partial files (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for shard in self.shards:
            (self.out_dir / (shard["file"] + ".partial")).unlink(missing_ok=True)


def _new_counts() -> dict[str, int]:
    return {"documents": 0, "tokens": 0, "chars": 0}


class Packer:
    """Tokenizes chunks of documents with `encode_batch` (parallel in Rust) and writes train/val shards."""

    def __init__(self, out_dir: str | Path, tokenizer: Any, *, shard_size_tokens: int = 50_000_000,
                 val_fraction: float = 0.01, seed: int = 0, overwrite: bool = False) -> None:
        self.tokenizer = tokenizer
        self.info = tokenizer_info(tokenizer)
        self.dtype = token_dtype(self.info["vocab_size"])
        self.seed, self.val_fraction = seed, val_fraction
        self.shard_size_tokens = shard_size_tokens
        self.out_dir = prepare_output_dir(out_dir, overwrite)
        self.writers = {s: ShardWriter(self.out_dir, s, self.dtype, shard_size_tokens) for s in SPLITS}
        self.by_source: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: {s: _new_counts() for s in SPLITS})
        self.split_counts = {s: _new_counts() for s in SPLITS}

    def add(self, docs: list) -> None:
        """Tokenize one chunk of documents (anything with .text and .source) and append it to the shards."""
        if not docs:
            return
        ids = self.tokenizer.encode_batch([d.text for d in docs])
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
        if len(flat) and (flat.min() < 0 or flat.max() >= self.info["vocab_size"]):
            raise DataError(f"the tokenizer produced id {int(flat.max())} outside its vocab_size "
                            f"{self.info['vocab_size']}; cannot store it as {self.dtype.name}")
        # each document's ids then EOS, laid out in one array
        ends = np.cumsum(lengths + 1) - 1
        stream = np.empty(len(flat) + len(docs), dtype=self.dtype)
        is_text = np.ones(len(stream), dtype=bool)
        is_text[ends] = False
        stream[is_text] = flat
        stream[ends] = self.info["eos_id"]
        splits = [split_of(d.text, self.seed, self.val_fraction) for d in docs]
        is_val = np.repeat(np.array([s == "val" for s in splits]), lengths + 1)
        self.writers["train"].write(stream[~is_val])
        if is_val.any():
            self.writers["val"].write(stream[is_val])
        for doc, split, n in zip(docs, splits, lengths.tolist()):
            for counts in (self.by_source[doc.source][split], self.split_counts[split]):
                counts["documents"] += 1
                counts["tokens"] += n + 1
                counts["chars"] += len(doc.text)

    def summary(self) -> dict:
        """Token, document and character counts per split and per source (so far)."""
        return {"splits": {s: dict(c) for s, c in self.split_counts.items()},
                "sources": {name: {s: dict(c) for s, c in per.items()} for name, per in self.by_source.items()}}

    def commit(self, extra: dict | None = None) -> dict:
        """Rename the shards to their final names, then write meta.json (last); returns the meta dict."""
        shards = {s: w.commit() for s, w in self.writers.items()}
        fsync_dir(self.out_dir)
        summary = self.summary()
        meta = {
            "format": FORMAT, "version": 1,
            "dtype": self.dtype.name, "vocab_size": self.info["vocab_size"], "eos_id": self.info["eos_id"],
            "tokenizer": dict(self.info),
            "shard_size_tokens": self.shard_size_tokens, "val_fraction": self.val_fraction, "seed": self.seed,
            "splits": {s: {**summary["splits"][s], "shards": shards[s]} for s in SPLITS},
            "sources": summary["sources"],
            **(extra or {}),
        }
        atomic_write_json(self.out_dir / "meta.json", meta)
        return meta

    def abort(self) -> None:
        """Delete the partial shards of an unfinished run (meta.json was never written)."""
        for writer in self.writers.values():
            writer.abort()


MAX_CHUNK_CHARS = 4_000_000  # a chunk of long documents (books) stops early: memory is bounded by text size


def chunked(items: Iterable, size: int, max_chars: int = MAX_CHUNK_CHARS) -> Iterable[list]:
    """Lists of up to `size` consecutive items (documents: also ending once they hold `max_chars` characters)."""
    chunk: list = []
    chars = 0
    for item in items:
        chunk.append(item)
        chars += len(getattr(item, "text", ""))
        if len(chunk) == size or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def pack_documents(docs: Iterable, tokenizer: Any, out_dir: str | Path, *, chunk_docs: int = 1000,
                   shard_size_tokens: int = 50_000_000, val_fraction: float = 0.01, seed: int = 0,
                   overwrite: bool = False, extra_meta: dict | None = None) -> dict:
    """Tokenize and pack a stream of documents into `out_dir`; returns the meta.json contents."""
    packer = Packer(out_dir, tokenizer, shard_size_tokens=shard_size_tokens, val_fraction=val_fraction,
                    seed=seed, overwrite=overwrite)
    try:
        for chunk in chunked(docs, chunk_docs):
            packer.add(chunk)
    except BaseException:
        packer.abort()
        raise
    return packer.commit(extra_meta)
