"""Reports: models side by side, per-subject tables, robustness/cost/contamination sections, markdown escaping,
and a self-contained HTML page whose chart is an embedded PNG."""
from __future__ import annotations

import base64
import re

from lmforge.eval.report import chart_png, markdown_table, subject_tables, summary_table, write_reports


def _results() -> dict:
    def task(acc, subjects=None, robust=None):
        entry = {"type": "mc", "metrics": {"acc": acc, "acc_norm": acc / 2, "num_questions": 4},
                 "efficiency": {"seconds": 1.5, "prompt_tokens_per_s": 100.0, "generated_tokens_per_s": 0.0,
                                "latency_s_per_request": 0.375, "peak_memory_mb": 512.0}}
        if subjects:
            entry["subjects"] = subjects
        if robust:
            entry["robustness"] = robust
        return entry

    robust = {"accuracy": {"original": 0.5, "typo": 0.25}, "consistency": 0.75, "consistent_correct": 0.25}
    return {
        "seed": 0, "timings": {"total": 3.0}, "environment": {"device": "cpu", "torch": "x", "threads": 2},
        "tasks": {"mc <x>": {"type": "mc", "metrics": ["acc", "acc_norm"]},
                  "ppl": {"type": "ppl", "metrics": ["perplexity", "bits_per_byte"]},
                  "qa": {"type": "gen", "metrics": ["em", "f1"]}},
        "models": {
            "base": {"tasks": {"mc <x>": task(0.5, {"a|b": {"acc": 1.0, "num_questions": 2},
                                                     "c": {"acc": 0.0, "num_questions": 2}}, robust),
                               "ppl": {"type": "ppl", "metrics": {"perplexity": 123.456, "bits_per_byte": 2.5}},
                               "qa": {"type": "gen", "metrics": {"em": 0.0, "f1": 0.1, "num_items": 3}}}},
            "lora": {"tasks": {"mc <x>": task(0.75, {"a|b": {"acc": 0.5, "num_questions": 2},
                                                     "c": {"acc": 1.0, "num_questions": 2}}),
                               "ppl": {"type": "ppl", "metrics": {"perplexity": 20.0, "bits_per_byte": 1.25}},
                               "qa": {"type": "gen", "metrics": {"em": 0.5, "f1": 0.6, "num_items": 3}}}},
        },
        "contamination": {"qa": {"num_items": 3, "contaminated_share": 1 / 3, "mean_overlap": 0.1, "n": 13,
                                 "short_n": 8}},
    }


def test_summary_puts_models_side_by_side():
    header, rows = summary_table(_results())
    assert header == ["task", "metric", "base", "lora"]
    assert ["mc <x>", "acc", "0.5000", "0.7500"] in rows
    assert ["ppl", "perplexity ↓", "123.46", "20.00"] in rows
    assert ["qa", "em", "0.0000", "0.5000"] in rows and ["qa", "f1", "0.1000", "0.6000"] in rows
    assert not any(r[1] == "num_questions" for r in rows)


def test_subject_breakdown():
    tables = subject_tables(_results())
    header, rows = tables["mc <x> (acc)"]
    assert header == ["subject", "n", "base", "lora"]
    assert rows == [["a|b", "2", "1.0000", "0.5000"], ["c", "2", "0.0000", "1.0000"]]


def test_markdown_escapes_pipes():
    assert markdown_table(["a", "b"], [["x|y", "1"]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_reports_written_and_html_self_contained(tmp_path):
    md_path, html_path = write_reports(_results(), tmp_path)
    md = md_path.read_text(encoding="utf-8")
    for heading in ("## Scores", "## Per subject: mc <x> (acc)", "## Robustness", "## Cost", "## Contamination"):
        assert heading in md
    assert "| a\\|b | 2 | 1.0000 | 0.5000 |" in md and "| qa | 3 | 0.3333 | 0.1000 | 13 / 8 |" in md
    assert "![scores](charts/scores.png)" in md and (tmp_path / "charts" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    page = html_path.read_text(encoding="utf-8")
    assert "mc &lt;x&gt;" in page
    assert "mc <x>" not in page  # escaped
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere


def test_chart_skipped_without_numbers():
    empty = {"tasks": {"t": {"type": "mc", "metrics": ["acc"]}}, "models": {"m": {"tasks": {}}}}
    assert chart_png(empty) is None
    assert chart_png(_results())[:4] == b"\x89PNG"
