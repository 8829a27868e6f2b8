"""Vocabulary expansion (扩充词表): add tokens to a tokenizer and grow the model's embedding and head to match.

```python
from lmforge.model.resize import expand_vocabulary, new_tokens_from
tokens = new_tokens_from(domain_tokenizer, tokenizer, limit=2000)   # what a domain tokenizer knows that we don't
ids = expand_vocabulary(model, tokenizer, tokens)                   # tokenizer and model changed in place
```

A new token's embedding (and head row) starts as the mean of the rows of the sub-tokens the *old* tokenizer
split it into, so the grown model gives the new token roughly the meaning its pieces had and its loss starts
where the old model's was instead of at a random row's. Resizing keeps every existing row bit-identical.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError


def new_tokens_from(source: Any, target: Any, limit: int | None = None) -> list[str]:
    """Tokens of `source` (an lmforge Tokenizer, e.g. trained on a domain corpus) that `target` lacks,
    decoded to text, in source id order (for BPE: the most frequent merges first), at most `limit`.

    Only tokens that decode to valid, non-empty, non-special text qualify; a byte-level piece that is half a
    UTF-8 character cannot be added as text."""
    known = set(target.backend.get_vocab())
    specials = {t for t in (source.bos_token, source.eos_token, source.pad_token, source.unk_token) if t}
    out: list[str] = []
    seen: set[str] = set()
    for token_id in range(source.vocab_size):
        piece = source.backend.id_to_token(token_id)
        if piece is None or piece in specials or piece in known:
            continue
        text = source.decode([token_id], skip_special_tokens=False)
        if not text.strip() or "\ufffd" in text or text in seen:
            continue
        if len(target.encode(text)) < 2:  # already one token in the target under another spelling
            continue
        seen.add(text)
        out.append(text)
        if limit is not None and len(out) >= limit:
            break
    return out


def _grown(old: torch.Tensor, new_rows: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.cat([old.detach(), new_rows.to(old.dtype)], dim=0),
                        requires_grad=old.requires_grad)


def resize_token_embeddings(model: nn.Module, new_rows_init: Sequence[Sequence[int]] | int,
                            pad_to_multiple_of: int = 1) -> int:
    """Append rows to embed_tokens and lm_head (tied or not); returns the new vocab size.

    `new_rows_init`: for each new row, the existing ids whose mean initialises it (an empty list = the mean
    of the whole table, the safe default for a token with no pieces); or an int = that many rows, each the
    mean of the table. Rows added only to reach `pad_to_multiple_of` (faster matmuls) get the table mean."""
    config = model.config
    embed: nn.Embedding = model.model.embed_tokens
    head = model.lm_head
    old_vocab = embed.weight.shape[0]
    sources = [[] for _ in range(new_rows_init)] if isinstance(new_rows_init, int) else [list(s) for s in new_rows_init]
    wanted = old_vocab + len(sources)
    if pad_to_multiple_of > 1:
        wanted = -(-wanted // pad_to_multiple_of) * pad_to_multiple_of
    sources += [[] for _ in range(wanted - old_vocab - len(sources))]
    if not sources:
        return old_vocab
    for ids in sources:
        bad = [i for i in ids if not 0 <= i < old_vocab]
        if bad:
            raise ConfigError(f"sub-token ids {bad} are outside the current vocabulary (size {old_vocab})")

    def rows_for(weight: torch.Tensor) -> torch.Tensor:
        table_mean = weight.detach().float().mean(0)
        rows = [weight.detach().float()[ids].mean(0) if ids else table_mean for ids in sources]
        return torch.stack(rows)

    with torch.no_grad():
        embed.weight = _grown(embed.weight, rows_for(embed.weight))
        embed.num_embeddings = wanted
        if config.tie_word_embeddings:
            head.weight = embed.weight
        else:
            head.weight = _grown(head.weight, rows_for(head.weight))
        head.out_features = wanted
    config.vocab_size = wanted
    return wanted


def expand_vocabulary(model: nn.Module, tokenizer: Any, tokens: Sequence[str], special: bool = False,
                      pad_to_multiple_of: int = 1) -> list[int]:
    """Add `tokens` to `tokenizer` and grow `model` to match, each new row the mean of its old sub-tokens'
    rows; returns the new tokens' ids. Both are changed in place; tokens already known are skipped."""
    if model.model.embed_tokens.weight.shape[0] < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.model.embed_tokens.weight.shape[0]}) is smaller than the "
                          f"tokenizer's ({tokenizer.vocab_size}): they do not belong together")
    fresh = [t for t in dict.fromkeys(tokens) if t and tokenizer.token_to_id(t) is None]
    pieces = {t: tokenizer.encode(t) for t in fresh}  # split by the *old* vocabulary, before adding
    added = tokenizer.add_tokens(fresh, special=special)
    if added != len(fresh):
        raise ConfigError(f"the tokenizer added {added} of {len(fresh)} new tokens")
    ids = [tokenizer.token_to_id(t) for t in fresh]
    old_vocab = model.model.embed_tokens.weight.shape[0]
    # Tokens land at ids >= the tokenizer's old size; rows between it and the model's size (padding) stay.
    need = max(ids, default=old_vocab - 1) + 1 - old_vocab
    init = [[] for _ in range(max(need, 0))]
    for token, token_id in zip(fresh, ids):
        if token_id >= old_vocab:
            init[token_id - old_vocab] = pieces[token]
        else:  # the token took a padding row: initialise it in place
            with torch.no_grad():
                for weight in {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                    weight[token_id] = weight[pieces[token]].float().mean(0).to(weight.dtype)
    resize_token_embeddings(model, init, pad_to_multiple_of)
    return ids


def freeze_all_but_embeddings(model: nn.Module) -> list[str]:
    """Stage one of vocabulary expansion: only the embedding table and the output head train (the new rows
    settle in before the rest of the network moves); returns the names left trainable."""
    keep = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(id(param) in keep)
        if id(param) in keep:
            names.append(name)
    return names
