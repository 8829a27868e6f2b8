"""Packing: shards decode back to the documents separated by EOS, dtype follows the vocab, the val split is
a deterministic function of the text, meta.json is written last, and memory stays flat with corpus size."""
from __future__ import annotations

import hashlib
import json
import random
import tracemalloc

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmforge.core.errors import DataError
from lmforge.data.pack import Packer, pack_documents, split_of, token_dtype
from lmforge.data.readers import Document

EOS = "<|endoftext|>"


class StandInTokenizer:
    """The members of lmforge.tokenizer.Tokenizer the data pipeline uses, over an HF `tokenizers` BPE."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        self.eos_id = backend.token_to_id(EOS)
        self.vocab_size = backend.get_vocab_size()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()


def make_tokenizer(lines: list[str], vocab_size: int = 400) -> StandInTokenizer:
    """A byte-level BPE trained inline on `lines` (exact round trip for any text)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(lines, trainer)
    return StandInTokenizer(backend)


class ByteTokenizer:
    """UTF-8 bytes shifted by `offset`: a cheap tokenizer whose vocab size can be chosen (uint16 vs uint32)."""

    def __init__(self, offset: int = 0) -> None:
        self.offset, self.eos_id, self.vocab_size = offset, offset + 256, offset + 257

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[b + self.offset for b in t.encode("utf-8")] for t in texts]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids).decode("utf-8")

    def fingerprint(self) -> str:
        return f"bytes+{self.offset}"


def sample_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud 天空 河流 山 book light".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 40))) + f" #{i}" for i in range(n)]


def read_split(out_dir, meta: dict, split: str) -> np.ndarray:
    files = [out_dir / s["file"] for s in meta["splits"][split]["shards"]]
    arrays = [np.fromfile(f, dtype=meta["dtype"]) for f in files]
    return np.concatenate(arrays) if arrays else np.empty(0, dtype=meta["dtype"])


def decode_documents(tokens: np.ndarray, tokenizer) -> list[str]:
    ends = np.flatnonzero(tokens == tokenizer.eos_id)
    assert len(tokens) == 0 or ends[-1] == len(tokens) - 1  # every document ends with EOS
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def bpe() -> StandInTokenizer:
    return make_tokenizer(sample_texts(300, seed=99))


def test_round_trip_shards_decode_to_the_documents_in_order(tmp_path, bpe):
    texts = sample_texts(500)
    docs = [Document(t, "web" if i % 3 else "books", "mem", i) for i, t in enumerate(texts)]
    meta = pack_documents(docs, bpe, tmp_path, chunk_docs=64, shard_size_tokens=997, val_fraction=0.2, seed=1)
    train = decode_documents(read_split(tmp_path, meta, "train"), bpe)
    val = decode_documents(read_split(tmp_path, meta, "val"), bpe)
    assert train == [t for t in texts if split_of(t, 1, 0.2) == "train"]
    assert val == [t for t in texts if split_of(t, 1, 0.2) == "val"]
    assert 60 < len(val) < 140
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] == 997 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 997
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [s["file"] for s in meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]] + ["meta.json"])


def test_meta_json_records_tokenizer_counts_and_sources(tmp_path, bpe):
    texts = sample_texts(200)
    docs = [Document(t, "web" if i % 2 else "books", "mem", i) for i, t in enumerate(texts)]
    pack_documents(docs, bpe, tmp_path, chunk_docs=50, val_fraction=0.1, seed=3, extra_meta={"dedup": {"x": 1}})
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == bpe.vocab_size and meta["eos_id"] == bpe.eos_id
    assert meta["tokenizer"]["fingerprint"] == bpe.fingerprint() and meta["dedup"] == {"x": 1}
    total_tokens = sum(len(ids) + 1 for ids in bpe.encode_batch(texts))
    splits = meta["splits"]
    assert splits["train"]["tokens"] + splits["val"]["tokens"] == total_tokens
    assert splits["train"]["documents"] + splits["val"]["documents"] == 200
    assert sum(s["tokens"] for s in splits["train"]["shards"]) == splits["train"]["tokens"]
    per_source = meta["sources"]
    assert set(per_source) == {"web", "books"}
    assert sum(per_source[s][k]["documents"] for s in per_source for k in ("train", "val")) == 200
    assert per_source["web"]["train"]["chars"] + per_source["web"]["val"]["chars"] == sum(
        len(t) for i, t in enumerate(texts) if i % 2)


