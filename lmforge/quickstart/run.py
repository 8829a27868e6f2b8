"""Run the quickstart stages in order and collect their numbers for the report."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .stages import eval_stage, finetune_stage, load_recipe, serve_stage


def recipe(name: str, out_dir: str, cls: type, overrides: list[str] | None = None):
    """recipes/quickstart/<name>.yaml with its runs/quickstart paths moved under out_dir."""
    return load_recipe(f"quickstart/{name}.yaml", out_dir, cls, overrides)


def run(cfg) -> dict[str, Any]:
    import torch

    from ..commands import corpus as corpus_cmd
    from ..commands import tokenizer as tokenizer_cmd
    from ..core.device import pick_device
    from ..data.config import DataConfig
    from ..data.pipeline import run_data_pipeline
    from ..data.synthetic import make_world_from_config
    from ..infer import generate
    from ..model import Transformer
    from ..pretrain import Config as PretrainConfig
    from ..pretrain import run as pretrain
    from .recall import cloze_prompts, fact_recall
    from .report import write_report

    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise ConfigError(f"{out} already holds a quickstart; pass overwrite=true to replace it "
                              f"(or out_dir=ANOTHER_DIR)")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return time.perf_counter()

    t = stage("1/8 corpus: generate the embedded bilingual world")
    corpus_cfg = recipe("corpus", cfg.out_dir, corpus_cmd.Config)
    manifest = corpus_cmd.run(corpus_cfg)
    timings["corpus"] = time.perf_counter() - t

    t = stage("2/8 tokenizer: train byte-level BPE")
    tok_cfg = recipe("tokenizer", cfg.out_dir, tokenizer_cmd.Config)
    tokenizer = tokenizer_cmd.run(tok_cfg)
    timings["tokenizer"] = time.perf_counter() - t

    t = stage("3/8 data: clean, dedup, mix, tokenize, pack")
    data_cfg = recipe("data", cfg.out_dir, DataConfig)
    data_report = run_data_pipeline(data_cfg, tokenizer)
    timings["data"] = time.perf_counter() - t

    t = stage("4/8 pretrain")
    overrides = [f"train.device={cfg.device}", f"train.progress={str(cfg.progress).lower()}"]
    if cfg.pretrain_steps:
        overrides.append(f"train.max_steps={cfg.pretrain_steps}")
    pre_cfg = recipe("pretrain", cfg.out_dir, PretrainConfig, overrides)
    summary = pretrain(pre_cfg)
    timings["pretrain"] = time.perf_counter() - t

    t = stage("5/8 sample and measure fact recall")
    device = pick_device(cfg.device)
    world = make_world_from_config(corpus_cfg.corpus.seed, corpus_cfg.corpus.world)
    prompts = cloze_prompts(world, cfg.recall_facts, seed=corpus_cfg.corpus.seed)
    trained = Transformer.from_pretrained(summary["model_dir"], device=device, dtype=torch.float32).eval()
    torch.manual_seed(pre_cfg.train.seed)
    untrained = Transformer(trained.config).to(device).eval()
    recall_before, _ = fact_recall(untrained, tokenizer, prompts)
    recall_after, rows = fact_recall(trained, tokenizer, prompts)
    sample_prompts = [prompts[0].prompt, prompts[1].prompt]
    t_gen = time.perf_counter()
    outputs = generate(trained, [tokenizer.encode(p) for p in sample_prompts], 48, temperature=0.8, top_p=0.95,
                       eos_token_id=tokenizer.eos_id, seed=0)
    gen_seconds = time.perf_counter() - t_gen
    samples = [(p, tokenizer.decode(o, skip_special_tokens=True)) for p, o in zip(sample_prompts, outputs)]
    for p, text in samples:
        print(f"sample: {p}\u2192{text}")
    gen_tokens = sum(len(o) for o in outputs)
    timings["sample"] = time.perf_counter() - t
    print(f"fact recall: before {recall_before['all']:.1%} -> after {recall_after['all']:.1%} "
          f"(en {recall_after.get('en', 0):.1%}, zh {recall_after.get('zh', 0):.1%})")

    t = stage("6/8 fine-tune: full SFT and LoRA on the world's question/answer conversations")
    common = [f"train.device={cfg.device}", f"train.progress={str(cfg.progress).lower()}"]
    sft = finetune_stage(cfg.out_dir, common, cfg.sft_steps)
    timings["finetune"] = time.perf_counter() - t

    t = stage("7/8 eval: base vs full SFT vs LoRA on held-out facts")
    evaluation = eval_stage(cfg.out_dir, cfg.device, cfg.eval_limit)
    timings["eval"] = time.perf_counter() - t

    served = None
    if cfg.serve:
        t = stage("8/8 serve: lmforge serve + one chat request through the openai client")
        question = _held_out_question(out)
        served = serve_stage(sft["full"]["model_dir"], question)
        timings["serve"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started

    results = {"manifest": manifest, "tokenizer": {"kind": tok_cfg.tokenizer.kind, "vocab_size": tokenizer.vocab_size},
               "data": data_report, "pretrain": summary, "recall_before": recall_before,
               "recall_after": recall_after, "recall_rows": rows, "samples": samples,
               "generation_tokens_per_second": gen_tokens / gen_seconds, "sft": sft, "eval": evaluation,
               "serve": served, "timings": timings, "out_dir": str(out)}
    report_path = write_report(results, tokenizer)
    qa = {name: _qa_accuracy(evaluation, name) for name in evaluation["models"]}
    print(f"\nquickstart done in {timings['total']:.0f}s: val PPL {summary.get('initial_val', {}).get('val_ppl', float('nan')):.1f}"
          f" -> {summary.get('val_ppl', float('nan')):.2f}, fact recall {recall_before['all']:.0%} -> "
          f"{recall_after['all']:.0%}, held-out QA accuracy " + ", ".join(f"{k} {v:.0%}" for k, v in qa.items())
          + f"; report: {report_path}")
    return results


def _qa_accuracy(evaluation: dict[str, Any], model: str) -> float:
    """Mean `contains` accuracy over the generative QA tasks of one model (the quickstart's headline number)."""
    scores = [t["metrics"].get("contains", t["metrics"].get("em", 0.0))
              for name, t in evaluation["models"][model]["tasks"].items() if t.get("type") == "gen"]
    return sum(scores) / len(scores) if scores else 0.0


def _held_out_question(out: Path) -> str:
    """The first held-out English QA question: what the served model is asked."""
    import json

    path = out / "corpus" / "tasks" / "qa_en_test.jsonl"
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    return first["messages"][-1]["content"]
