"""Streaming readers: txt, jsonl, parquet and HF `save_to_disk` datasets, one `Document` at a time.

Nothing here loads a whole corpus: text files are read line by line, parquet in record batches and HF
datasets through their memory-mapped Arrow files, so a reader's memory does not grow with the input.
A malformed line (bad JSON, a missing or non-string text field, invalid UTF-8) is an error naming the
file and line; under `on_error="skip"` it is skipped and counted in `ReadStats` instead.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..core.errors import DataError
from .config import SourceConfig, source_name

_EXTENSIONS = {
    ".txt": "txt", ".text": "txt", ".md": "txt",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet",
}
_MAX_EXAMPLES = 5


@dataclass(slots=True)
class Document:
    """One document and where it came from (`line` is the 1-based line or row where it starts)."""

    text: str
    source: str
    path: str
    line: int


@dataclass
class ReadStats:
    """What a reader saw: files, documents yielded, characters, and malformed lines skipped."""

    files: int = 0
    documents: int = 0
    chars: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"files": self.files, "documents": self.documents, "chars": self.chars,
                "skipped_bad_lines": self.skipped, "skipped_examples": list(self.skipped_examples)}


def _bad_line(path: Path | str, line: int, reason: str, on_error: str, stats: ReadStats) -> None:
    """Raise a DataError for a malformed line, or count it when on_error == 'skip'."""
    where = f"{path}:{line}: {reason}"
    if on_error != "skip":
        raise DataError(where + " (set on_error=skip to skip and count such lines)")
    stats.skipped += 1
    if len(stats.skipped_examples) < _MAX_EXAMPLES:
        stats.skipped_examples.append(where)


def _open_binary(path: Path) -> IO[bytes]:
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot open {path}: {e.strerror or e}") from None


def _decode(raw: bytes, path: Path, line: int, on_error: str, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _bad_line(path, line, f"invalid UTF-8 at byte {e.start} of the line", on_error, stats)
        return None


def read_txt(path: str | Path, source: str, mode: str = "line", on_error: str = "raise",
             stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of a text file: one per non-blank line, per blank-line-separated paragraph, or the file."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    if mode == "file":
        with _open_binary(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad_line(path, data[: e.start].count(b"\n") + 1, "invalid UTF-8", on_error, stats)
            return
        if text.strip():
            yield Document(text, source, str(path), 1)
        return
    if mode not in ("line", "paragraph"):
        raise DataError(f"{path}: txt_mode={mode!r} is not one of ['line', 'paragraph', 'file']")
    paragraph: list[str] = []
    start = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw, path, lineno, on_error, stats)
            if text is None:
                continue
            text = text.rstrip("\r\n")
            if mode == "line":
                if text.strip():
                    yield Document(text, source, str(path), lineno)
            elif text.strip():
                if not paragraph:
                    start = lineno
                paragraph.append(text)
            elif paragraph:
                yield Document("\n".join(paragraph), source, str(path), start)
                paragraph = []
    if paragraph:
        yield Document("\n".join(paragraph), source, str(path), start)


def _check_text(value: object, field_name: str) -> str | None:
    """The reason a field value is not usable text, or None when it is."""
    if not isinstance(value, str):
        return f"field {field_name!r} is {type(value).__name__}, expected a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"field {field_name!r} holds an unpaired surrogate (not valid Unicode text)"
    return None


def bad_line(path: Path | str, line: int, reason: str, on_error: str, stats: ReadStats) -> None:
    """Public name of the malformed-line rule (raise, or count under on_error=skip) for other readers."""
    _bad_line(path, line, reason, on_error, stats)


def iter_json_objects(path: str | Path, on_error: str = "raise", stats: ReadStats | None = None
                      ) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each JSON object line of a JSONL file (.gz too); blank lines are ignored.

    Invalid UTF-8, invalid JSON and non-object lines follow the malformed-line rule. Every JSONL reader
    (pretraining text, multiple choice, SFT, preference) goes through here."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw, path, lineno, on_error, stats)
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                _bad_line(path, lineno, f"not valid JSON ({e.msg} at column {e.colno})", on_error, stats)
                continue
            if not isinstance(obj, dict):
                _bad_line(path, lineno, f"expected a JSON object, got {type(obj).__name__}", on_error, stats)
                continue
            yield lineno, obj


def read_jsonl(path: str | Path, source: str, text_field: str = "text", on_error: str = "raise",
               stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents of a JSON-lines file: `text_field` of each object; blank lines are ignored."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    for lineno, obj in iter_json_objects(path, on_error, stats):
        if text_field not in obj:
            keys = ", ".join(sorted(obj)[:10])
            _bad_line(path, lineno, f"missing field {text_field!r} (keys: {keys})", on_error, stats)
            continue
        problem = _check_text(obj[text_field], text_field)
        if problem:
            _bad_line(path, lineno, problem, on_error, stats)
            continue
        yield Document(obj[text_field], source, str(path), lineno)


def _iter_text_column(batches: Iterable[list], path: Path, source: str, text_field: str,
                      on_error: str, stats: ReadStats) -> Iterator[Document]:
    """Documents from batches of column values; rows are numbered from 1 (the `line`)."""
    row = 0
    for values in batches:
        for value in values:
            row += 1
            if isinstance(value, bytes):
                value = _decode(value, path, row, on_error, stats)
                if value is None:
                    continue
            problem = "value is null" if value is None else _check_text(value, text_field)
            if problem:
                _bad_line(path, row, f"row {row}: {problem}", on_error, stats)
                continue
            yield Document(value, source, str(path), row)


def read_parquet(path: str | Path, source: str, text_field: str = "text", on_error: str = "raise",
                 stats: ReadStats | None = None, batch_size: int = 1024) -> Iterator[Document]:
    """Documents of a parquet file's `text_field` column, read in record batches (never all at once)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, stats = Path(path), stats if stats is not None else ReadStats()
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read {path} as parquet: {e}") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); set text_field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise DataError(f"{path}: column {text_field!r} has type {kind}, expected string")
    batches = (b.column(0).to_pylist() for b in pf.iter_batches(batch_size=batch_size, columns=[text_field]))
    yield from _iter_text_column(batches, path, source, text_field, on_error, stats)


