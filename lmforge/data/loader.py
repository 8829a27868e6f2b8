"""Batches of (input_ids, labels) from packed token shards, shuffled per epoch, sliced per rank, resumable.

A split's shards are memory-mapped and read as one token stream, cut into non-overlapping windows of
`seq_len + 1` tokens (inputs are a window's first `seq_len` tokens, labels the last `seq_len`). Each
epoch visits the windows in a permutation drawn from (seed, epoch). With data parallelism a global batch
is `batch_size * world_size` consecutive windows of that order and rank r takes its r-th slice, so the
ranks' batches together are exactly the one-process batch of the global size. The position is counted
in global batches: `state_dict()` / `load_state_dict()` resume with identical batches.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..core.errors import ConfigError, DataError
from .pack import FORMAT, SPLITS


def read_meta(data_dir: str | Path) -> dict:
    """meta.json of a packed dataset; DataError naming the path when it is missing, partial or foreign."""
    root = Path(data_dir)
    path = root / "meta.json"
    if not root.is_dir():
        raise DataError(f"dataset directory not found: {root} (build it with `lmforge data`)")
    if not path.is_file():
        leftovers = sorted(p.name for p in root.glob("*.bin*"))
        why = ("its build was interrupted (shards but no meta.json); rerun `lmforge data`" if leftovers
               else "not a dataset built by `lmforge data`")
        raise DataError(f"{path} is missing: {why}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an lmforge token-shard manifest (format != {FORMAT!r})")
    return meta


def check_tokenizer(meta: dict, tokenizer: Any, data_dir: str | Path = "") -> None:
    """DataError when `tokenizer` is not the one the shards were made with (fingerprint, vocab, EOS)."""
    made_with = meta.get("tokenizer", {})
    fingerprint = tokenizer.fingerprint() if hasattr(tokenizer, "fingerprint") else None
    vocab_size = tokenizer.vocab_size() if callable(tokenizer.vocab_size) else tokenizer.vocab_size
    if fingerprint and made_with.get("fingerprint") and fingerprint != made_with["fingerprint"]:
        raise DataError(f"{data_dir}: shards were tokenized with tokenizer {made_with['fingerprint']}, "
                        f"but the given tokenizer is {fingerprint}; rebuild the data or use that tokenizer")
    if int(vocab_size) != meta["vocab_size"] or int(tokenizer.eos_id) != meta["eos_id"]:
        raise DataError(f"{data_dir}: shards have vocab_size={meta['vocab_size']}, eos_id={meta['eos_id']}; "
                        f"the given tokenizer has vocab_size={vocab_size}, eos_id={tokenizer.eos_id}")


class TokenShardDataset:
    """One split's shards as a single memory-mapped token stream, indexed by window."""

    def __init__(self, data_dir: str | Path, split: str = "train", seq_len: int = 256) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split={split!r} is not one of {list(SPLITS)}")
        if seq_len < 1:
            raise ConfigError(f"seq_len={seq_len} must be >= 1")
        self.data_dir = Path(data_dir)
        self.meta = read_meta(self.data_dir)
        self.split, self.seq_len = split, seq_len
        dtype = np.dtype(self.meta["dtype"])
        self.shards: list[np.ndarray] = []
        for shard in self.meta["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            expected = shard["tokens"] * dtype.itemsize
            if not path.is_file() or path.stat().st_size != expected:
                found = path.stat().st_size if path.is_file() else "missing"
                raise DataError(f"{path}: expected {expected} bytes per meta.json, found {found}; "
                                "the dataset is incomplete or was modified, rebuild it")
            if shard["tokens"]:
                self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self.num_tokens = int(self._starts[-1])
        self.window_tokens = seq_len + 1
        self.num_windows = self.num_tokens // self.window_tokens

    def __len__(self) -> int:
        return self.num_windows

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream, crossing shard boundaries when needed."""
        pieces = []
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            offset = start - int(self._starts[shard])
            take = min(stop - start, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset:offset + take])
            start += take
            shard += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def __getitem__(self, index: int) -> np.ndarray:
        """Window `index`: seq_len + 1 tokens as int64."""
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        start = index * self.window_tokens
        return self.tokens(start, start + self.window_tokens).astype(np.int64)

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), int64 [len(indices), seq_len]: labels are the inputs shifted by one."""
        windows = np.stack([self[int(i)] for i in indices]) if len(indices) else (
            np.empty((0, self.window_tokens), dtype=np.int64))
        return (torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),
                torch.from_numpy(np.ascontiguousarray(windows[:, 1:])))