def test_dtype_is_uint16_up_to_65535_ids_then_uint32(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    docs = [Document(t, "s", "mem", 1) for t in sample_texts(20)]
    for offset, dtype in ((0, "uint16"), (70_000, "uint32")):
        tok = ByteTokenizer(offset)
        out = tmp_path / dtype
        meta = pack_documents(docs, tok, out, val_fraction=0.0)
        assert meta["dtype"] == dtype
        tokens = read_split(out, meta, "train")
        assert tokens.dtype == np.dtype(dtype)
        assert decode_documents(tokens, tok) == [d.text for d in docs]


def test_val_split_is_deterministic_and_independent_of_chunk_size(tmp_path):
    docs = [Document(t, "s", "mem", 1) for t in sample_texts(300)]
    tok = ByteTokenizer()
    results = []
    for chunk in (1, 17, 1000):
        out = tmp_path / f"c{chunk}"
        meta = pack_documents(docs, tok, out, chunk_docs=chunk, val_fraction=0.25, seed=5, shard_size_tokens=4096)
        results.append((read_split(out, meta, "train").tobytes(), read_split(out, meta, "val").tobytes()))
    assert results[0] == results[1] == results[2]
    other_seed = pack_documents(docs, tok, tmp_path / "seed6", val_fraction=0.25, seed=6)
    assert read_split(tmp_path / "seed6", other_seed, "val").tobytes() != results[0][1]
    assert all(split_of(t, 5, 0.0) == "train" for t in sample_texts(50))


def test_existing_dataset_is_kept_unless_overwrite_and_failed_runs_leave_no_meta(tmp_path):
    docs = [Document(t, "s", "mem", 1) for t in sample_texts(30)]
    tok = ByteTokenizer()
    pack_documents(docs, tok, tmp_path, val_fraction=0.0)
    with pytest.raises(DataError, match="already holds a complete dataset"):
        pack_documents(docs, tok, tmp_path)

    def failing():
        yield from docs
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        pack_documents(failing(), tok, tmp_path, overwrite=True, chunk_docs=4)
    assert not (tmp_path / "meta.json").exists()  # never mistaken for a complete dataset
    assert list(tmp_path.iterdir()) == []  # partial shards are removed too
    (tmp_path / "train-00000.bin.partial").write_bytes(b"\x00\x01")  # left by a killed run
    (tmp_path / "notes.txt").write_text("mine")
    pack_documents(docs, tok, tmp_path, val_fraction=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "notes.txt", "train-00000.bin"]


def test_bad_tokenizers_are_refused(tmp_path):
    no_eos = ByteTokenizer()
    no_eos.eos_id = None
    with pytest.raises(DataError, match="no eos_id"):
        Packer(tmp_path, no_eos)

    class OutOfRange(ByteTokenizer):
        def encode_batch(self, texts):
            return [[self.vocab_size + 5] for _ in texts]

    packer = Packer(tmp_path, OutOfRange())
    with pytest.raises(DataError, match="outside its vocab_size"):
        packer.add([Document("x", "s", "mem", 1)])


def _peak_bytes_packing(num_docs: int, out_dir) -> int:
    rng = random.Random(0)
    words = "tokens stream through the packer chunk by chunk while memory stays flat".split()

    def docs():  # generated lazily: the corpus itself never sits in memory
        for i in range(num_docs):
            yield Document(" ".join(rng.choice(words) for _ in range(40)) + f" {i}", "gen", "mem", i)

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        pack_documents(docs(), ByteTokenizer(), out_dir, chunk_docs=100, shard_size_tokens=50_000,
                       val_fraction=0.1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    small = _peak_bytes_packing(1_000, tmp_path / "small")
    large = _peak_bytes_packing(10_000, tmp_path / "large")
    meta = json.loads((tmp_path / "large" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 10_000
    assert large < 1.3 * small + 256 * 1024, (small, large)
