"""Optimizer parameter groups for adapter training, with LoRA+ learning rates.

LoRA+ (Hayou et al. 2024): with A and B at one learning rate, B (which starts at zero) learns too slowly
for wide layers; giving B a learning rate `ratio` times A's (ratio ~16) trains faster at no cost. Like peft's
`create_loraplus_optimizer`, vectors (DoRA magnitudes, biases) go with B. The groups plug into
`lmforge.train.optim.build_optimizer(model, cfg, groups)` / `Trainer(param_groups=...)`; each carries its
own "lr", which the LR schedule scales like the default one.
"""
from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, loraplus_lr_ratio: float = 0.0) -> list[dict]:
    """AdamW groups over the trainable parameters: A matrices and other matrices at `lr` with decay; B
    matrices at lr × ratio with decay; DoRA magnitudes and biases at lr × ratio without decay; IA3 vectors,
    norms and embeddings at `lr` without decay (decay would pull a multiplicative scale towards zero).

    ratio <= 0 (or 1) turns LoRA+ off. The group at `lr` comes first, so logging group 0's lr shows the
    base learning rate.
    """
    ratio = loraplus_lr_ratio if loraplus_lr_ratio > 0 else 1.0
    buckets: dict[tuple[float, float], list[nn.Parameter]] = {}
    order = [(lr, weight_decay), (lr, 0.0), (lr * ratio, weight_decay), (lr * ratio, 0.0)]
    for key in order:
        buckets.setdefault(key, [])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_b = ".lora_B." in name or ".lora_magnitude_vector." in name
        vector = param.ndim < 2 or ".ia3_l." in name or "embed" in name or "norm" in name
        group_lr = lr * ratio if is_b else lr
        group_decay = 0.0 if vector else weight_decay
        buckets.setdefault((group_lr, group_decay), []).append(param)
    groups = []
    for (group_lr, group_decay), params in buckets.items():
        if params:
            groups.append({"params": params, "lr": group_lr, "weight_decay": group_decay})
    return groups
