"""The whole chain on the embedded corpus, in minutes on a laptop CPU, with a report of every stage's numbers.

    lmforge quickstart                       # writes runs/quickstart/report.md (+ loss_curve.png, eval/report.html)
    lmforge quickstart pretrain_steps=100    # shorter
    lmforge quickstart overwrite=true        # replace a previous quickstart

Each stage runs from its recipe in recipes/quickstart/*.yaml, the same files `lmforge <stage> --config` takes,
so every step can be rerun by hand.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from .run import run


@dataclass
class Config:
    out_dir: str = opt("runs/quickstart", "where every stage writes (corpus/, tokenizer/, data/, pretrain/, report.md)")
    overwrite: bool = opt(False, "replace a previous quickstart in out_dir")
    pretrain_steps: int = opt(0, "optimizer steps for pretraining (0 = the recipe's)")
    recall_facts: int = opt(100, "facts sampled for the fact-recall measurement (each in English and Chinese)")
    sft_steps: int = opt(0, "optimizer steps for each fine-tuning run, full SFT and LoRA (0 = the recipe's)")
    eval_limit: int = opt(0, "evaluate at most this many items per task (0 = the suite's limits)")
    serve: bool = opt(True, "end by starting `lmforge serve` and sending it a chat request")
    device: str = opt("auto", "auto | cpu | cuda")
    progress: bool = opt(True, "progress bars")


__all__ = ["Config", "run"]
