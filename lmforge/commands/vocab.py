"""Expand a model's vocabulary (扩充词表): add tokens, grow embeddings and head, write a new model directory.

    lmforge tokenizer sources='[{path: domain/}]' tokenizer.vocab_size=4096 output_dir=runs/domain_tok
    lmforge vocab --model base/ --from_tokenizer runs/domain_tok --limit 1000 --out runs/expanded
    lmforge data sources='[{path: domain/}]' tokenizer=runs/expanded output_dir=runs/domain_data
    lmforge pretrain data=runs/domain_data model.init_from=runs/expanded model.trainable=embeddings ...
    lmforge pretrain data=runs/domain_data model.init_from=<stage one>/model ...      # then everything

New rows start as the mean of the rows of the pieces the old tokenizer cut each token into, so the first
loss is close to the old model's; stage one (`model.trainable=embeddings`) lets them settle before the rest
of the network moves.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import opt
from ..core.errors import ConfigError


@dataclass
class Config:
    model: str = opt("", "model directory (HF layout, with its tokenizer)")
    out: str = opt("", "output directory: the grown model and its expanded tokenizer")
    tokens: list[str] = opt([], "tokens to add (comma-separated on the command line)")
    tokens_file: str = opt("", "a UTF-8 file with one token per line to add")
    from_tokenizer: str = opt("", "a tokenizer directory (e.g. trained on a domain corpus): add its tokens that "
                                  "the model's tokenizer lacks, most frequent merges first")
    limit: int = opt(0, "add at most this many tokens (0 = all)")
    special: bool = opt(False, "add them as special tokens (never split, skipped when decoding)")
    pad_to_multiple_of: int = opt(1, "round the new vocabulary size up to a multiple of this (e.g. 64)")
    overwrite: bool = opt(False, "replace an existing output directory")


def collect_tokens(cfg: Config, tokenizer) -> list[str]:
    """The configured tokens in order, duplicates dropped, at most `limit`."""
    from ..model.resize import new_tokens_from
    from ..tokenizer import Tokenizer

    tokens = list(cfg.tokens)
    if cfg.tokens_file:
        path = Path(cfg.tokens_file)
        if not path.is_file():
            raise ConfigError(f"tokens_file={path}: not found")
        tokens += [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if cfg.from_tokenizer:
        tokens += new_tokens_from(Tokenizer.from_pretrained(cfg.from_tokenizer), tokenizer)
    tokens = list(dict.fromkeys(tokens))
    return tokens[:cfg.limit] if cfg.limit else tokens


def run(cfg: Config) -> dict:
    from ..core.io import atomic_write_json
    from ..model import Transformer
    from ..model.resize import expand_vocabulary
    from ..tokenizer import Tokenizer

    if not cfg.model or not cfg.out:
        raise ConfigError("pass --model DIR and --out DIR")
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"{out} is not empty; pass overwrite=true to replace it")
    started = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(cfg.model)
    tokens = collect_tokens(cfg, tokenizer)
    if not tokens:
        raise ConfigError("no tokens to add: give tokens=, tokens_file= or from_tokenizer=")
    model = Transformer.from_pretrained(cfg.model)
    old_vocab = model.config.vocab_size
    ids = expand_vocabulary(model, tokenizer, tokens, special=cfg.special, pad_to_multiple_of=cfg.pad_to_multiple_of)
    tmp = out.with_name("." + out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {"stage": "vocab", "parent": str(cfg.model), "old_vocab_size": old_vocab,
              "new_vocab_size": model.config.vocab_size, "added": len(ids), "tokens": tokens[:50],
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(tmp / "lmforge.json", report)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"vocab: {old_vocab} -> {model.config.vocab_size} ids ({len(ids)} tokens added, rows initialised from "
          f"their sub-tokens) -> {out} in {time.perf_counter() - started:.1f}s")
    return report
