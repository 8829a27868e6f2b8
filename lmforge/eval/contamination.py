"""Contamination: how much of an eval set already appears, n-gram for n-gram, in the training data.

Text is normalised the way EM/F1 normalise answers (lowercase, punctuation and articles dropped,
whitespace collapsed) with every CJK character its own unit, so "Li Ming lives in Harbor." and "li ming
lives in harbor" match and Chinese is compared character by character. Each eval item (MC: question and
options; gen: prompt and references; code: prompt; ppl: a document) becomes the set of its n-grams of
`n` units (13 by default, as GPT-3's decontamination), or of `short_n` units (8) when it has fewer than
`n`; an item shorter than `short_n` is one gram of its whole text, found when it appears anywhere in a
training document (so a one-word item is very likely "contaminated": read short items' numbers with care).

Memory is bounded by the eval sets, not the training data: the eval n-grams are hashed (8-byte BLAKE2b)
into one table first, then the training documents stream past — text files through `lmforge.data`
readers, packed shards decoded one document (EOS to EOS) at a time — and only hits are recorded.

Reported per task: `contaminated_share` (items with any n-gram found in training), `mean_overlap` (mean over
items of the share of their n-grams found), the n used and the documents/n-grams scanned.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from ..core.errors import ConfigError, DataError
from .metrics import answer_tokens


def units(text: str) -> list[str]:
    """The normalised words (CJK: characters) n-grams are built from."""
    return answer_tokens(text, "zh")


def _hash(gram: Sequence[str]) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(gram).encode("utf-8"), digest_size=8).digest(), "little")


def ngram_hashes(tokens: Sequence[str], n: int) -> set[int]:
    """Hashes of every n-gram of `tokens` (the whole sequence as one gram when it is shorter than n)."""
    if not tokens:
        return set()
    if len(tokens) < n:
        return {_hash(tokens)}
    return {_hash(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass
class EvalGrams:
    """The n-gram hashes of one task's items, with which items hold each hash."""

    n: int
    short_n: int
    item_grams: list[set[int]] = field(default_factory=list)
    item_n: list[int] = field(default_factory=list)

    def add(self, text: str) -> None:
        tokens = units(text)
        size = self.n if len(tokens) >= self.n else min(self.short_n, len(tokens))
        self.item_grams.append(ngram_hashes(tokens, size) if size else set())
        self.item_n.append(size)


def _check(n: int, short_n: int) -> None:
    if n < 1 or short_n < 1 or short_n > n:
        raise ConfigError(f"contamination n={n}, short_n={short_n}: need 1 <= short_n <= n")


def training_texts(paths: Sequence[str | Path], tokenizer: Any = None, max_docs: int = 0) -> Iterator[str]:
    """Documents of the training data, streamed: packed-shard directories (a meta.json; needs the tokenizer
    they were made with) decoded document by document, anything else read with lmforge.data readers."""
    count = 0
    for raw in paths:
        path = Path(raw)
        if (path / "meta.json").is_file():
            docs: Iterable[str] = shard_documents(path, tokenizer)
        else:
            if not path.exists() and not any(ch in str(raw) for ch in "*?["):
                raise DataError(f"contamination.train: {path} not found")
            docs = _file_texts(str(raw))
        for text in docs:
            yield text
            count += 1
            if max_docs and count >= max_docs:
                return


def record_text(record: Any) -> str:
    """The text of one JSON record: its "text", else every string in it (messages, prompt/chosen, ...)."""
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(record_text(v) for v in record.values() if isinstance(v, (str, dict, list)))
    if isinstance(record, list):
        return "\n".join(record_text(v) for v in record)
    return ""


def _file_texts(raw: str) -> Iterator[str]:
    """Documents of text files: JSONL records of any layout (pretraining text, SFT conversations,
    preference pairs) through `record_text`; txt/parquet through lmforge.data readers."""
    from ..data.config import SourceConfig
    from ..data.readers import iter_json_objects, read_source, resolve_paths

    source = SourceConfig(path=raw)
    for path, kind in resolve_paths(source):
        if kind == "jsonl":
            yield from (record_text(record) for _, record in iter_json_objects(path))
        else:
            yield from (d.text for d in read_source(SourceConfig(path=str(path))))


def shard_documents(data_dir: Path, tokenizer: Any, splits: Sequence[str] = ("train",),
                    block: int = 1 << 20) -> Iterator[str]:
    """Every document of the given splits (the training split by default) of a packed data directory,
    decoded one at a time (cut at EOS)."""
    from ..data.loader import TokenShardDataset, check_tokenizer, read_meta

    if tokenizer is None:
        raise ConfigError(f"contamination.train={data_dir} holds token shards: decoding them needs the tokenizer "
                          "they were made with (the model's, or contamination.tokenizer)")
    meta = read_meta(data_dir)
    check_tokenizer(meta, tokenizer, data_dir)
    eos = int(meta["eos_id"])
    for split in [s for s in splits if s in meta.get("splits", {})]:
        dataset = TokenShardDataset(data_dir, split=split, seq_len=1)
        carry = np.empty(0, dtype=np.int64)
        for start in range(0, dataset.num_tokens, block):
            stop = min(start + block, dataset.num_tokens)
            tokens = np.concatenate([carry, dataset.tokens(start, stop).astype(np.int64)])
            begin = 0
            for end in np.flatnonzero(tokens == eos).tolist():
                if end > begin:
                    yield tokenizer.decode(tokens[begin:end].tolist())
                begin = end + 1
            carry = tokens[begin:]
        if len(carry):
            yield tokenizer.decode(carry.tolist())


def check_contamination(tasks: dict[str, Sequence[str]], train_paths: Sequence[str | Path], tokenizer: Any = None,
                        n: int = 13, short_n: int = 8, max_docs: int = 0) -> dict[str, dict[str, Any]]:
    """Per task (name -> item texts): contaminated_share, mean_overlap and counts (see the module docstring)."""
    _check(n, short_n)
    if not train_paths:
        raise ConfigError("contamination.train is empty: name the training text files or shard directories")
    grams = {name: EvalGrams(n, short_n) for name in tasks}
    for name, texts in tasks.items():
        for text in texts:
            grams[name].add(text)
    wanted: dict[int, set[int]] = {}  # size -> every eval hash of that size
    for g in grams.values():
        for hashes, size in zip(g.item_grams, g.item_n):
            wanted.setdefault(size, set()).update(hashes)
    found: set[int] = set()
    docs = scanned = 0
    for text in training_texts(train_paths, tokenizer, max_docs):
        docs += 1
        tokens = units(text)
        for size, pool in wanted.items():
            for i in range(max(len(tokens) - size + 1, 0)):
                scanned += 1
                h = _hash(tokens[i:i + size])
                if h in pool:
                    found.add(h)
    report = {}
    for name, g in grams.items():
        ratios = [len(h & found) / len(h) for h in g.item_grams if h]
        report[name] = {
            "contaminated_share": sum(r > 0 for r in ratios) / len(ratios) if ratios else float("nan"),
            "mean_overlap": sum(ratios) / len(ratios) if ratios else float("nan"),
            "num_items": len(g.item_grams), "n": n, "short_n": short_n,
            "short_items": sum(size != n for size in g.item_n),
            "train_documents": docs, "train_ngrams_scanned": scanned,
        }
    return report
