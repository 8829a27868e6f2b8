"""Pretrain a decoder-only model (from scratch, or continue from an HF checkpoint) on packed token shards.

    lmforge pretrain --config recipes/quickstart/pretrain.yaml train.max_steps=200
    lmforge pretrain ... train.resume=auto            # continue an interrupted run exactly
    torchrun --nproc_per_node 2 -m lmforge pretrain ... train.parallel=fsdp
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import opt
from ..train.config import TrainConfig
from .model_section import ModelSection
from .run import run


@dataclass
class Config:
    data: str = opt("runs/quickstart/data", "directory of packed shards written by `lmforge data` (meta.json + *.bin)")
    tokenizer: str = opt("", "tokenizer directory (default: the one recorded in the data's meta.json)")
    model: ModelSection = opt(ModelSection, "model shape (a preset plus overrides) or a checkpoint to continue from")
    train: TrainConfig = opt(TrainConfig, "the training loop")


__all__ = ["Config", "run"]
