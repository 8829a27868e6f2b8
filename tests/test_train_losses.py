"""The chunked cross-entropy equals F.cross_entropy on fp32 logits: loss and gradient, ignore_index included."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.train import losses
from lmforge.train.losses import IGNORE_INDEX, ChunkedCrossEntropy, causal_lm_loss, token_cross_entropy


def reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad wrt logits) of F.cross_entropy on the fp32 upcast, the grad in the logits' dtype."""
    leaf = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(leaf.float(), labels, ignore_index=IGNORE_INDEX)
    loss.backward()
    return loss.detach(), leaf.grad


def chunked(logits: torch.Tensor, labels: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = logits.detach().clone().requires_grad_()
    loss = ChunkedCrossEntropy.apply(leaf, labels)
    (loss * scale).backward() if scale != 1.0 else loss.backward()
    return loss.detach(), leaf.grad


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: several chunks, a ragged last one


def make(rows: int = 37, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=generator) * 4
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::3] = IGNORE_INDEX
    labels[-1] = IGNORE_INDEX
    return logits, labels


def test_chunked_cross_entropy_matches_f_cross_entropy_with_ignore_index(small_chunks):
    logits, labels = make()
    loss, grad = chunked(logits, labels)
    ref_loss, ref_grad = reference(logits, labels)
    assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=0)
    assert torch.allclose(grad, ref_grad, atol=1e-5, rtol=0)
    assert grad[::3].abs().max() == 0  # ignored rows get no gradient


def test_chunked_cross_entropy_on_bf16_logits_matches_fp32_upcast(small_chunks):
    logits, labels = make(seed=1)
    logits = logits.bfloat16()
    loss, grad = chunked(logits, labels)
    ref_loss, ref_grad = reference(logits, labels)
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(loss, ref_loss, atol=1e-5, rtol=0)
    assert torch.allclose(grad.float(), ref_grad.float(), atol=1e-5, rtol=0)


def test_chunked_cross_entropy_scales_with_the_upstream_gradient(small_chunks):
    logits, labels = make(seed=2)
    _, grad = chunked(logits, labels, scale=0.25)
    _, ref_grad = reference(logits, labels)
    assert torch.allclose(grad, 0.25 * ref_grad, atol=1e-6, rtol=0)


def test_all_labels_ignored_gives_nan_loss_and_zero_gradient_like_f_cross_entropy():
    logits = torch.randn(4, 7)
    labels = torch.full((4,), IGNORE_INDEX)
    loss, grad = chunked(logits, labels)
    ref_loss, ref_grad = reference(logits, labels)
    assert math.isnan(float(loss)) and math.isnan(float(ref_loss))
    assert torch.equal(grad, ref_grad)


def test_token_cross_entropy_without_grad_matches_and_counts_labels():
    logits, labels = make(seed=3)
    with torch.no_grad():
        loss, count = token_cross_entropy(logits[None], labels[None])
    assert count == int((labels != IGNORE_INDEX).sum())
    assert torch.allclose(loss, F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), atol=1e-6, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_causal_lm_loss_gradients_match_plain_cross_entropy(precision):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    model = Transformer(config)
    input_ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, :4] = IGNORE_INDEX
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        out = causal_lm_loss(model, (input_ids, labels))
    out.loss.backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with autocast:
        logits = model(input_ids)
    ref = F.cross_entropy(logits.float().reshape(-1, 97), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    ref.backward()
    assert torch.allclose(out.loss, ref, atol=1e-5, rtol=0)
    assert out.num_tokens == 24
    for name, p in model.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-5, rtol=1e-4), name
