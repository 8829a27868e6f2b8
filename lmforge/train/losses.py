"""Loss functions that plug into the Trainer. Each takes (model, batch) and returns a LossOutput."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loop import LossOutput

IGNORE_INDEX = -100


# Rows of logits per chunk: ~4 MB of fp32 at a vocabulary of 8192, so a chunk's temporaries stay in cache
# and in the allocator's reused memory instead of fresh pages.
CHUNK_ELEMENTS = 1 << 20


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of [N, V] logits (any float dtype) against [N] labels, ignoring IGNORE_INDEX.

    Equals `F.cross_entropy(logits.float(), labels, ignore_index=-100)` and its gradient, without ever
    holding fp32 copies of all the logits: each chunk of rows is upcast, reduced to its loss, and turned
    into its gradient (softmax - one_hot) / count right away, stored in the logits' dtype for backward.
    Under bf16 autocast this replaces four full-size fp32 tensors (upcast, log-softmax, its gradient, the
    gradient of the upcast) with one bf16 gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, vocab = logits.shape
        valid = labels != IGNORE_INDEX
        count = valid.sum()
        scale = torch.where(valid, 1.0 / count.clamp(min=1), 0.0)  # d(mean)/d(row loss); 0 for ignored rows
        targets = torch.where(valid, labels, 0)[:, None]
        grad = torch.empty_like(logits)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = max(1, CHUNK_ELEMENTS // vocab)
        for start in range(0, rows, step):
            end = min(start + step, rows)
            log_probs = torch.log_softmax(logits[start:end].float(), dim=-1)  # new memory: fp32 logits stay
            total -= (log_probs.gather(1, targets[start:end]).squeeze(1) * valid[start:end]).sum()
            probs = log_probs.exp_()
            probs.scatter_add_(1, targets[start:end], -valid[start:end, None].to(probs.dtype))
            torch.mul(probs, scale[start:end, None], out=grad[start:end])
        ctx.save_for_backward(grad)
        return total / count  # nan when every label is ignored, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            return grad, None  # the common case: skip a full pass over the logits' gradient
        return grad * grad_loss.to(grad.dtype), None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labels != -100 (computed in fp32), and the count of those labels."""
    logits, labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = ChunkedCrossEntropy.apply(logits, labels)
    else:  # nothing to differentiate: no gradient to prepare
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
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
