"""Supervised fine-tuning (SFT) of an HF checkpoint on conversations: full, freeze, bitfit, LoRA, DoRA, IA3.

    lmforge finetune --config lmforge/recipes/quickstart/sft.yaml finetune.method=lora
    lmforge finetune ... train.resume=auto             # continue an interrupted run exactly

```python
from lmforge.finetune import read_conversations, tokenize_all, SFTBatches
```
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import opt
from ..train.config import TrainConfig
from .data import (Example, SFTBatches, add_neftune, collate, pack_rows, read_conversations, sft_loss,
                   to_messages, tokenize_all, tokenize_conversation)
from .methods import FinetuneSection, apply_method, peak_memory
from .run import run


@dataclass
class ModelSection:
    init_from: str = opt("", "required: the HF model directory to fine-tune (its tokenizer and chat template are used)")
    tokenizer: str = opt("", "tokenizer directory (default: the one in init_from)")


@dataclass
class DataSection:
    path: list[str] = opt([], "SFT JSONL file(s): OpenAI messages, Alpaca or ShareGPT, one conversation a line")
    format: Literal["auto", "messages", "alpaca", "sharegpt"] = opt("auto", "the JSONL layout; auto decides per line")
    val: list[str] = opt([], "validation JSONL file(s); empty = hold out val_fraction of the training file")
    val_fraction: float = opt(0.05, "share of the training conversations held out for validation when val is empty")
    max_seq_len: int = opt(512, "longest tokenised conversation (capped at train.seq_len); longer ones lose their tail")
    packing: bool = opt(False, "pack several conversations per row of train.seq_len tokens (no cross-attention)")
    train_on_prompt: bool = opt(False, "train on every token, not only the assistant replies")
    on_error: Literal["raise", "skip"] = opt("raise", "a bad line: raise (stop with file:line) or skip (and count)")


@dataclass
class Config:
    model: ModelSection = opt(ModelSection, "the model to start from")
    data: DataSection = opt(DataSection, "the SFT conversations")
    finetune: FinetuneSection = opt(FinetuneSection, "the method and its options")
    train: TrainConfig = opt(TrainConfig, "the training loop (train.seq_len = packed row length)")


__all__ = ["Config", "ModelSection", "DataSection", "FinetuneSection", "run", "read_conversations", "to_messages",
           "tokenize_conversation", "tokenize_all", "Example", "SFTBatches", "collate", "pack_rows", "sft_loss",
           "add_neftune", "apply_method", "peak_memory"]
