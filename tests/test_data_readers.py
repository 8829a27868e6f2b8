"""Readers: every format streams Documents with source/path/line; bad lines name file:line or are counted."""
from __future__ import annotations

import gzip
import json

import pytest

from lmforge.config import load_config
from lmforge.core.errors import ConfigError, DataError
from lmforge.data.config import DataConfig, SourceConfig, source_name
from lmforge.data.readers import (ReadStats, iter_texts, read_hf_disk, read_jsonl, read_parquet, read_source,
                                  read_txt, resolve_paths)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_txt_modes_split_documents_and_keep_line_numbers(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first line\nsecond line\n\n  \nthird para l1\nthird para l2\n", encoding="utf-8")
    lines = list(read_txt(path, "a", "line"))
    assert [(d.text, d.line) for d in lines] == [
        ("first line", 1), ("second line", 2), ("third para l1", 5), ("third para l2", 6)]
    paras = list(read_txt(path, "a", "paragraph"))
    assert [(d.text, d.line) for d in paras] == [
        ("first line\nsecond line", 1), ("third para l1\nthird para l2", 5)]
    whole = list(read_txt(path, "a", "file"))
    assert len(whole) == 1 and whole[0].text.startswith("first line\nsecond") and whole[0].source == "a"
    assert whole[0].path == str(path)


def test_txt_invalid_utf8_names_file_and_line_or_is_skipped(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes("ok one\n".encode() + b"bad \xff\xfe here\n" + "ok 三\n".encode())
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8"):
        list(read_txt(path, "bad"))
    stats = ReadStats()
    docs = list(read_txt(path, "bad", on_error="skip", stats=stats))
    assert [d.text for d in docs] == ["ok one", "ok 三"]
    assert stats.skipped == 1 and "bad.txt:2" in stats.skipped_examples[0]
    with pytest.raises(DataError, match=r"bad\.txt:2"):
        list(read_txt(path, "bad", mode="file"))


def test_jsonl_reads_text_field_and_reports_each_kind_of_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"content": "good 1", "id": 1}),
        "{not json",
        json.dumps({"other": "x"}),
        json.dumps({"content": 5}),
        json.dumps(["a list"]),
        "",
        json.dumps({"content": "好的 2"}, ensure_ascii=False),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = {2: "not valid JSON", 3: "missing field 'content'", 4: "is int, expected a string",
                5: "expected a JSON object"}
    for lineno, message in expected.items():
        good = [json.dumps({"content": "fine"})] * (lineno - 1)
        single = tmp_path / f"single{lineno}.jsonl"
        single.write_text("\n".join(good + [lines[lineno - 1]]) + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"single{lineno}\.jsonl:{lineno}: .*{message}"):
            list(read_jsonl(single, "s", "content"))
    stats = ReadStats()
    docs = list(read_jsonl(path, "c", "content", on_error="skip", stats=stats))
    assert [(d.text, d.line) for d in docs] == [("good 1", 1), ("好的 2", 7)]
    assert stats.skipped == 4


def test_jsonl_gzip_and_unpaired_surrogate(tmp_path):
    path = tmp_path / "z.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
        f.write('{"text": "bad \\ud800 surrogate"}\n')
    with pytest.raises(DataError, match=r"z\.jsonl\.gz:2: .*surrogate"):
        list(read_source(SourceConfig(path=str(path))))
    stats = ReadStats()
    assert [d.text for d in read_source(SourceConfig(path=str(path)), "skip", stats)] == ["zipped"]
    assert stats.skipped == 1 and stats.documents == 1


def test_parquet_streams_in_batches_and_checks_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i} 文本" for i in range(50)]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), path, row_group_size=16)
    docs = list(read_parquet(path, "p", "body", batch_size=7))
    assert [d.text for d in docs] == texts and docs[3].line == 4
    with pytest.raises(DataError, match=r"no column 'text' \(columns: body, n\)"):
        list(read_parquet(path, "p", "text"))
    with pytest.raises(DataError, match="has type int64, expected string"):
        list(read_parquet(path, "p", "n"))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"]}), nulls)
    with pytest.raises(DataError, match=r"nulls\.parquet:2: row 2: value is null"):
        list(read_parquet(nulls, "n"))
    stats = ReadStats()
    assert [d.text for d in read_parquet(nulls, "n", on_error="skip", stats=stats)] == ["a", "c"]
    assert stats.skipped == 1


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["alpha", "beta", "伽马"], "label": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "multi"))

    src = SourceConfig(path=str(tmp_path / "single"))  # format auto-detected from the directory layout
    assert resolve_paths(src)[0][1] == "hf_disk"
    assert [d.text for d in read_source(src)] == ["alpha", "beta", "伽马"]
    assert [d.text for d in read_hf_disk(tmp_path / "multi", "m", split="test")] == ["alpha"]
    with pytest.raises(DataError, match="no split 'validation'"):
        list(read_hf_disk(tmp_path / "multi", "m", split="validation"))
    with pytest.raises(DataError, match="no column 'body'"):
        list(read_hf_disk(tmp_path / "single", "s", text_field="body"))


