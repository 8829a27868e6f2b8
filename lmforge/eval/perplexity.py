"""Perplexity and bits-per-byte of a model on text files or on packed token shards.

The text becomes one token stream laid out as the shards are (DESIGN, Data): documents back to back, each
followed by EOS, with one EOS in front so the first document's first token is predicted too (lm-eval's
rolling log-likelihood conditions on a prefix token the same way). Text files and shards made from the
same documents therefore give the same numbers.

A stream longer than the model's window is scored with the strided sliding window of the Hugging Face
perplexity guide: windows of `max_length` tokens start every `stride` tokens, and each window scores only
the tokens the previous window did not, so every token is scored at most once and, with stride <
max_length, with at least `max_length - stride` tokens of context. With stride == max_length the windows
are independent chunks (fast, less context; each chunk's first token goes unscored, as in the guide).

Reported: nats per token, perplexity = exp(nats per token), and bits per byte = total nats / (ln 2 *
UTF-8 bytes of the text) — the tokenizer-independent number that compares models with different
vocabularies. EOS separators are predicted (the model must learn where documents end) but add no bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError, DataError
from ..data.config import SourceConfig
from ..data.loader import TokenShardDataset, check_tokenizer
from ..data.readers import read_source


class Window(NamedTuple):
    """Tokens [begin, end) go into the model; targets [first_target, end) are scored."""

    begin: int
    end: int
    first_target: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The HF perplexity guide's windows over a stream of `num_tokens` tokens (see the module docstring)."""
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} must be >= 2 (a window needs a context and a target)")
    if not 1 <= stride <= max_length:
        raise ConfigError(f"stride={stride} must be between 1 and max_length={max_length}")
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_target = max(previous_end, begin + 1)  # position `begin` has no context inside its window
        if end > first_target:
            windows.append(Window(begin, end, first_target))
        previous_end = end
        if end == num_tokens:
            break
    return windows


class TokenStream(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: slice) -> np.ndarray: ...


@dataclass
class PerplexityResult:
    """Totals of a perplexity run; the rates are derived from them."""

    nll: float            # summed negative log-likelihood, nats
    tokens: int           # tokens scored
    bytes: int | None     # UTF-8 bytes of the evaluated text (None when unknown: shards without a tokenizer)
    windows: int = 0

    @property
    def nats_per_token(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats_per_token) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / (math.log(2) * self.bytes) if self.bytes else None

    def to_dict(self) -> dict[str, Any]:
        return {"nats_per_token": self.nats_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "tokens": self.tokens, "bytes": self.bytes,
                "nll": self.nll, "windows": self.windows}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _default_max_length(model: nn.Module, max_length: int | None) -> int:
    if max_length is not None:
        return max_length
    config_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if config_length is None:
        raise ConfigError("max_length is required: the model's config has no max_position_embeddings")
    return int(config_length)


@torch.inference_mode()
def stream_nll(model: nn.Module, stream: TokenStream, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 4) -> PerplexityResult:
    """Summed NLL and token count of a token stream under strided sliding windows (bytes left None).

    Windows of equal length are batched; only the scored positions' logits are turned into losses."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    max_length = _default_max_length(model, max_length)
    stride = max_length if stride is None else stride
    windows = sliding_windows(len(stream), max_length, stride)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        index = 0
        while index < len(windows):
            length = windows[index].end - windows[index].begin
            group = [windows[index]]
            while (index + len(group) < len(windows) and len(group) < batch_size
                   and windows[index + len(group)].end - windows[index + len(group)].begin == length):
                group.append(windows[index + len(group)])
            index += len(group)
            batch = torch.from_numpy(np.stack([np.asarray(stream[w.begin:w.end], dtype=np.int64) for w in group]))
            logits = model(batch.to(device))
            for row, w in enumerate(group):
                first = w.first_target - w.begin  # window-relative position of the first scored target
                targets = batch[row, first:].to(logits.device)
                nll += float(F.cross_entropy(logits[row, first - 1:-1].float(), targets, reduction="sum"))
                tokens += len(targets)
    finally:
        model.train(was_training)
    return PerplexityResult(nll=nll, tokens=tokens, bytes=None, windows=len(windows))


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if not isinstance(eos, int):
        raise ConfigError("perplexity needs a tokenizer with an EOS token: documents are separated by EOS")
    return eos


def texts_to_stream(tokenizer: Any, texts: Iterable[str]) -> tuple[np.ndarray, int]:
    """(EOS, doc1, EOS, doc2, EOS, ...) as int64 ids, and the texts' total UTF-8 bytes."""
    eos = _eos_id(tokenizer)
    pieces, num_bytes = [np.array([eos], dtype=np.int64)], 0
    for text in texts:
        pieces.append(np.asarray(tokenizer.encode(text) + [eos], dtype=np.int64))
        num_bytes += len(text.encode("utf-8"))
    return np.concatenate(pieces), num_bytes


