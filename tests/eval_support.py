"""Shared helpers of the eval tests: a tiny tokenizer, tiny saved models and the small synthetic task sets."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

SMALL_WORLD = dict(num_people=30, num_cities=8, num_countries=3, num_companies=8, num_held_out_people=6)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """Byte-level BPE (vocab 600) over English and Chinese synthetic text, with the ChatML template."""
    from lmforge.data.synthetic import generate_corpus
    from lmforge.tokenizer import TokenizerConfig, train_tokenizer

    texts = [doc["text"] for doc in generate_corpus(seed=0, num_docs=200)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


def tiny_model(seed: int = 0, vocab_size: int | None = None, max_len: int = 256):
    from lmforge.model import ModelConfig, Transformer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size or tok.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=max_len, bos_token_id=tok.bos_id,
                         eos_token_id=tok.eos_id)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger than the default init, so predictions differ between items
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


def save_model(path: Path, model=None, seed: int = 0) -> Path:
    """A tiny model + the tiny tokenizer saved as an HF directory."""
    model = model if model is not None else tiny_model(seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_small_tasks(path: Path, seed: int = 0) -> Path:
    from lmforge.data.synthetic import make_world, write_tasks

    write_tasks(path, seed=seed, world=make_world(seed, **SMALL_WORLD))
    return path
