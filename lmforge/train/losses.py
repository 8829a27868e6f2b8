"""Loss functions that plug into the Trainer. Each takes (model, batch) and returns a LossOutput."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loop import LossOutput

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labels != -100 (computed in fp32), and the count of those labels."""
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="mean")
    return loss, int((labels != IGNORE_INDEX).sum())


def causal_lm_loss(model: nn.Module, batch: Any) -> LossOutput:
    """Language-modelling loss for a batch `(input_ids, labels)` or a dict with those keys
    (optionally `document_ids` / `position_ids` for packed sequences); adds the MoE balancing loss."""
    if isinstance(batch, dict):
        input_ids, labels = batch["input_ids"], batch["labels"]
        extra = {k: batch[k] for k in ("document_ids", "position_ids") if k in batch}
    else:
        input_ids, labels = batch
        extra = {}
    device = next(model.parameters()).device
    input_ids, labels = input_ids.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    extra = {k: v.to(device) for k, v in extra.items()}
    logits = model(input_ids, **extra)
    ce, _ = token_cross_entropy(logits, labels)
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    aux = getattr(inner, "aux_loss", None)
    metrics = {}
    loss = ce
    if aux is not None and torch.is_tensor(aux) and aux.requires_grad:
        loss = ce + aux
        metrics["aux_loss"] = float(aux.detach())
    metrics["ce_loss"] = float(ce.detach())
    return LossOutput(loss=loss, num_tokens=int(input_ids.numel()), metrics=metrics)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Any) -> dict[str, float]:
    """Token-weighted mean cross-entropy and perplexity over an iterable of (input_ids, labels) batches."""
    import math

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for input_ids, labels in batches:
        input_ids, labels = input_ids.to(device), labels.to(device)
        logits = model(input_ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        return {}
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}
