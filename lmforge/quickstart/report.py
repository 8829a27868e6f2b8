"""report.md + loss_curve.png: each quickstart stage's effect as numbers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.io import atomic_write_text
from ..train.metrics import read_metrics


def plot_loss_curve(run_dir: Path, out_png: Path) -> None:
    """Training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("lmforge quickstart: pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)


def chars_per_token(tokenizer, corpus_dir: Path) -> dict[str, float]:
    """Compression of the tokenizer on the held-out validation documents, per language."""
    chars: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for path in sorted((corpus_dir / "validation").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = tokenizer.encode_batch([r["text"] for r in rows])
        for row, row_ids in zip(rows, ids):
            chars[row["lang"]] = chars.get(row["lang"], 0) + len(row["text"])
            tokens[row["lang"]] = tokens.get(row["lang"], 0) + len(row_ids)
    return {lang: chars[lang] / max(1, tokens[lang]) for lang in sorted(chars)}


def _fmt(x: Any, spec: str = ",") -> str:
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def write_report(results: dict[str, Any], tokenizer) -> Path:
    out = Path(results["out_dir"])
    pre = results["pretrain"]
    run_dir = Path(pre["model_dir"]).parent
    plot_loss_curve(run_dir, out / "loss_curve.png")
    manifest, data, timings = results["manifest"], results["data"], results["timings"]
    noise, docs = manifest["noise"], data["documents"]
    before, after = pre.get("initial_val", {}), pre
    cpt = chars_per_token(tokenizer, out / "corpus")
    rb, ra = results["recall_before"], results["recall_after"]
    lines = [
        "# lmforge quickstart report", "",
        f"Total wall time **{timings['total']:.0f} s** on this machine "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items() if k != 'total')}).", "",
        "## 1. Corpus (embedded, generated)", "",
        f"A world of {manifest['world']['facts']:,} facts about {manifest['world']['people']} people, "
        f"{manifest['world']['cities']} cities, {manifest['world']['countries']} countries and "
        f"{manifest['world']['companies']} companies, described in English and Chinese. Each fact appears in "
        f"{manifest['fact_mentions']['min']}–{manifest['fact_mentions']['median']}+ documents.", "",
        "| split | documents | characters |", "|---|---:|---:|",
        *(f"| {name} | {s['docs']:,} | {s['chars']:,} |" for name, s in manifest["splits"].items()), "",
        "## 2. Tokenizer", "",
        f"{results['tokenizer']['kind']}, vocabulary {results['tokenizer']['vocab_size']:,}. "
        "Characters per token on held-out documents: "
        + ", ".join(f"{lang} {v:.2f}" for lang, v in cpt.items()) + ".", "",
        "## 3. Data: cleaning and dedup", "",
        "The corpus' training split carries injected dirt; the pipeline should find it.", "",
        "| dirt | injected | found by the pipeline |", "|---|---:|---:|",
        f"| exact duplicates | {noise['exact_duplicates']:,} | {docs['exact_duplicates']:,} removed |",
        f"| near duplicates | {noise['near_duplicates']:,} | {docs['near_duplicates']:,} removed (MinHash-LSH) |",
        f"| junk documents (≤ {noise['junk_max_chars']} chars) | {noise['short_junk']:,} | "
        f"{data['removed_by_cleaning'].get('too_short', 0) + data['removed_by_cleaning'].get('empty', 0):,} removed |",
        f"| HTML-wrapped documents | {noise['html']:,} | {data['modified_by_cleaning'].get('html', 0):,} stripped |",
        f"| Unicode dirt (full-width, control chars) | {noise['unicode']:,} | "
        f"{data['modified_by_cleaning'].get('nfkc', 0):,} NFKC-normalised |",
        f"| boilerplate lines | {sum(noise['boilerplate_lines'].values()):,} | "
        f"{data['modified_by_cleaning'].get('boilerplate_lines_removed', 0):,} removed |", "",
        f"Read {docs['read']:,} documents, wrote {docs['written']:,}: "
        f"{data['splits']['train']['tokens']:,} train and {data['splits']['val']['tokens']:,} validation tokens "
        f"({data['throughput']['tokens_per_second']:,} tokens/s).", "",
        "## 4. Pretraining", "",
        f"{pre['num_params'] / 1e6:.2f}M-parameter Llama, {pre['steps']} steps, {pre['tokens_seen']:,} tokens, "
        f"precision {pre['precision']}.", "",
        "| | before | after |", "|---|---:|---:|",
        f"| validation loss (nats/token) | {before.get('val_loss', float('nan')):.3f} | {after.get('val_loss', float('nan')):.3f} |",
        f"| validation perplexity | {before.get('val_ppl', float('nan')):.1f} | {after.get('val_ppl', float('nan')):.2f} |",
        f"| fact recall, English | {rb.get('en', 0):.1%} | {ra.get('en', 0):.1%} |",
        f"| fact recall, Chinese | {rb.get('zh', 0):.1%} | {ra.get('zh', 0):.1%} |", "",
        f"Training throughput {pre['tgs_steady']:,.0f} tokens/s (steady state), MFU {pre['mfu_steady']:.1%} of the "
        f"measured {pre['peak_flops'] / 1e9:.0f} GFLOP/s matmul peak; wall {pre['wall_seconds']:.0f} s.", "",
        "![loss curve](loss_curve.png)", "",
        "## 5. Fact recall after pretraining", "",
        "The prompt is a fact statement cut before its object; a hit is a model whose greedy prediction "
        "reproduces every token of the object.", "",
        "| prompt | greedy prediction | hit |", "|---|---|:-:|",
        *(f"| {p} | {c.strip().replace('|', '/').replace(chr(10), ' ')} | {'✓' if h else '✗'} |"
          for p, c, h in results["recall_rows"][:12]), "",
        "## 6. Samples (temperature 0.8, top-p 0.95, KV-cache generation)", "",
        *(f"- **{p}**{c}" for p, c in results["samples"]), "",
        f"Generation speed: {results['generation_tokens_per_second']:.0f} tokens/s (batch of "
        f"{len(results['samples'])}, fp32).", "",
        *_finetune_section(results), *_eval_section(results), *_serve_section(results),
        "## Rerun any stage by hand", "",
        "```", "lmforge corpus --config recipes/quickstart/corpus.yaml",
        "lmforge tokenizer --config recipes/quickstart/tokenizer.yaml",
        "lmforge data --config recipes/quickstart/data.yaml",
        "lmforge pretrain --config recipes/quickstart/pretrain.yaml",
        f"lmforge generate --model {pre['model_dir']} --prompt \"{results['samples'][0][0]}\" --temperature 0.8",
        "lmforge finetune --config recipes/quickstart/sft.yaml finetune.method=full train.lr=3e-4 "
        "train.out_dir=runs/quickstart/sft_full",
        "lmforge finetune --config recipes/quickstart/sft.yaml                    # LoRA",
        "lmforge eval --config recipes/suites/quickstart.yaml",
        "lmforge serve --model runs/quickstart/sft_full/model",
        "```", "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _finetune_section(results: dict[str, Any]) -> list[str]:
    sft = results.get("sft") or {}
    if not sft:
        return []
    rows = []
    for name, s in sft.items():
        before = s.get("initial_val", {}).get("val_loss", float("nan"))
        rows.append(f"| {name} | {s['trainable_params']:,} ({s['trainable_share']:.2%}) | {s['steps']} | "
                    f"{before:.3f} → {s.get('val_loss', float('nan')):.3f} | {s['tokens_per_second']:,.0f} | "
                    f"{s['peak_memory_mb']:,.0f} MB | {s['wall_seconds']:.0f} s |")
    return ["## 7. Fine-tuning (SFT on the world's Q&A about training-split facts)", "",
            "Both runs start from the pretrained model and train on conversations about the *training* facts "
            "only (chat template, loss on the assistant's tokens); the held-out facts were seen in pretraining "
            "text but never as questions.", "",
            "| method | trainable params | steps | held-out val loss | tokens/s | peak memory | wall |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows, ""]


def _metric(task: dict[str, Any] | None, key: str) -> str:
    if not task or key not in task["metrics"]:
        return "–"
    value = task["metrics"][key]
    return f"{value:.1%}" if key != "perplexity" else f"{value:.2f}"


def _eval_section(results: dict[str, Any]) -> list[str]:
    evaluation = results.get("eval")
    if not evaluation:
        return []
    rows = []
    for name, entry in evaluation["models"].items():
        tasks = entry["tasks"]
        rows.append(f"| {name} | {_metric(tasks.get('qa_en'), 'contains')} | {_metric(tasks.get('qa_zh'), 'contains')} "
                    f"| {_metric(tasks.get('qa_en'), 'em')} | {_metric(tasks.get('mc_en'), 'acc')} | "
                    f"{_metric(tasks.get('mc_zh'), 'acc')} | {_metric(tasks.get('ppl_val'), 'perplexity')} |")
    return ["## 8. Evaluation: base vs full SFT vs LoRA on held-out facts", "",
            "QA: the model answers a question about a held-out fact (greedy, through the inference engine); "
            "*answer found* = the expected object appears in the reply, *exact* = the reply is exactly the "
            "reference (the SFT answers are whole sentences, so exact match stays low by design). MC: four "
            "options, 2-shot, the option whose text the model finds most likely (chance 25%).", "",
            "| model | QA en, answer found | QA zh, answer found | QA en, exact | MC en | MC zh | val PPL |",
            "|---|---:|---:|---:|---:|---:|---:|", *rows, "",
            "Full tables (per subject, robustness under typos and shuffled options, cost, contamination): "
            "[eval/report.md](eval/report.md), [eval/report.html](eval/report.html).", ""]


def _serve_section(results: dict[str, Any]) -> list[str]:
    served = results.get("serve")
    if not served:
        return []
    ttft = served["ttft_seconds"]
    return ["## 9. Serving", "",
            "`lmforge serve` started as a subprocess on the full-SFT model; one streamed chat request through "
            "the official `openai` client; then Ctrl-C (the server drains and exits).", "",
            f"- **user:** {served['question']}", f"- **assistant:** {served['reply']}", "",
            f"Server ready in {served['startup_seconds']:.1f} s; time to first token "
            f"{'–' if ttft is None else f'{ttft * 1000:.0f} ms'}; {served['completion_tokens']} tokens at {served['tokens_per_second']:.0f} "
            f"tokens/s; `/metrics` exposed {served['metrics_lines']} lmforge sample lines.", ""]
