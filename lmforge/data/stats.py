"""The data report: what each stage read, changed, dropped and wrote, as a dict and as markdown.

The numbers answer "what did cleaning/dedup do to my corpus?": documents read, removed per cleaning
reason, exact and near duplicates, characters and tokens per source and split, and the realised mix.
"""
from __future__ import annotations

from typing import Mapping

from .clean import REASONS, Cleaner
from .readers import ReadStats


def build_report(read: Mapping[str, ReadStats], cleaners: Mapping[str, Cleaner], dedup: dict | None,
                 mix: dict, packed: dict, seconds: float) -> dict:
    """One JSON-safe report from the stages' counters (`packed` is `Packer.summary()`)."""
    dedup = dedup or {"exact": {"removed_by_source": {}}, "minhash": {"removed_by_source": {}}}
    sources = {}
    for name, stats in read.items():
        cleaner = cleaners[name]
        per_split = packed["sources"].get(name, {})
        empty = {"documents": 0, "tokens": 0, "chars": 0}
        sources[name] = {
            "files": stats.files, "documents_read": stats.documents, "chars_read": stats.chars,
            "skipped_bad_lines": stats.skipped, "skipped_examples": list(stats.skipped_examples),
            "removed_by_cleaning": {r: n for r, n in cleaner.removed.items() if n},
            "modified_by_cleaning": {k: n for k, n in cleaner.modified.items() if n},
            "boilerplate_lines_removed": cleaner.boilerplate_lines_removed,
            "exact_duplicates": dedup["exact"]["removed_by_source"].get(name, 0),
            "near_duplicates": dedup["minhash"]["removed_by_source"].get(name, 0),
            "drawn_by_mix": mix["documents"].get(name, 0),
            "train": dict(per_split.get("train", empty)), "val": dict(per_split.get("val", empty)),
        }
    splits = packed["splits"]
    documents = {
        "read": sum(s.documents for s in read.values()),
        "skipped_bad_lines": sum(s.skipped for s in read.values()),
        "removed_by_cleaning": sum(sum(c.removed.values()) for c in cleaners.values()),
        "exact_duplicates": sum(s["exact_duplicates"] for s in sources.values()),
        "near_duplicates": sum(s["near_duplicates"] for s in sources.values()),
        "written": splits["train"]["documents"] + splits["val"]["documents"],
    }
    removed = {r: sum(c.removed[r] for c in cleaners.values()) for r in REASONS}
    steps = sorted({step for c in cleaners.values() for step in c.modified})
    modified = {step: sum(c.modified[step] for c in cleaners.values()) for step in steps}
    modified["boilerplate_lines_removed"] = sum(c.boilerplate_lines_removed for c in cleaners.values())
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    token_share = {name: ((s["train"]["tokens"] + s["val"]["tokens"]) / tokens if tokens else 0.0)
                   for name, s in sources.items()}
    chars_read = sum(s.chars for s in read.values())
    return {
        "documents": documents,
        "removed_by_cleaning": removed,
        "modified_by_cleaning": modified,
        "sources": sources,
        "splits": {s: dict(v) for s, v in splits.items()},
        "dedup": dedup,
        "mix": {**mix, "realised_token_proportions": token_share},
        "throughput": {
            "seconds": round(seconds, 3),
            "documents_per_second": round(documents["read"] / seconds, 1) if seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "million_chars_per_second": round(chars_read / 1e6 / seconds, 3) if seconds else None,
        },
    }


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_markdown(report: dict) -> str:
    """The report as a short markdown page (stats.md)."""
    docs = report["documents"]
    out = ["# Data report", ""]
    out += _table(["read", "bad lines skipped", "removed by cleaning", "exact duplicates", "near duplicates",
                   "written"],
                  [[docs["read"], docs["skipped_bad_lines"], docs["removed_by_cleaning"],
                    docs["exact_duplicates"], docs["near_duplicates"], docs["written"]]])
    out += ["", "## Removed by cleaning, per reason", ""]
    out += _table(["reason", "documents"], [[r, n] for r, n in report["removed_by_cleaning"].items()])
    out += ["", "## Changed by cleaning (documents per step; boilerplate in lines)", ""]
    out += _table(["step", "count"], [[k, n] for k, n in report["modified_by_cleaning"].items()])
    out += ["", "## Sources", ""]
    mix = report["mix"]
    rows = []
    for name, s in report["sources"].items():
        rows.append([name, s["documents_read"], s["chars_read"], sum(s["removed_by_cleaning"].values()),
                     s["exact_duplicates"], s["near_duplicates"], s["train"]["documents"], s["train"]["tokens"],
                     s["val"]["documents"], s["val"]["tokens"], mix["target_proportions"].get(name, 0.0),
                     mix["realised_proportions"].get(name, 0.0), mix["realised_token_proportions"].get(name, 0.0)])
    out += _table(["source", "docs read", "chars read", "cleaned out", "exact dups", "near dups", "train docs",
                   "train tokens", "val docs", "val tokens", "target share", "doc share", "token share"], rows)
    out += ["", "## Splits", ""]
    out += _table(["split", "documents", "tokens", "chars"],
                  [[s, v["documents"], v["tokens"], v["chars"]] for s, v in report["splits"].items()])
    t = report["throughput"]
    out += ["", f"Took {t['seconds']} s: {t['documents_per_second']} documents/s, "
                f"{t['tokens_per_second']} tokens/s, {t['million_chars_per_second']} M characters/s.", ""]
    return "\n".join(out)
