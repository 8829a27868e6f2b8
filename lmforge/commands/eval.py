r"""Evaluate one model or a suite of models: perplexity, multiple choice, generative QA, code (pass@k),
with robustness, cost and contamination, into <out_dir>/results.json + report.md + report.html.

    lmforge eval --model runs/qs/pretrain/model --tasks ppl,mc ppl.path=runs/qs/corpus/validation \
        mc.path=runs/qs/corpus/tasks/mc_en_test.jsonl mc.dev_path=runs/qs/corpus/tasks/mc_en_train.jsonl mc.shots=2
    lmforge eval --model M --adapter runs/qs/sft/adapter --chat true --tasks gen gen.path=qa_en_test.jsonl
    lmforge eval --config lmforge/recipes/suites/quickstart.yaml contamination.train=runs/qs/data
"""
from __future__ import annotations

from typing import Any

from ..config import to_dict
from ..eval.suite import Config, model_specs, task_specs

__all__ = ["Config", "run"]


def run(cfg: Config) -> dict[str, Any]:
    from ..eval.harness import evaluate

    results = evaluate(model_specs(cfg), task_specs(cfg), out_dir=cfg.out_dir, seed=cfg.seed, device=cfg.device,
                       batch_size=cfg.batch_size, samples=cfg.samples, contamination=cfg.contamination,
                       robustness=cfg.robustness, report=cfg.report, overwrite=cfg.overwrite, config=to_dict(cfg))
    print(f"eval done in {results['timings']['total']:.1f}s -> {cfg.out_dir}/results.json"
          + (f", {cfg.out_dir}/report.html" if cfg.report else ""))
    return results