def is_hf_dataset_dir(path: Path) -> bool:
    """True for a directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and (
        (path / "dataset_dict.json").is_file()
        or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())
    )


def read_hf_disk(path: str | Path, source: str, text_field: str = "text", split: str = "train",
                 on_error: str = "raise", stats: ReadStats | None = None,
                 batch_size: int = 1024) -> Iterator[Document]:
    """Documents of a `save_to_disk` dataset (memory-mapped Arrow; `split` picks from a DatasetDict)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"reading {path} as hf_disk needs the `datasets` package: pip install 'lmforge[hf]'"
        ) from None
    path, stats = Path(path), stats if stats is not None else ReadStats()
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"cannot load {path} with datasets.load_from_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (splits: {', '.join(ds)}); set the source's split")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(ds.column_names)}); set text_field")
    batches = (b[text_field] for b in ds.select_columns([text_field]).iter(batch_size=batch_size))
    yield from _iter_text_column(batches, path, source, text_field, on_error, stats)


def detect_format(path: Path) -> str | None:
    """The reader format a path's name or layout implies, or None when it cannot tell."""
    if is_hf_dataset_dir(path):
        return "hf_disk"
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return _EXTENSIONS.get(suffixes[-1].lower()) if suffixes else None


def _files_under(directory: Path, fmt: str) -> list[tuple[Path, str]]:
    """Readable files under a directory, sorted (deterministic order), with their formats."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            p = Path(root) / name
            kind = detect_format(p) if fmt == "auto" else fmt
            if kind is not None:
                found.append((p, kind))
    return found


def resolve_paths(src: SourceConfig) -> list[tuple[Path, str]]:
    """(path, format) for every file or dataset directory a source names; DataError when none exist."""
    pattern = src.path
    if any(ch in pattern for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
        if not matches:
            raise DataError(f"source path not found: no files match {pattern!r}")
    else:
        matches = [Path(pattern)]
    resolved: list[tuple[Path, str]] = []
    for p in matches:
        if not p.exists():
            raise DataError(f"source path not found: {p}")
        if p.is_dir() and (src.format == "hf_disk" or (src.format == "auto" and is_hf_dataset_dir(p))):
            resolved.append((p, "hf_disk"))
        elif p.is_dir():
            resolved.extend(_files_under(p, src.format))
        else:
            kind = detect_format(p) if src.format == "auto" else src.format
            if kind is None:
                raise DataError(f"cannot tell the format of {p} from its name; set the source's format "
                                f"(txt, jsonl, parquet or hf_disk)")
            resolved.append((p, kind))
    if not resolved:
        raise DataError(f"source {pattern!r} holds no readable files (format={src.format})")
    return resolved


def read_source(src: SourceConfig, on_error: str = "raise", stats: ReadStats | None = None) -> Iterator[Document]:
    """Every document of one source in a fixed order (files sorted), up to `max_docs`."""
    stats = stats if stats is not None else ReadStats()
    name = source_name(src)
    emitted = 0
    for path, kind in resolve_paths(src):
        stats.files += 1
        if kind == "txt":
            docs = read_txt(path, name, src.txt_mode, on_error, stats)
        elif kind == "jsonl":
            docs = read_jsonl(path, name, src.text_field, on_error, stats)
        elif kind == "parquet":
            docs = read_parquet(path, name, src.text_field, on_error, stats)
        else:
            docs = read_hf_disk(path, name, src.text_field, src.split, on_error, stats)
        for doc in docs:
            stats.documents += 1
            stats.chars += len(doc.text)
            yield doc
            emitted += 1
            if src.max_docs and emitted >= src.max_docs:
                return


def iter_texts(sources: Iterable[SourceConfig], on_error: str = "raise") -> Iterator[str]:
    """Just the texts of several sources in turn: what tokenizer training consumes."""
    for src in sources:
        for doc in read_source(src, on_error):
            yield doc.text
