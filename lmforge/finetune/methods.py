"""Fine-tuning methods: which parameters train, and how (full, freeze, bitfit, lora, dora, ia3).

Each method turns a loaded model into the model to train and says what the saved artefact is: a whole HF
model directory (full, freeze, bitfit) or a PEFT-layout adapter (lora, dora, ia3).
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..config import opt
from ..core.errors import ConfigError

METHODS = ("full", "freeze", "bitfit", "lora", "dora", "ia3")
ADAPTER_METHODS = ("lora", "dora", "ia3")


@dataclass
class FinetuneSection:
    """The `finetune:` section: the method and its options."""

    method: Literal["full", "freeze", "bitfit", "lora", "dora", "ia3"] = opt(
        "lora", "full = every weight; freeze = only the last freeze_layers layers; bitfit = only biases; "
                "lora / dora / ia3 = a PEFT adapter (the base stays frozen)")
    freeze_layers: int = opt(2, "freeze: how many of the last transformer layers train")
    train_norm: bool = opt(True, "freeze: also train the final norm")
    train_head: bool = opt(False, "freeze: also train lm_head (with tied embeddings this trains the embeddings too)")
    r: int = opt(8, "lora/dora: rank")
    alpha: float = opt(16, "lora/dora: scale alpha/r (alpha/sqrt(r) with use_rslora)")
    dropout: float = opt(0.0, "lora/dora: dropout on the adapter branch's input")
    target_modules: list[str] | str = opt(
        "all-linear", "adapter targets: names (q_proj,v_proj), all-linear, or a regex; empty = peft's default")
    use_rslora: bool = opt(False, "rank-stabilised LoRA (alpha/sqrt(r))")
    loraplus_lr_ratio: float = opt(0.0, "LoRA+: B matrices train at lr × this (0 = off; ~16 in the paper)")
    modules_to_save: list[str] = opt([], "adapter methods: modules trained in full and saved with the adapter")
    neftune_alpha: float = opt(0.0, "NEFTune: uniform noise of this alpha on input embeddings in training (0 = off)")
    merge: bool = opt(False, "adapter methods: also save the adapter merged into the base as <out>/model")

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"finetune.method={self.method!r} is not one of {list(METHODS)}")
        if self.method == "freeze" and self.freeze_layers < 0:
            raise ConfigError(f"finetune.freeze_layers={self.freeze_layers} must be >= 0")
        if self.neftune_alpha < 0:
            raise ConfigError(f"finetune.neftune_alpha={self.neftune_alpha} must be >= 0")

    @property
    def is_adapter(self) -> bool:
        return self.method in ADAPTER_METHODS

    def adapter_config(self):
        """The lmforge.peft AdapterConfig this section describes."""
        from ..peft import AdapterConfig

        return AdapterConfig(method=self.method, r=self.r, alpha=self.alpha, dropout=self.dropout,
                             target_modules=self.target_modules, use_rslora=self.use_rslora,
                             loraplus_lr_ratio=self.loraplus_lr_ratio, modules_to_save=list(self.modules_to_save))


@dataclass
class Prepared:
    """The model to train, its optimizer groups (None = the Trainer's default over trainable params)."""

    model: nn.Module
    param_groups: list[dict] | None
    trainable: int
    total: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def apply_method(model: nn.Module, section: FinetuneSection, lr: float, weight_decay: float) -> Prepared:
    """Set requires_grad (or inject the adapter) for `section.method`; the model is changed in place."""
    section.validate()
    method = section.method
    if section.is_adapter:
        from ..peft import apply_adapter, param_groups

        apply_adapter(model, section.adapter_config(), log=None)
        groups = param_groups(model, lr, weight_decay, section.loraplus_lr_ratio)
    else:
        groups = None
        for param in model.parameters():
            param.requires_grad_(method == "full")
        if method == "freeze":
            _unfreeze_last_layers(model, section)
        elif method == "bitfit":
            biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
            if not biases:
                raise ConfigError(
                    f"finetune.method=bitfit: this {getattr(model.config, 'model_type', '')} model has no bias "
                    f"parameters (Llama/Mistral use none; Qwen2 has q/k/v biases), so BitFit would train nothing; "
                    f"use finetune.method=lora or ia3 for a small trainable set")
            for p in biases:
                p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return Prepared(model, groups, trainable, total, names)


def _unfreeze_last_layers(model: nn.Module, section: FinetuneSection) -> None:
    layers = model.model.layers
    n = section.freeze_layers
    if n > len(layers):
        raise ConfigError(f"finetune.freeze_layers={n} but the model has only {len(layers)} layers")
    for layer in list(layers)[len(layers) - n:]:
        layer.requires_grad_(True)
    if section.train_norm:
        model.model.norm.requires_grad_(True)
    if section.train_head:
        model.lm_head.requires_grad_(True)
    if n == 0 and not section.train_norm and not section.train_head:
        raise ConfigError("finetune.method=freeze with freeze_layers=0, train_norm=false, train_head=false "
                          "trains nothing")


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory so far: allocated tensor memory on CUDA, the process's peak resident set on CPU.

    On CPU the figure is the whole process's high-water mark (Python, libraries, data included), the honest
    upper bound that `resource` offers without instrumenting every allocation."""
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20, "peak_memory_kind": "cuda allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    return {"peak_memory_mb": rss_bytes / 2**20, "peak_memory_kind": "process peak RSS"}
