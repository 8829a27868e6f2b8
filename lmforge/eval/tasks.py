"""Multiple-choice task files: the MMLU, C-Eval and CMMLU CSV layouts and a generic JSONL layout.

Layouts (DESIGN, Data):
- MMLU: no header; each row `question, A, B, C, D, answer`; files `<subject>_<split>.csv` (data/dev/...).
- C-Eval: header `id,question,A,B,C,D,answer[,explanation]`; files `<subject>_<split>.csv` (val/dev/test).
  Its test split has no answer column (the answers are not public): evaluate on `val`.
- CMMLU: header `,Question,A,B,C,D,Answer` (first column an unnamed index); files `<split>/<subject>.csv`.
- JSONL: `{"question", "A".."D", "answer", "subject"}` per line (what `mc_questions` of the synthetic
  world writes); `"choices": [...]` instead of lettered fields, and an integer answer, are accepted too.

A header is recognised by its column names (question, A, B, ... and answer, any case), so C-Eval and CMMLU
share one reader and a file with more options (A..E) just works. The subject is the file name without its
split suffix (`abstract_algebra_test.csv` -> `abstract_algebra`) unless a JSONL row names one. A malformed
row is a DataError naming the file and line, or is skipped and counted under `on_error="skip"`.
"""
from __future__ import annotations

import csv
import json
import string
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

from ..core.errors import DataError
from ..data.readers import ReadStats, bad_line, iter_json_objects

LETTERS = string.ascii_uppercase
SPLIT_SUFFIXES = ("dev", "val", "validation", "test", "train")
Layout = Literal["auto", "mmlu", "ceval", "cmmlu"]


@dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question; `answer` indexes `choices` (0 = A)."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    source: str = ""  # "file:line" it was read from, for error messages and reports

    @property
    def letters(self) -> str:
        return LETTERS[:len(self.choices)]

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer]


def _answer_index(value: Any, num_choices: int) -> int:
    """The 0-based index an answer letter ("B", " b ") or integer names; ValueError saying why not."""
    letters = LETTERS[:num_choices]
    if isinstance(value, bool):
        raise ValueError(f"answer {value!r} is not a letter {'/'.join(letters)}")
    if isinstance(value, int):
        if 0 <= value < num_choices:
            return value
        raise ValueError(f"answer index {value} is outside 0..{num_choices - 1}")
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in letters:
        return letters.index(value.strip().upper())
    raise ValueError(f"answer {value!r} is not one of {'/'.join(letters)}")


def make_question(question: Any, choices: Sequence[Any], answer: Any, subject: str = "",
                  source: str = "") -> MCQuestion:
    """An MCQuestion from raw fields; ValueError naming the problem when they do not make one."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    if len(choices) < 2:
        raise ValueError(f"a question needs at least 2 options, found {len(choices)}")
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options are supported, found {len(choices)}")
    for letter, choice in zip(LETTERS, choices):
        if not isinstance(choice, str):
            raise ValueError(f"option {letter} is {type(choice).__name__}, expected text")
    return MCQuestion(question, tuple(choices), _answer_index(answer, len(choices)), subject, source)


def question_from_record(record: dict, subject: str = "", source: str = "") -> MCQuestion:
    """An MCQuestion from a JSON object with lettered options ("A", "B", ...) or a "choices" list."""
    if "choices" in record:
        choices = record["choices"]
        if not isinstance(choices, list):
            raise ValueError(f"'choices' is {type(choices).__name__}, expected a list")
    else:
        choices = []
        for letter in LETTERS:
            if letter not in record:
                break
            choices.append(record[letter])
    if "answer" not in record:
        raise ValueError(f"missing field 'answer' (keys: {', '.join(sorted(record))})")
    named = record.get("subject")
    return make_question(record.get("question"), choices, record["answer"],
                         named if isinstance(named, str) and named else subject, source)


def questions_from_records(records: Sequence[dict], source: str = "records") -> list[MCQuestion]:
    """MCQuestions from in-memory records (e.g. `lmforge.data.synthetic.mc_questions`)."""
    out = []
    for index, record in enumerate(records):
        try:
            out.append(question_from_record(record, source=f"{source}[{index}]"))
        except ValueError as e:
            raise DataError(f"{source}[{index}]: {e}") from None
    return out


def subject_of(path: str | Path) -> str:
    """The subject a file name implies: its stem without a `_dev` / `_val` / `_test` suffix."""
    stem = Path(path).stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith("_" + suffix):
            return stem[: -len(suffix) - 1]
    return stem


def _bad_row(path: Path, line: int, reason: str, on_error: str, stats: ReadStats) -> None:
    bad_line(path, line, reason, on_error, stats)


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each non-blank CSV row; quoted fields may span lines."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            while True:
                line = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(f"{path}:{line}: malformed CSV ({e})") from None
                if any(cell.strip() for cell in row):
                    yield line, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _header_columns(header: list[str], path: Path, line: int) -> tuple[int, list[int], int]:
    """(question column, option columns in letter order, answer column) named by a header row."""
    names = [cell.strip().lower() for cell in header]
    if "question" not in names:
        raise DataError(f"{path}:{line}: header {header} has no 'question' column")
    options = []
    for letter in LETTERS.lower():
        if letter not in names:
            break
        options.append(names.index(letter))
    if len(options) < 2:
        raise DataError(f"{path}:{line}: header {header} needs option columns A, B, ...")
    if "answer" not in names:
        raise DataError(f"{path}:{line}: header {header} has no 'answer' column (C-Eval's test split ships without "
                        "answers: evaluate on its val split)")
    return names.index("question"), options, names.index("answer")


def _looks_like_header(row: list[str]) -> bool:
    names = {cell.strip().lower() for cell in row}
    return {"question", "a", "b"} <= names


def read_mc_csv(path: str | Path, layout: Layout = "auto", subject: str | None = None, on_error: str = "raise",
                stats: ReadStats | None = None) -> list[MCQuestion]:
    """Questions of one CSV file in the MMLU (no header) or C-Eval / CMMLU (header) layout."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    if layout not in ("auto", "mmlu", "ceval", "cmmlu"):
        raise DataError(f"{path}: layout={layout!r} is not one of auto, mmlu, ceval, cmmlu")
    subject = subject or subject_of(path)
    rows = _csv_rows(path)
    first = next(rows, None)
    stats.files += 1
    if first is None:
        return []
    has_header = _looks_like_header(first[1]) if layout == "auto" else layout != "mmlu"
    if has_header:
        if not _looks_like_header(first[1]):
            raise DataError(f"{path}:{first[0]}: layout={layout} expects a header row with question, A, B, ... "
                            f"and answer columns; found {first[1][:8]}")
        question_col, option_cols, answer_col = _header_columns(first[1], path, first[0])
        width = len(first[1])
        body: Iterator[tuple[int, list[str]]] = rows
    else:  # MMLU: question, options..., answer; every row as wide as the first
        width = len(first[1])
        if width < 4:
            raise DataError(f"{path}:{first[0]}: an MMLU-layout row needs question, >= 2 options and the answer; "
                            f"found {width} columns")
        question_col, option_cols, answer_col = 0, list(range(1, width - 1)), width - 1
        body = chain([first], rows)
    out = []
    for line, row in body:
        if len(row) != width:
            _bad_row(path, line, f"{len(row)} columns, expected {width}", on_error, stats)
            continue
        try:
            out.append(make_question(row[question_col], [row[c] for c in option_cols], row[answer_col],
                                     subject, f"{path}:{line}"))
        except ValueError as e:
            _bad_row(path, line, str(e), on_error, stats)
            continue
        stats.documents += 1
    return out


