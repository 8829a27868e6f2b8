"""ShardLoader: windows of the token stream, per-epoch shuffles, rank slices, exact resume; and the whole
data pipeline end to end on a small multi-source corpus."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.core.errors import ConfigError, DataError
from lmforge.data import (DataConfig, ShardLoader, SourceConfig, TokenShardDataset, iter_eval_batches,
                          pack_documents, run_data_pipeline)
from lmforge.data.readers import Document
from test_data_pack import ByteTokenizer, decode_documents, make_tokenizer, read_split, sample_texts

SEQ = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """~20k tokens over shards of 1000 tokens, so many windows straddle a shard boundary."""
    out = tmp_path_factory.mktemp("shards")
    docs = [Document(t, "s", "mem", i) for i, t in enumerate(sample_texts(400))]
    meta = pack_documents(docs, ByteTokenizer(), out, shard_size_tokens=1000, val_fraction=0.2, seed=0)
    return out, meta


def _stream(out, meta, split="train") -> np.ndarray:
    return read_split(out, meta, split).astype(np.int64)


def test_batches_are_windows_of_the_stream_with_labels_shifted(dataset):
    out, meta = dataset
    stream = _stream(out, meta)
    loader = ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=0)
    assert loader.windows_per_epoch == len(stream) // (SEQ + 1) and len(loader) == loader.windows_per_epoch // 4
    order = loader.epoch_order(0)
    inputs, labels = next(iter(loader))
    assert inputs.shape == labels.shape == (4, SEQ) and inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    for row, window in enumerate(order[:4]):
        expected = stream[window * (SEQ + 1):(window + 1) * (SEQ + 1)]
        assert inputs[row].tolist() == expected[:-1].tolist() and labels[row].tolist() == expected[1:].tolist()


def test_an_epoch_visits_each_window_once_and_epochs_shuffle_deterministically(dataset):
    out, _ = dataset
    loader = ShardLoader(out, "train", batch_size=8, seq_len=SEQ, seed=3)
    dataset_view = loader.dataset
    visited = np.concatenate([loader.global_batch_indices(0, i) for i in range(len(loader))])
    assert len(set(visited.tolist())) == len(visited) == len(loader) * 8  # no window twice in an epoch
    first = [b[0] for b in loader]
    assert loader.epoch == 1 and len(first) == len(loader)
    second = [b[0] for b in loader]
    assert not torch.equal(torch.cat(first), torch.cat(second))  # a new order each epoch
    again = ShardLoader(out, "train", batch_size=8, seq_len=SEQ, seed=3)
    assert all(torch.equal(a[0], b) for a, b in zip(again, first))  # same seed, same order
    other = ShardLoader(out, "train", batch_size=8, seq_len=SEQ, seed=4)
    assert not torch.equal(next(iter(other))[0], first[0])
    assert dataset_view.num_windows == loader.windows_per_epoch


def test_resume_from_state_dict_gives_identical_batches_across_epochs(dataset):
    out, _ = dataset
    reference = ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=1)
    stream = reference.batches()
    steps = len(reference) + 7  # crosses an epoch boundary
    expected = [next(stream) for _ in range(steps)]
    for stop in (3, len(reference), len(reference) + 2):
        first = ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=1)
        it = first.batches()
        for _ in range(stop):
            next(it)
        state = json.loads(json.dumps(first.state_dict()))  # it must survive a JSON checkpoint
        resumed = ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=1)
        resumed.load_state_dict(state)
        rest = resumed.batches()
        for want in expected[stop:]:
            got = next(rest)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_resume_refuses_a_different_seed_or_shape(dataset):
    out, _ = dataset
    loader = ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=1)
    state = loader.state_dict()
    with pytest.raises(DataError, match="seed"):
        ShardLoader(out, "train", batch_size=4, seq_len=SEQ, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        ShardLoader(out, "train", batch_size=4, seq_len=SEQ + 1, seed=1).load_state_dict(state)
    regrouped = ShardLoader(out, "train", batch_size=2, seq_len=SEQ, seed=1, world_size=2, rank=1)
    regrouped.load_state_dict({**state, "position": 3})  # same global batch of 4: fine
    assert regrouped.position == 3


def test_two_ranks_slice_the_one_process_global_batch(dataset):
    out, _ = dataset
    single = ShardLoader(out, "train", batch_size=6, seq_len=SEQ, seed=9)
    ranks = [ShardLoader(out, "train", batch_size=3, seq_len=SEQ, seed=9, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, part0, part1 in zip(single, ranks[0], ranks[1]):
        assert torch.equal(torch.cat([part0[0], part1[0]]), whole[0])
        assert torch.equal(torch.cat([part0[1], part1[1]]), whole[1])
        assert not torch.equal(part0[0], part1[0])


def test_drop_last_false_pads_the_last_batch_by_wrapping(dataset):
    out, _ = dataset
    loader = ShardLoader(out, "train", batch_size=7, seq_len=SEQ, seed=0, drop_last=False)
    batches = [b[0] for b in loader]
    assert len(batches) == -(-loader.windows_per_epoch // 7) and all(b.shape == (7, SEQ) for b in batches)
    visited = np.concatenate([loader.global_batch_indices(0, i) for i in range(len(batches))])
    assert set(visited.tolist()) == set(range(loader.windows_per_epoch))
    assert visited[-1] == loader.epoch_order(0)[len(visited) - loader.windows_per_epoch - 1]  # wrapped


def test_eval_batches_cover_the_val_split_once_in_order(dataset):
    out, meta = dataset
    stream = _stream(out, meta, "val")
    windows = len(stream) // (SEQ + 1)
    batches = list(iter_eval_batches(out, batch_size=5, seq_len=SEQ))
    inputs = torch.cat([b[0] for b in batches])
    assert len(inputs) == windows and batches[-1][0].shape[0] == windows - 5 * (len(batches) - 1)
    assert inputs[2].tolist() == stream[2 * (SEQ + 1):3 * (SEQ + 1) - 1].tolist()
    ranked = [torch.cat([b[0] for b in iter_eval_batches(out, 5, SEQ, rank=r, world_size=2)]) for r in range(2)]
    assert len(ranked[0]) + len(ranked[1]) == windows and torch.equal(ranked[1][0], inputs[1])
    assert len(list(iter_eval_batches(out, 2, SEQ, max_batches=3))) == 3


def test_missing_or_partial_datasets_and_wrong_tokenizers_raise(tmp_path, dataset):
    out, meta = dataset
    with pytest.raises(DataError, match="dataset directory not found"):
        ShardLoader(tmp_path / "nothing", "train", 2, SEQ)
    (tmp_path / "train-00000.bin.partial").write_bytes(b"\x00" * 10)
    with pytest.raises(DataError, match=r"meta\.json is missing: its build was interrupted"):
        TokenShardDataset(tmp_path, "train", SEQ)
    with pytest.raises(DataError, match="fewer than one global batch"):
        ShardLoader(out, "train", batch_size=10_000, seq_len=SEQ)
    with pytest.raises(DataError, match="tokenized with tokenizer bytes\\+0"):
        ShardLoader(out, "train", 2, SEQ, tokenizer=ByteTokenizer(offset=1))
    ShardLoader(out, "train", 2, SEQ, tokenizer=ByteTokenizer())  # the right one passes
    with pytest.raises(ConfigError, match="rank=2, world_size=2"):
        ShardLoader(out, "train", 2, SEQ, rank=2, world_size=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    first = meta["splits"]["train"]["shards"][0]["file"]
    (broken / first).write_bytes((broken / first).read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{first}: expected 2000 bytes per meta.json, found 1998"):
        ShardLoader(broken, "train", 2, SEQ)


# ---- the whole pipeline ----------------------------------------------------------------------------------

def _write_corpus(root):
    """Three sources (jsonl, txt paragraphs, parquet) with duplicates, HTML, junk and one bad line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import random

    en = [t for t in sample_texts(300, seed=1) if len(t) >= 30][:120]
    rng = random.Random(0)
    chars = "天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏闰余成岁律吕调阳云腾致雨露结为霜金生丽水玉出昆冈"
    zh = ["".join(rng.choice(chars) for _ in range(30)) + "。" for _ in range(60)]
    rows = [{"text": t} for t in en[:80]] + [{"text": en[0]}, {"text": "<p>" + en[1].upper() + "</p>"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] + ["{broken json", json.dumps({"text": "short"})]
    (root / "web.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "books.txt").write_text("\n\n".join(t.replace(" ", "\n", 1) for t in en[80:]) + "\n", encoding="utf-8")
    pq.write_table(pa.table({"content": zh + [zh[0]]}), root / "zh.parquet", row_group_size=16)
    return en, zh


def test_pipeline_end_to_end_on_a_small_multi_source_corpus(tmp_path):
    (tmp_path / "in").mkdir()
    en, zh = _write_corpus(tmp_path / "in")
    tokenizer = make_tokenizer(en + zh, vocab_size=500)
    cfg = DataConfig(
        sources=[SourceConfig(path=str(tmp_path / "in" / "web.jsonl"), weight=2.0),
                 SourceConfig(path=str(tmp_path / "in" / "books.txt"), txt_mode="paragraph"),
                 SourceConfig(path=str(tmp_path / "in" / "zh.parquet"), text_field="content", name="chinese")],
        output_dir=str(tmp_path / "out"), shard_size_tokens=2000, val_fraction=0.1, seed=0, on_error="skip",
        chunk_docs=16,
    )
    logged: list[str] = []
    report = run_data_pipeline(cfg, tokenizer, log=logged.append)
    out = tmp_path / "out"
    assert {"meta.json", "stats.json", "stats.md", "train-00000.bin", "val-00000.bin"} <= {p.name for p in out.iterdir()}
    assert any("documents read" in line or "read " in line for line in logged)

    docs = report["documents"]
    assert docs["read"] == 82 + 1 + 40 + 61 and docs["skipped_bad_lines"] == 1
    assert docs["exact_duplicates"] == 3  # en[0] again, en[1] as upper-case HTML, zh[0] again
    assert report["removed_by_cleaning"]["too_short"] == 1 and report["modified_by_cleaning"]["html"] == 1
    assert docs["written"] == docs["read"] - docs["removed_by_cleaning"] - docs["exact_duplicates"] - docs["near_duplicates"]
    assert "web.jsonl:83: not valid JSON" in report["sources"]["web"]["skipped_examples"][0]
    assert set(report["mix"]["realised_proportions"]) == {"web", "books", "chinese"}

    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == tokenizer.fingerprint() and meta["config"]["seed"] == 0
    assert meta["dedup"]["exact"]["removed"] == 3 and "web" in meta["clean"]
    written = decode_documents(read_split(out, meta, "train"), tokenizer) + decode_documents(
        read_split(out, meta, "val"), tokenizer)
    books = [t.replace(" ", "\n", 1) for t in en[80:]]
    assert sorted(written) == sorted(set(en[:80]) | set(books) | set(zh))  # the clean documents, each once
    assert "# Data report" in (out / "stats.md").read_text()

    loader = ShardLoader(out, "train", batch_size=2, seq_len=32, seed=0, tokenizer=tokenizer)
    inputs, labels = next(iter(loader))
    assert inputs.shape == (2, 32)
    assert next(iter_eval_batches(out, 2, 32))[0].shape[1] == 32

    with pytest.raises(DataError, match="already holds a complete dataset"):
        run_data_pipeline(cfg, tokenizer, log=logged.append)
    cfg.overwrite = True
    cfg.dedup.exact = cfg.dedup.minhash = False
    again = run_data_pipeline(cfg, tokenizer, log=logged.append)
    assert again["documents"]["exact_duplicates"] == 0 and again["documents"]["written"] == docs["written"] + 3


def test_pipeline_fails_fast_on_missing_sources_and_bad_lines(tmp_path):
    tokenizer = ByteTokenizer()
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "missing.jsonl"))], output_dir=str(tmp_path / "o"))
    with pytest.raises(DataError, match="source path not found"):
        run_data_pipeline(cfg, tokenizer, log=lambda s: None)
    assert not (tmp_path / "o").exists()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some text that is long enough\n")
    inside = DataConfig(sources=[SourceConfig(path=str(tmp_path))], output_dir=str(tmp_path / "corpus"))
    with pytest.raises(ConfigError, match="inside data.output_dir"):
        run_data_pipeline(inside, tokenizer, log=lambda s: None)
    with pytest.raises(ConfigError, match="data.sources is empty"):
        run_data_pipeline(DataConfig(), tokenizer, log=lambda s: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a fine document of some length"}) + "\n{oops\n", encoding="utf-8")
    cfg = DataConfig(sources=[SourceConfig(path=str(bad))], output_dir=str(tmp_path / "o2"))
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        run_data_pipeline(cfg, tokenizer, log=lambda s: None)
    assert not (tmp_path / "o2" / "meta.json").exists() and not list((tmp_path / "o2").glob("*.partial"))
