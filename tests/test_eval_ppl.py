"""Perplexity: sliding windows as in the HF guide, hand-computed chunk losses, a uniform model's PPL equal
to its vocabulary size, bits per byte, and text files agreeing with the shards packed from them."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.pack import pack_documents
from lmforge.data.readers import Document
from lmforge.data.synthetic import generate_corpus
from lmforge.eval.perplexity import (PerplexityResult, Window, perplexity_of_files, perplexity_of_shards,
                                     perplexity_of_texts, sliding_windows, stream_nll)
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import TokenizerConfig, train_tokenizer

DOCS = [doc["text"] for doc in generate_corpus(seed=1, num_docs=8)]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [doc["text"] for doc in generate_corpus(seed=0, num_docs=200)]
    return train_tokenizer(texts, TokenizerConfig(vocab_size=600, min_frequency=2))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=64)
    return Transformer(config).eval()


class Uniform(nn.Module):
    """Logits all zero: every token has probability 1/V."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab_size)


def test_windows_score_every_token_once():
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    # stride == max_length: independent chunks, each chunk's first token has no context and is skipped
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    for n, m, s in [(37, 8, 3), (37, 8, 8), (5, 16, 4), (64, 16, 1)]:
        scored = [t for w in sliding_windows(n, m, s) for t in range(w.first_target, w.end)]
        assert len(scored) == len(set(scored))  # never twice
        if s < m:
            assert scored == list(range(1, n))  # every token after the first


def test_stride_equal_to_max_length_is_the_sum_of_chunk_losses(model):
    stream = np.random.default_rng(0).integers(0, model.config.vocab_size, size=50)
    result = stream_nll(model, stream, max_length=16, stride=16, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 50, 16):
            chunk = torch.tensor(stream[start:start + 16])[None]
            nll += float(F.cross_entropy(model(chunk[:, :-1])[0], chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    assert result.tokens == count == 50 - 4
    assert result.nll == pytest.approx(nll, rel=1e-5)


def test_overlapping_windows_match_the_hf_guide_loop(model):
    stream = torch.from_numpy(np.random.default_rng(1).integers(0, model.config.vocab_size, size=45))
    max_length, stride = 16, 6
    nll, count, previous_end = 0.0, 0, 0
    with torch.no_grad():  # the guide: labels of already-scored tokens set to -100, the model shifts by one
        for begin in range(0, len(stream), stride):
            end = min(begin + max_length, len(stream))
            input_ids = stream[begin:end][None]
            labels = input_ids.clone()
            labels[:, :-(end - previous_end)] = -100
            logits = model(input_ids)
            nll += float(F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
            previous_end = end
            if end == len(stream):
                break
    for batch_size in (1, 3):
        result = stream_nll(model, stream.numpy(), max_length=max_length, stride=stride, batch_size=batch_size)
        assert result.tokens == count == len(stream) - 1
        assert result.nll == pytest.approx(nll, rel=1e-5)


def test_uniform_model_has_perplexity_equal_to_its_vocabulary(tokenizer):
    vocab = tokenizer.vocab_size
    texts = ["hello world", "你好，世界"]
    result = perplexity_of_texts(Uniform(vocab), tokenizer, texts, max_length=8, stride=3)
    assert result.tokens == sum(len(tokenizer.encode(t)) + 1 for t in texts)  # every token and each closing EOS
    assert result.perplexity == pytest.approx(vocab)
    assert result.bytes == 11 + 15  # "你好，世界": five 3-byte characters
    assert result.bits_per_byte == pytest.approx(result.tokens * math.log2(vocab) / 26)


def test_bits_per_byte_formula():
    result = PerplexityResult(nll=20 * math.log(2), tokens=8, bytes=10)
    assert result.bits_per_byte == pytest.approx(2.0)  # 20 bits over 10 bytes
    assert result.nats_per_token == pytest.approx(20 * math.log(2) / 8)
    assert result.perplexity == pytest.approx(2 ** (20 / 8))
    assert PerplexityResult(nll=1.0, tokens=1, bytes=None).bits_per_byte is None


def test_text_files_and_their_packed_shards_give_the_same_numbers(model, tokenizer, tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in DOCS), encoding="utf-8")
    pack_documents([Document(t, "docs", str(jsonl), i) for i, t in enumerate(DOCS)], tokenizer, tmp_path / "shards",
                   val_fraction=0.0, shard_size_tokens=300)  # several shards: windows cross shard boundaries
    from_text = perplexity_of_files(model, tokenizer, [jsonl], max_length=32, stride=16, batch_size=4)
    from_shards = perplexity_of_shards(model, tmp_path / "shards", split="train", tokenizer=tokenizer,
                                       max_length=32, stride=16, batch_size=4)
    assert from_text.tokens == from_shards.tokens and from_text.bytes == from_shards.bytes
    assert from_text.bytes == sum(len(t.encode("utf-8")) for t in DOCS)
    assert from_text.nll == pytest.approx(from_shards.nll, rel=1e-6)
    assert 1.0 < from_text.perplexity < 2 * model.config.vocab_size