def read_mc_jsonl(path: str | Path, subject: str | None = None, on_error: str = "raise",
                  stats: ReadStats | None = None) -> list[MCQuestion]:
    """Questions of a JSON-lines file; a row's own "subject" wins over the file name's."""
    path, stats = Path(path), stats if stats is not None else ReadStats()
    subject = subject or subject_of(path)
    stats.files += 1
    out = []
    for line, record in iter_json_objects(path, on_error, stats):
        try:
            out.append(question_from_record(record, subject, f"{path}:{line}"))
        except ValueError as e:
            _bad_row(path, line, str(e), on_error, stats)
            continue
        stats.documents += 1
    return out


def read_mc_file(path: str | Path, layout: Layout = "auto", subject: str | None = None, on_error: str = "raise",
                 stats: ReadStats | None = None) -> list[MCQuestion]:
    """Questions of a .csv or .jsonl file."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return read_mc_csv(path, layout, subject, on_error, stats)
    if path.suffix.lower() in (".jsonl", ".json"):
        return read_mc_jsonl(path, subject, on_error, stats)
    raise DataError(f"{path}: multiple-choice files are .csv (MMLU / C-Eval / CMMLU) or .jsonl")


def find_split_files(root: str | Path, split: str) -> list[Path]:
    """The .csv/.jsonl files of `split` under `root`: in a directory named after the split (CMMLU's
    `test/x.csv`, MMLU's `data/test/x_test.csv`) or named `<subject>_<split>` / `<split>` (C-Eval)."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"task path not found: {root}")
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".csv", ".jsonl"):
            continue
        parts = path.relative_to(root).parts[:-1]
        if split in parts or path.stem == split or path.stem.endswith("_" + split):
            found.append(path)
    return found


def load_mc_split(root: str | Path, split: str = "test", layout: Layout = "auto", on_error: str = "raise",
                  stats: ReadStats | None = None) -> list[MCQuestion]:
    """Every question of one split under a task directory (or in one file), files in sorted order."""
    files = find_split_files(root, split)
    if not files:
        raise DataError(f"{root}: no .csv/.jsonl files for split {split!r} (looked for a '{split}/' directory "
                        f"or names ending in '_{split}')")
    questions: list[MCQuestion] = []
    for path in files:
        questions.extend(read_mc_file(path, layout, None, on_error, stats))
    return questions


@dataclass
class MCTask:
    """Questions to evaluate plus, per subject, the dev questions k-shot prompts draw exemplars from."""

    name: str
    questions: list[MCQuestion]
    dev: dict[str, list[MCQuestion]] = field(default_factory=dict)

    @property
    def subjects(self) -> list[str]:
        return sorted({q.subject for q in self.questions})


def group_by_subject(questions: Sequence[MCQuestion]) -> dict[str, list[MCQuestion]]:
    """Questions per subject, each list in the given order."""
    groups: dict[str, list[MCQuestion]] = {}
    for q in questions:
        groups.setdefault(q.subject, []).append(q)
    return groups


def load_mc_task(root: str | Path, split: str = "test", dev_split: str | None = "dev", layout: Layout = "auto",
                 on_error: str = "raise", name: str | None = None) -> MCTask:
    """A task directory's `split` questions and its `dev_split` exemplars (none when that split is absent)."""
    questions = load_mc_split(root, split, layout, on_error)
    dev: dict[str, list[MCQuestion]] = {}
    if dev_split and Path(root).is_dir() and find_split_files(root, dev_split):
        dev = group_by_subject(load_mc_split(root, dev_split, layout, on_error))
    return MCTask(name or Path(root).name, questions, dev)
