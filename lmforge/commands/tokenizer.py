"""Train a tokenizer on text sources and save it as an HF tokenizer directory.

    lmforge tokenizer sources='[{path: corpus/train}]' tokenizer.vocab_size=8192 output_dir=runs/tok
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..core.errors import ConfigError
from ..data.config import SourceConfig
from ..data.readers import iter_texts
from ..tokenizer import TokenizerConfig, train_tokenizer


@dataclass
class Config:
    sources: list[SourceConfig] = opt([], "text sources: list of {path, format, text_field, ...} (as in `lmforge data`)")
    tokenizer: TokenizerConfig = opt(TokenizerConfig, "tokenizer kind, vocabulary size, special tokens, chat template")
    output_dir: str = opt("runs/tokenizer", "where tokenizer.json, tokenizer_config.json, ... are written")
    max_docs: int = opt(0, "train on at most this many documents (0 = all)")
    on_error: str = opt("raise", "bad input lines: raise | skip")
    overwrite: bool = opt(False, "replace a tokenizer already in output_dir")


def run(cfg: Config):
    if not cfg.sources:
        raise ConfigError("sources is empty: give at least one {path: ...}")
    out = Path(cfg.output_dir)
    if (out / "tokenizer.json").exists() and not cfg.overwrite:
        raise ConfigError(f"{out} already holds a tokenizer; pass overwrite=true to replace it")
    texts = iter_texts(cfg.sources, cfg.on_error)
    if cfg.max_docs:
        texts = itertools.islice(texts, cfg.max_docs)
    started = time.perf_counter()
    tok = train_tokenizer(texts, cfg.tokenizer)
    tok.save_pretrained(out)
    print(f"tokenizer: {cfg.tokenizer.kind} vocab={tok.vocab_size} trained in {time.perf_counter() - started:.1f}s "
          f"-> {out}")
    return tok
