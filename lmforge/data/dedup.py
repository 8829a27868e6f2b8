"""Exact and near-duplicate removal: a 64-bit digest set, and MinHash-LSH on character shingles.

MinHash is vectorised with numpy: a chunk's shingles are hashed once (a rolling hash over code points),
then `num_perm` universal hashes h(x) = (a*x + b) mod p with the Mersenne prime p = 2^31 - 1 map them,
and a segmented minimum gives every document's signature. LSH splits a signature into `bands` of `rows`
values; documents sharing any band's bucket are candidates, confirmed (with `verify`) by the fraction of
equal signature values, an unbiased estimate of their shingle Jaccard similarity. Character shingles make
this work for Chinese, which has no spaces between words. Everything is seeded, so runs repeat exactly.

Memory: the exact set keeps ~70 bytes per kept document; MinHash keeps one dict entry per band (~100
bytes each) plus, with `verify`, a 4*num_perm-byte signature per kept document.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Sequence

import numpy as np

from .config import DedupConfig

MERSENNE_PRIME = (1 << 31) - 1
_P = np.uint64(MERSENNE_PRIME)
_ROLL = np.uint64(0x100000001B3)  # FNV-1 64-bit prime: the base of the rolling n-gram hash
_BLOCK_SHINGLES = 2048  # shingles per (num_perm x block) matrix: ~2 MB temporaries at 128 perms


def codepoints(text: str) -> np.ndarray:
    """The Unicode code points of `text` as a uint32 array (one entry per character)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: spreads every input bit over the whole 64-bit output (uint64 wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def ngram_hashes(values: np.ndarray, n: int, mix: bool = True) -> np.ndarray:
    """A 64-bit hash of every length-n window of an integer array (len(values) - n + 1 of them).

    `mix=False` skips the final bit mixing: enough when the hashes are only compared for equality.
    """
    x = values.astype(np.uint64, copy=False)
    count = len(x) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    h = x[:count].copy()
    for j in range(1, n):
        h = h * _ROLL + x[j:j + count]
    return _mix64(h) if mix else h


def normalize_for_dedup(text: str) -> str:
    """Lower-cased text with whitespace runs collapsed: formatting alone does not make a document new."""
    return " ".join(text.lower().split())


def exact_key(text: str) -> int:
    """A 64-bit digest of the normalised text (collisions: ~1 in 10^19 per pair, i.e. none in practice)."""
    digest = hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class MinHasher:
    """MinHash signatures of texts over their character shingles (`shingle_size` characters)."""

    def __init__(self, num_perm: int = 128, shingle_size: int = 5, seed: int = 0) -> None:
        self.num_perm = num_perm
        self.shingle_size = shingle_size
        rng = np.random.default_rng([seed, 0x5EED])
        self.a = rng.integers(1, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, MERSENNE_PRIME, size=num_perm, dtype=np.uint64)

    def shingles(self, text: str) -> set[str]:
        """The shingle set of one text (a reference for tests and for exact Jaccard)."""
        t = self._pad(normalize_for_dedup(text))
        k = self.shingle_size
        return {t[i:i + k] for i in range(len(t) - k + 1)}

    def _pad(self, text: str) -> str:
        # a text shorter than one shingle still gets exactly one shingle, so every document has a signature
        return text + "\0" * (self.shingle_size - len(text)) if len(text) < self.shingle_size else text

    def shingle_hashes(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(31-bit hash of every shingle of every text, start offset of each text's shingles)."""
        k = self.shingle_size
        padded = [self._pad(normalize_for_dedup(t)) for t in texts]
        lengths = np.fromiter(map(len, padded), dtype=np.int64, count=len(padded))
        window_hash = ngram_hashes(codepoints("".join(padded)), k)
        counts = lengths - k + 1
        text_starts = np.cumsum(lengths) - lengths
        offsets = np.cumsum(counts) - counts
        # keep only windows that lie inside one text (never across the join of two texts)
        index = np.arange(int(counts.sum())) + np.repeat(text_starts - offsets, counts)
        return (window_hash[index] >> np.uint64(33)) % _P, offsets

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures, uint32 [len(texts), num_perm]; equal fraction estimates Jaccard similarity."""
        sig = np.full((self.num_perm, len(texts)), MERSENNE_PRIME, dtype=np.uint32)
        if not texts:
            return sig.T
        values, offsets = self.shingle_hashes(texts)
        total = len(values)
        # [num_perm, shingles] layout: a segmented min along the last (contiguous) axis is ~10x faster
        buffer = np.empty((self.num_perm, min(total, _BLOCK_SHINGLES)), dtype=np.uint64)
        quotient = np.empty_like(buffer)
        for start in range(0, total, _BLOCK_SHINGLES):
            stop = min(total, start + _BLOCK_SHINGLES)
            block, q = buffer[:, : stop - start], quotient[:, : stop - start]
            np.multiply(self.a[:, None], values[None, start:stop], out=block)
            block += self.b[:, None]
            # y mod p as y - (y // p) * p: numpy divides by a scalar with libdivide, ~3x faster than `%`
            np.floor_divide(block, _P, out=q)
            q *= _P
            block -= q
            first = int(np.searchsorted(offsets, start, side="right")) - 1
            last = int(np.searchsorted(offsets, stop - 1, side="right")) - 1
            local = np.maximum(offsets[first:last + 1], start) - start
            part = np.minimum.reduceat(block, local, axis=1)
            np.minimum(sig[:, first:last + 1], part, out=sig[:, first:last + 1], casting="unsafe")
        return np.ascontiguousarray(sig.T)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal MinHash values: an unbiased estimate of the shingle Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * np.diff(x)).sum(axis=-1)


def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising the summed false-positive and false-negative areas of the LSH S-curve."""
    below = np.linspace(0.0, threshold, 101)
    above = np.linspace(threshold, 1.0, 101)
    best, best_error = (1, num_perm), np.inf
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        false_pos = _trapezoid(1 - (1 - below[None, :] ** rows) ** bands, below)
        false_neg = _trapezoid((1 - above[None, :] ** rows) ** bands, above)
        error = false_pos + false_neg
        i = int(np.argmin(error))
        if error[i] < best_error:
            best, best_error = (bands, int(rows[i, 0])), float(error[i])
    return best


class Deduplicator:
    """Streaming dedup over chunks of documents: keeps each document's first occurrence, counts the rest."""

    def __init__(self, cfg: DedupConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or DedupConfig()
        self.seen = 0
        self.kept = 0
        self.exact_removed: Counter[str] = Counter()
        self.near_removed: Counter[str] = Counter()
        self.rejected_candidates = 0
        self._exact_keys: set[int] = set()
        self.hasher: MinHasher | None = None
        if self.cfg.minhash:
            c = self.cfg
            self.bands, self.rows = (c.bands, c.rows) if c.bands else optimal_bands(c.threshold, c.num_perm)
            self.hasher = MinHasher(c.num_perm, c.shingle_size, seed)
            self._band_mult = np.random.default_rng([seed, 0xBA4D]).integers(
                1, 2**63, size=self.rows, dtype=np.uint64) | np.uint64(1)
            self._tables: list[dict[int, int]] = [{} for _ in range(self.bands)]
            self._stored = np.empty((1024 if c.verify else 0, c.num_perm), dtype=np.uint32)
            self._num_stored = 0

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One 64-bit bucket key per (document, band): [n, bands] uint64."""
        rows = sig[:, : self.bands * self.rows].reshape(len(sig), self.bands, self.rows).astype(np.uint64)
        return _mix64((rows * self._band_mult).sum(axis=2, dtype=np.uint64))

    def _store(self, signature: np.ndarray) -> int:
        if not self.cfg.verify:
            self._num_stored += 1
            return self._num_stored - 1
        if self._num_stored == len(self._stored):
            grown = np.empty((2 * len(self._stored), self._stored.shape[1]), dtype=np.uint32)
            grown[: self._num_stored] = self._stored
            self._stored = grown
        self._stored[self._num_stored] = signature
        self._num_stored += 1
        return self._num_stored - 1

    def _near_duplicate(self, signature: np.ndarray, keys: list[int]) -> bool:
        candidates = {j for table, key in zip(self._tables, keys) if (j := table.get(key)) is not None}
        if not candidates:
            return False
        if not self.cfg.verify:
            return True
        for j in candidates:
            if estimate_jaccard(signature, self._stored[j]) >= self.cfg.threshold:
                return True
        self.rejected_candidates += 1
        return False

    def filter(self, docs: list) -> list:
        """The documents (anything with .text and .source) that are not duplicates of earlier ones."""
        self.seen += len(docs)
        survivors = []
        for doc in docs:
            if self.cfg.exact:
                key = exact_key(doc.text)
                if key in self._exact_keys:
                    self.exact_removed[doc.source] += 1
                    continue
                self._exact_keys.add(key)
            survivors.append(doc)
        if self.hasher is None or not survivors:
            self.kept += len(survivors)
            return survivors
        signatures = self.hasher.signatures([d.text for d in survivors])
        all_keys = self.band_keys(signatures).tolist()
        kept = []
        for doc, signature, keys in zip(survivors, signatures, all_keys):
            if self._near_duplicate(signature, keys):
                self.near_removed[doc.source] += 1
                continue
            index = self._store(signature)
            for table, key in zip(self._tables, keys):
                table.setdefault(key, index)
            kept.append(doc)
        self.kept += len(kept)
        return kept

    def stats(self) -> dict:
        """Counts of documents seen, kept and removed (exact / near, in total and per source)."""
        c = self.cfg
        out = {
            "seen": self.seen, "kept": self.kept,
            "exact": {"enabled": c.exact, "removed": sum(self.exact_removed.values()),
                      "removed_by_source": dict(self.exact_removed)},
            "minhash": {"enabled": c.minhash, "removed": sum(self.near_removed.values()),
                        "removed_by_source": dict(self.near_removed)},
        }
        if self.hasher is not None:
            out["minhash"].update(num_perm=c.num_perm, bands=self.bands, rows=self.rows, threshold=c.threshold,
                                  shingle_size=c.shingle_size, verify=c.verify,
                                  candidates_rejected_by_verify=self.rejected_candidates)
        return out
