"""Eval reports from results.json: report.md (tables + chart files) and a self-contained report.html.

Models sit side by side in columns (base vs SFT vs LoRA vs quantized...), one row per task metric; then
per-subject breakdowns, robustness, cost (time, tokens/s, peak memory) and contamination. Charts are drawn
with matplotlib's Agg backend; the HTML page embeds them as base64 PNGs, so it is one file to send around.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

from ..core.io import atomic_write_bytes, atomic_write_text

HEADLINE = {"ppl": ["perplexity", "bits_per_byte"], "mc": ["acc", "acc_norm", "acc_gen"], "gen": None, "code": None}
LOWER_IS_BETTER = {"perplexity", "bits_per_byte", "nats_per_token", "no_answer_rate"}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.2f}"
    return str(value)


def headline_metrics(results: dict[str, Any], task: str) -> list[str]:
    """The metrics a task is compared on: its type's headline ones that some model reported."""
    spec = results["tasks"][task]
    wanted = HEADLINE.get(spec["type"]) or spec.get("metrics") or []
    seen = [m for m in wanted if any(m in e["tasks"].get(task, {}).get("metrics", {})
                                     for e in results["models"].values())]
    return seen


def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (task, metric), one column per model."""
    models = list(results["models"])
    rows = []
    for task in results["tasks"]:
        for metric in headline_metrics(results, task):
            arrow = " ↓" if metric in LOWER_IS_BETTER else ""
            rows.append([task, metric + arrow] + [_fmt(results["models"][m]["tasks"].get(task, {}).get("metrics", {})
                                                       .get(metric)) for m in models])
    return ["task", "metric", *models], rows


def subject_tables(results: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per task with subjects: rows = subjects, columns = models (acc for mc, the first metric for gen)."""
    models = list(results["models"])
    out = {}
    for task, spec in results["tasks"].items():
        per_model = {m: results["models"][m]["tasks"].get(task, {}).get("subjects") or {} for m in models}
        subjects = sorted({s for v in per_model.values() for s in v})
        if not subjects:
            continue
        metric = "acc" if spec["type"] == "mc" else next((m for m in spec.get("metrics", []) if m != "bleu"), "em")
        rows = [[s, _fmt(next((v[s]["num_questions" if "num_questions" in v[s] else "num_items"]
                               for v in per_model.values() if s in v), None))]
                + [_fmt(per_model[m].get(s, {}).get(metric)) for m in models] for s in subjects]
        out[f"{task} ({metric})"] = (["subject", "n", *models], rows)
    return out


def robustness_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    models = list(results["models"])
    rows = []
    for task in results["tasks"]:
        robust = {m: results["models"][m]["tasks"].get(task, {}).get("robustness") for m in models}
        if not any(robust.values()):
            continue
        variants = next(r for r in robust.values() if r)["accuracy"]
        for name in variants:
            rows.append([task, f"accuracy: {name}"] + [_fmt((robust[m] or {}).get("accuracy", {}).get(name))
                                                       for m in models])
        for key in ("consistency", "consistent_correct"):
            rows.append([task, key] + [_fmt((robust[m] or {}).get(key)) for m in models])
    return ["task", "measure", *models], rows


def efficiency_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for model, entry in results["models"].items():
        for task, t in entry["tasks"].items():
            e = t.get("efficiency", {})
            rows.append([model, task, _fmt(e.get("seconds")), _fmt(e.get("prompt_tokens_per_s")),
                         _fmt(e.get("generated_tokens_per_s")), _fmt(e.get("latency_s_per_request")),
                         _fmt(e.get("peak_memory_mb"))])
    return ["model", "task", "seconds", "prompt tok/s", "generated tok/s", "s / request", "peak MB"], rows


def contamination_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[task, _fmt(c["num_items"]), _fmt(c["contaminated_share"]), _fmt(c["mean_overlap"]),
             f"{c['n']} / {c['short_n']}"] for task, c in (results.get("contamination") or {}).items()]
    return ["task", "items", "contaminated share", "mean overlap", "n / short n"], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def chart_png(results: dict[str, Any]) -> bytes | None:
    """One bar panel per task (its first headline metric), a bar per model; None when nothing to draw."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    panels = []
    for task in results["tasks"]:
        metrics = headline_metrics(results, task)
        if metrics:
            metric = metrics[0]
            values = [results["models"][m]["tasks"].get(task, {}).get("metrics", {}).get(metric) for m in models]
            panels.append((task, metric, [v if isinstance(v, (int, float)) else float("nan") for v in values]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(max(3.2 * len(panels), 4.5), 3.4), dpi=100, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (task, metric, values) in zip(axes[0], panels):
        bars = ax.bar(range(len(models)), values, color=[colours[i % len(colours)] for i in range(len(models))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        finite = [v for v in values if not math.isnan(v)]
        if finite and metric not in LOWER_IS_BETTER and all(0.0 <= v <= 1.0 for v in finite):
            ax.set_ylim(0.0, 1.1)  # a rate: show it on its whole scale
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{task}: {metric}" + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _sections(results: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    sections = [("Scores", summary_table(results))]
    sections += [(f"Per subject: {name}", table) for name, table in subject_tables(results).items()]
    for title, table in (("Robustness", robustness_table(results)), ("Cost", efficiency_table(results)),
                         ("Contamination", contamination_table(results))):
        if table[1]:
            sections.append((title, table))
    return sections


def _intro(results: dict[str, Any]) -> str:
    env = results.get("environment", {})
    return (f"{len(results['models'])} model(s) × {len(results['tasks'])} task(s), seed {results['seed']}, "
            f"{results['timings'].get('total', 0):.1f} s on {env.get('device', '?')} "
            f"(torch {env.get('torch', '?')}, {env.get('threads', '?')} threads).")


def write_reports(results: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """report.md (+ charts/scores.png) and report.html (chart embedded) in out_dir."""
    out = Path(out_dir)
    png = chart_png(results)
    md = ["# lmforge eval report", "", _intro(results), ""]
    if png:
        atomic_write_bytes(out / "charts" / "scores.png", png)
        md += ["![scores](charts/scores.png)", ""]
    for title, (header, rows) in _sections(results):
        md += [f"## {title}", "", markdown_table(header, rows), ""]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}td:first-child,th:first-child,td:nth-child(2){text-align:left}"
             "th{background:#f3f3f3}img{max-width:100%}")
    body = [f"<h1>lmforge eval report</h1><p>{html.escape(_intro(results))}</p>"]
    if png:
        body.append(f'<img alt="scores" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')
    for title, (header, rows) in _sections(results):
        body.append(f"<h2>{html.escape(title)}</h2>{html_table(header, rows)}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lmforge eval report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    html_path = out / "report.html"
    atomic_write_text(html_path, page)
    return md_path, html_path