def test_hf_disk_without_datasets_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install 'lmforge\[hf\]'"):
        list(read_hf_disk(tmp_path, "x"))


def test_sources_resolve_dirs_and_globs_in_sorted_order_and_respect_max_docs(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("b1\nb2\n", encoding="utf-8")
    _write_jsonl(tmp_path / "d" / "a.jsonl", [{"text": "a1"}])
    (tmp_path / "d" / "sub" / "c.txt").write_text("c1\n", encoding="utf-8")
    (tmp_path / "d" / "notes.csv").write_text("ignored\n", encoding="utf-8")
    stats = ReadStats()
    docs = list(read_source(SourceConfig(path=str(tmp_path / "d")), stats=stats))
    assert [d.text for d in docs] == ["a1", "b1", "b2", "c1"] and stats.files == 3
    assert all(d.source == "d" for d in docs)
    globbed = list(read_source(SourceConfig(path=str(tmp_path / "d" / "*.txt"))))
    assert [d.text for d in globbed] == ["b1", "b2"]
    assert [d.text for d in read_source(SourceConfig(path=str(tmp_path / "d"), max_docs=2))] == ["a1", "b1"]
    assert list(iter_texts([SourceConfig(path=str(tmp_path / "d" / "sub"))])) == ["c1"]
    assert source_name(SourceConfig(path="corpus/web/*.jsonl")) == "web"
    assert source_name(SourceConfig(path="x/wiki.jsonl.gz")) == "wiki"


def test_missing_paths_and_unknown_extensions_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=r"source path not found: .*nope\.jsonl"):
        list(read_source(SourceConfig(path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(DataError, match="no files match"):
        list(read_source(SourceConfig(path=str(tmp_path / "*.parquet"))))
    (tmp_path / "x.dat").write_text("hi\n")
    with pytest.raises(DataError, match=r"cannot tell the format of .*x\.dat"):
        resolve_paths(SourceConfig(path=str(tmp_path / "x.dat")))
    assert [d.text for d in read_source(SourceConfig(path=str(tmp_path / "x.dat"), format="txt"))] == ["hi"]


def test_data_config_validation_names_the_key(tmp_path):
    cfg_file = tmp_path / "data.yaml"
    cfg_file.write_text("sources:\n  - {path: a.jsonl, weight: 2}\n  - {path: b.txt, txt_mode: paragraph}\n")
    cfg = load_config(DataConfig, cfg_file, ["dedup.num_perm=64", "on_error=skip"])
    assert cfg.sources[0].weight == 2.0 and cfg.sources[1].txt_mode == "paragraph"
    assert cfg.dedup.num_perm == 64 and cfg.on_error == "skip"
    bad = {
        "val_fraction=1.5": r"data\.val_fraction",
        "dedup.bands=20": r"set both",
        "clean.max_chars=5": r"data\.clean\.max_chars=5",
        "on_error=ignore": r"on_error",
        "dedup.threshold=0": r"data\.dedup\.threshold",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(DataConfig, cfg_file, [override])
    with pytest.raises(ConfigError, match=r"bands \* rows = 20 \* 10 = 200 exceeds num_perm=128"):
        load_config(DataConfig, cfg_file, ["dedup.bands=20", "dedup.rows=10"])
    dup = tmp_path / "dup.yaml"
    dup.write_text("sources:\n  - {path: x/a.jsonl}\n  - {path: y/a.txt}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\]\.name='a' is used by two sources"):
        load_config(DataConfig, dup)
    weight = tmp_path / "w.yaml"
    weight.write_text("sources:\n  - {path: a.jsonl, weight: 0}\n")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight=0\.0 must be > 0"):
        load_config(DataConfig, weight)