def _check_ids_fit(model: nn.Module, max_id: int, where: str) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and max_id >= vocab:
        raise DataError(f"{where} holds token id {max_id}, but the model's vocabulary has {vocab} ids: "
                        "was the data made with another tokenizer?")


def perplexity_of_texts(model: nn.Module, tokenizer: Any, texts: Iterable[str], max_length: int | None = None,
                        stride: int | None = None, batch_size: int = 4) -> PerplexityResult:
    """Perplexity and bits per byte of `texts` (each one document)."""
    stream, num_bytes = texts_to_stream(tokenizer, texts)
    _check_ids_fit(model, int(stream.max()), "the tokenized text")
    result = stream_nll(model, stream, max_length, stride, batch_size)
    result.bytes = num_bytes
    return result


def perplexity_of_files(model: nn.Module, tokenizer: Any, paths: Sequence[str | Path | SourceConfig],
                        max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                        text_field: str = "text", txt_mode: str = "line") -> PerplexityResult:
    """Perplexity of txt / jsonl / parquet files, directories or globs, read with lmforge.data.readers.

    A path given as a string uses `text_field` and `txt_mode` (one document per line by default); pass a
    SourceConfig for per-source settings. A malformed line raises DataError naming file and line."""
    sources = [p if isinstance(p, SourceConfig) else SourceConfig(path=str(p), text_field=text_field,
                                                                  txt_mode=txt_mode) for p in paths]
    texts = (doc.text for source in sources for doc in read_source(source))
    return perplexity_of_texts(model, tokenizer, texts, max_length, stride, batch_size)


class ShardStream:
    """A packed split read as (EOS, stored tokens...), sliced lazily from the memory-mapped shards."""

    def __init__(self, dataset: TokenShardDataset, eos_id: int, max_tokens: int | None = None) -> None:
        self.dataset, self.eos_id = dataset, eos_id
        stored = dataset.num_tokens if max_tokens is None else min(max_tokens, dataset.num_tokens)
        self.stored = stored

    def __len__(self) -> int:
        return self.stored + 1 if self.stored else 0

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        if stop <= start:
            return np.empty(0, dtype=np.int64)
        body = self.dataset.tokens(max(start, 1) - 1, stop - 1).astype(np.int64) if stop > 1 else np.empty(0, np.int64)
        return np.concatenate([[self.eos_id], body]) if start == 0 else body


def shard_text_bytes(dataset: TokenShardDataset, tokenizer: Any, eos_id: int, num_tokens: int,
                     block: int = 1 << 20) -> int:
    """UTF-8 bytes of the text in the first `num_tokens` stored tokens, decoded one document at a time.

    Documents are cut at EOS, so a decode never splits a character; only a document cut by `num_tokens`
    may lose or gain a byte or two at its end."""
    total, carry = 0, np.empty(0, dtype=np.int64)
    for start in range(0, num_tokens, block):
        tokens = np.concatenate([carry, dataset.tokens(start, min(start + block, num_tokens)).astype(np.int64)])
        ends = np.flatnonzero(tokens == eos_id)
        begin = 0
        for end in ends.tolist():
            if end > begin:
                total += len(tokenizer.decode(tokens[begin:end].tolist()).encode("utf-8"))
            begin = end + 1
        carry = tokens[begin:]
    if len(carry):
        total += len(tokenizer.decode(carry.tolist()).encode("utf-8"))
    return total


def perplexity_of_shards(model: nn.Module, data_dir: str | Path, split: str = "val", tokenizer: Any = None,
                         max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
                         max_tokens: int | None = None) -> PerplexityResult:
    """Perplexity of a packed split (`lmforge data` output); bits per byte only when a tokenizer is given
    (it must be the one the shards were made with: checked against meta.json)."""
    dataset = TokenShardDataset(data_dir, split=split, seq_len=1)
    eos = int(dataset.meta["eos_id"])
    if tokenizer is not None:
        check_tokenizer(dataset.meta, tokenizer, data_dir)
    _check_ids_fit(model, int(dataset.meta["vocab_size"]) - 1, f"{data_dir} (vocab_size in meta.json)")
    stream = ShardStream(dataset, eos, max_tokens)
    if len(stream) < 2:
        raise DataError(f"{data_dir}: split {split!r} holds no tokens to score")
    result = stream_nll(model, stream, max_length, stride, batch_size)
    if tokenizer is not None:
        result.bytes = shard_text_bytes(dataset, tokenizer, eos, stream.stored)
    return result
