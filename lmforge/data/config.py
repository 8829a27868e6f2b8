"""The `data` section of a config: which sources to read and how to clean, dedup, mix and pack them.

Every field carries its help text (via `opt`), so `lmforge data --help` is generated from here.
`validate()` runs when the config is loaded; it names the dotted key at fault (`data.clean.min_chars`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ..config import opt
from ..core.errors import ConfigError

FORMATS = ("auto", "txt", "jsonl", "parquet", "hf_disk")

# Lines that are web furniture rather than content (in the spirit of C4's line filters), English and Chinese.
BOILERPLATE_PATTERNS = (
    r"all rights reserved", r"^(copyright|©|\(c\))\s", r"subscribe to (our|the) newsletter", r"^share (this|on)\b",
    r"^advertisement$", r"cookie policy|we use cookies", r"enable javascript|javascript is disabled",
    r"^posted (by|on)\b", r"^text is available under", r"^(read more|click here)\b",
    r"版权所有", r"不得转载", r"订阅我们的", r"^分享到", r"^广告$", r"^点击(这里|此处)",
)


@dataclass
class SourceConfig:
    """One input source: a file, a directory or a glob, read in one format."""

    path: str = opt("", "file, directory (read recursively) or glob pattern (e.g. corpus/*.jsonl)")
    name: str = opt("", "name used in stats and meta.json; defaults to the file or directory stem")
    weight: float = opt(1.0, "sampling weight when mixing sources (relative probability of drawing a document)")
    format: Literal["auto", "txt", "jsonl", "parquet", "hf_disk"] = opt(
        "auto", "auto (by extension; a save_to_disk directory is hf_disk), txt, jsonl, parquet or hf_disk"
    )
    text_field: str = opt("text", "field/column holding the text (jsonl, parquet, hf_disk)")
    txt_mode: Literal["line", "paragraph", "file"] = opt(
        "line", "txt only: one document per line, per blank-line-separated paragraph, or per whole file"
    )
    split: str = opt("train", "hf_disk only: split to read when the directory holds a DatasetDict")
    max_docs: int = opt(0, "read at most this many documents from the source (0 = all)")


@dataclass
class CleanConfig:
    """Normalisation and quality filters, in the spirit of Gopher / RefinedWeb, applied per document."""

    enabled: bool = opt(True, "run the cleaner at all (false = pass documents through untouched)")
    strip_html: bool = opt(True, "remove HTML tags, <script>/<style> bodies and decode entities (&amp; -> &)")
    nfkc: bool = opt(True, "Unicode NFKC normalisation (full-width digits/letters -> ASCII, ligatures split)")
    nfkc_keep_cjk_punctuation: bool = opt(
        True, "in texts with Chinese/Japanese characters keep full-width punctuation (，：？！（）) that NFKC "
        "would turn into ASCII"
    )
    strip_control: bool = opt(True, "remove control and invisible format characters (keeps \\n and \\t)")
    boilerplate_patterns: list[str] = opt(
        list(BOILERPLATE_PATTERNS),
        "regexes (case-insensitive, ^/$ per line): a line of at most 200 characters matching one is removed "
        "(C4-style web boilerplate: copyright, share/subscribe, cookie notices); [] = off",
    )
    normalize_whitespace: bool = opt(
        True, "collapse runs of spaces, strip line ends, at most one blank line between paragraphs"
    )
    min_chars: int = opt(20, "drop documents shorter than this many characters after cleaning")
    max_chars: int = opt(1_000_000, "drop documents longer than this many characters (0 = no limit)")
    max_duplicate_line_fraction: float = opt(
        0.3, "drop a document when more than this fraction of its lines repeat an earlier line (Gopher: 0.3; 1 = off)"
    )
    top_ngram_fractions: list[float] = opt(
        [0.50, 0.45, 0.45],
        "limits for n = 2, 3, 4: drop a document when its most common word n-gram covers more than this "
        "fraction of its word characters; CJK characters count as words. Gopher used [0.20, 0.18, 0.16] on web "
        "pages; the looser defaults let short entity-centred texts (bios, Q&A, the embedded corpus), which "
        "repeat a name, survive while repetitive spam does not; [] = off",
    )
    duplicate_ngram_fractions: list[float] = opt(
        [0.60, 0.56, 0.52, 0.48, 0.44, 0.40],
        "limits for n = 5, 6, ..., 10: drop a document when repeats of word n-grams cover more than this "
        "fraction of its word characters. Gopher: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]; the defaults are 4x "
        "looser for the same reason; [] = off",
    )
    max_char_repetition: float = opt(
        0.5, "drop a document when its most frequent character 10-grams (top sqrt(#distinct)) make up more "
        "than this fraction of all its 10-grams (BLOOM's character repetition ratio; 1 = off)",
    )
    min_words_for_repetition: int = opt(
        50, "the word n-gram filters only judge documents with at least this many words (short texts are noisy)"
    )


@dataclass
class DedupConfig:
    """Exact and near-duplicate removal across all sources; the first occurrence is kept."""

    exact: bool = opt(True, "drop documents whose normalised text (lower-cased, whitespace-collapsed) was seen")
    minhash: bool = opt(True, "drop near-duplicates found with MinHash-LSH")
    num_perm: int = opt(128, "MinHash permutations (signature length); more = better Jaccard estimates, slower")
    threshold: float = opt(0.8, "estimated Jaccard similarity at or above which a document is a near-duplicate")
    bands: int = opt(0, "LSH bands (0 = choose bands and rows from threshold and num_perm)")
    rows: int = opt(0, "LSH rows per band (0 = choose from threshold; bands * rows must be <= num_perm)")
    shingle_size: int = opt(5, "characters per shingle (character shingles work for Chinese too)")
    verify: bool = opt(
        True, "confirm an LSH candidate by comparing full signatures (fewer false positives; keeps signatures)"
    )


@dataclass
class DataConfig:
    """Read -> clean -> dedup -> mix -> tokenize + pack into shards (see DESIGN.md, Data)."""

    sources: list[SourceConfig] = opt([], "input sources: list of {path, weight, format, text_field, name, ...}")
    clean: CleanConfig = opt(CleanConfig, "cleaning and quality filters")
    dedup: DedupConfig = opt(DedupConfig, "exact and near-duplicate removal")
    tokenizer: str = opt("", "directory of the trained tokenizer (tokenizer.json) used to tokenize")
    output_dir: str = opt("runs/data", "where shards, meta.json, stats.json and stats.md are written")
    shard_size_tokens: int = opt(50_000_000, "tokens per shard file (the last shard of a split may be shorter)")
    val_fraction: float = opt(0.01, "fraction of documents sent to the val split (decided by a hash of the text)")
    seed: int = opt(1234, "seed for mixing, the train/val split hash and MinHash permutations")
    on_error: Literal["raise", "skip"] = opt(
        "raise", "a malformed input line: raise (stop, naming file:line) or skip (and count it)"
    )
    chunk_docs: int = opt(
        1000, "documents per processing chunk (bounds memory; tokenized in one parallel call); a chunk also ends "
        "at 4M characters, so long documents cannot blow it up"
    )
    mix_stopping: Literal["all_exhausted", "first_exhausted"] = opt(
        "all_exhausted",
        "all_exhausted: keep drawing from the remaining sources until all are used up (all data kept); "
        "first_exhausted: stop when any source runs dry, so realised proportions follow the weights",
    )
    overwrite: bool = opt(False, "replace a complete dataset already in output_dir")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad key; called by load_config and run_data_pipeline."""
        names: set[str] = set()
        for i, src in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not src.path:
                raise ConfigError(f"{key}.path is empty: give a file, directory or glob")
            if src.format not in FORMATS:
                raise ConfigError(f"{key}.format={src.format!r} is not one of {list(FORMATS)}")
            if not src.weight > 0:
                raise ConfigError(f"{key}.weight={src.weight!r} must be > 0")
            if src.max_docs < 0:
                raise ConfigError(f"{key}.max_docs={src.max_docs} must be >= 0 (0 = all)")
            if not src.text_field:
                raise ConfigError(f"{key}.text_field is empty")
            name = source_name(src)
            if name in names:
                raise ConfigError(f"{key}.name={name!r} is used by two sources; give each a distinct name")
            names.add(name)
        self._validate_clean()
        self._validate_dedup()
        if self.shard_size_tokens < 1:
            raise ConfigError(f"data.shard_size_tokens={self.shard_size_tokens} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.chunk_docs < 1:
            raise ConfigError(f"data.chunk_docs={self.chunk_docs} must be >= 1")
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"data.on_error={self.on_error!r} is not one of ['raise', 'skip']")
        if self.mix_stopping not in ("all_exhausted", "first_exhausted"):
            raise ConfigError(
                f"data.mix_stopping={self.mix_stopping!r} is not one of ['all_exhausted', 'first_exhausted']"
            )

    def _validate_clean(self) -> None:
        c = self.clean
        if c.min_chars < 0:
            raise ConfigError(f"data.clean.min_chars={c.min_chars} must be >= 0")
        if c.max_chars < 0 or (c.max_chars and c.max_chars < c.min_chars):
            raise ConfigError(f"data.clean.max_chars={c.max_chars} must be 0 (no limit) or >= min_chars={c.min_chars}")
        for key in ("max_duplicate_line_fraction", "max_char_repetition"):
            value = getattr(c, key)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.clean.{key}={value} must be in [0, 1]")
        for key in ("top_ngram_fractions", "duplicate_ngram_fractions"):
            for j, value in enumerate(getattr(c, key)):
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(f"data.clean.{key}[{j}]={value} must be in [0, 1]")
        for j, pattern in enumerate(c.boilerplate_patterns):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(
                    f"data.clean.boilerplate_patterns[{j}]={pattern!r} is not a valid regex: {e}") from None
        if c.min_words_for_repetition < 0:
            raise ConfigError(f"data.clean.min_words_for_repetition={c.min_words_for_repetition} must be >= 0")

    def _validate_dedup(self) -> None:
        d = self.dedup
        if d.num_perm < 2:
            raise ConfigError(f"data.dedup.num_perm={d.num_perm} must be >= 2")
        if not 0.0 < d.threshold <= 1.0:
            raise ConfigError(f"data.dedup.threshold={d.threshold} must be in (0, 1]")
        if d.shingle_size < 1:
            raise ConfigError(f"data.dedup.shingle_size={d.shingle_size} must be >= 1")
        if d.bands < 0 or d.rows < 0:
            raise ConfigError(f"data.dedup.bands={d.bands} / rows={d.rows} must be >= 0 (0 = automatic)")
        if (d.bands == 0) != (d.rows == 0):
            raise ConfigError(
                f"data.dedup.bands={d.bands}, rows={d.rows}: set both, or leave both 0 to derive them from threshold"
            )
        if d.bands * d.rows > d.num_perm:
            raise ConfigError(
                f"data.dedup.bands * rows = {d.bands} * {d.rows} = {d.bands * d.rows} exceeds num_perm={d.num_perm}"
            )


def source_name(src: SourceConfig) -> str:
    """The name a source goes by in stats: its `name`, else the stem of its path."""
    if src.name:
        return src.name
    parts = [p for p in src.path.replace("\\", "/").split("/") if p]
    # a glob's pattern makes a poor name ("*"); its directory names the source better
    while len(parts) > 1 and any(ch in parts[-1] for ch in "*?["):
        parts.pop()
    path = src.path
    stem = parts[-1] if parts else path
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".txt", ".text", ".md"):
        if stem.endswith(ext) and len(stem) > len(ext):
            stem = stem[: -len(ext)]
    return stem or path