class ShardLoader:
    """Shuffled, rank-sliced, exactly resumable batches over a split; iterating gives one epoch.

    `drop_last=False` fills the last global batch by wrapping to the start of the epoch's order, so
    every window is seen each epoch and every batch (on every rank) has the same shape.
    """

    def __init__(self, data_dir: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 tokenizer: Any = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        self.dataset = TokenShardDataset(data_dir, split, seq_len)
        if tokenizer is not None:
            check_tokenizer(self.dataset.meta, tokenizer, data_dir)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch_size = batch_size * world_size
        if len(self) == 0:
            raise DataError(f"{data_dir} ({split}): {self.windows_per_epoch} windows of {seq_len + 1} tokens, "
                            f"fewer than one global batch of {self.global_batch_size}; lower batch_size or "
                            "seq_len, or add data")
        self.epoch = 0
        self.position = 0  # global batches of this epoch already yielded
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def windows_per_epoch(self) -> int:
        return self.dataset.num_windows

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        n = self.windows_per_epoch / self.global_batch_size
        return int(n) if self.drop_last else math.ceil(n)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window order of an epoch: a permutation drawn from (seed, epoch)."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.windows_per_epoch)
            self._order_epoch = epoch
        return self._order

    def global_batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """Window indices of global batch `index` of `epoch` (all ranks' windows, rank 0 first)."""
        order = self.epoch_order(epoch)
        chosen = order[index * self.global_batch_size:(index + 1) * self.global_batch_size]
        short = self.global_batch_size - len(chosen)
        return np.concatenate([chosen, np.resize(order, short)]) if short else chosen

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The rest of the current epoch, as this rank's (input_ids, labels); then the next epoch begins."""
        while self.position < len(self):
            windows = self.global_batch_indices(self.epoch, self.position)
            mine = windows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            self.position += 1
            yield self.dataset.batch(mine)
        self.epoch += 1
        self.position = 0

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless stream of batches across epochs (for step-counted training)."""
        while True:
            yield from self

    def state_dict(self) -> dict:
        """Where the loader stands (JSON-safe): enough to continue with identical batches."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, "windows_per_epoch": self.windows_per_epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; the data, seed and seq_len must match, the global batch may be regrouped."""
        expected = {"seed": self.seed, "seq_len": self.seq_len, "windows_per_epoch": self.windows_per_epoch}
        for key, mine in expected.items():
            if state.get(key) != mine:
                raise DataError(f"loader state has {key}={state.get(key)!r} but this loader has {mine!r}: "
                                "resuming would not reproduce the same batches")
        windows_done = state["position"] * state["global_batch_size"]
        if windows_done % self.global_batch_size:
            raise DataError(f"loader state is {windows_done} windows into epoch {state['epoch']}, not a multiple "
                            f"of this run's global batch {self.global_batch_size}; resume with the same "
                            "batch_size * world_size")
        self.epoch = int(state["epoch"])
        self.position = windows_done // self.global_batch_size


def iter_eval_batches(data_dir: str | Path, batch_size: int, seq_len: int, split: str = "val", rank: int = 0,
                      world_size: int = 1, max_batches: int | None = None,
                      tokenizer: Any = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A deterministic pass over a split in window order (rank r takes windows r, r + world_size, ...).

    The last batch may be smaller. Use it for validation loss: every rank sees a disjoint share.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
    dataset = TokenShardDataset(data_dir, split, seq_len)
    if tokenizer is not None:
        check_tokenizer(dataset.meta, tokenizer, data_dir)
    if dataset.num_windows == 0:
        raise DataError(f"{data_dir} ({split}): {dataset.num_tokens} tokens, not one window of {seq_len + 1}; "
                        "raise data.val_fraction or lower seq_len")
    mine = np.arange(rank, dataset.num_windows, world_size)
    for n, start in enumerate(range(0, len(mine), batch_size)):
        if max_batches is not None and n >= max_batches:
            return
        yield dataset.batch(mine[start:start + batch_size])
