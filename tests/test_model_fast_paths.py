"""The model's CPU fast paths compute what the plain PyTorch ops compute.

- `Linear` (oneDNN for fp32 on CPU) vs F.linear: outputs and all three gradients.
- bf16 `matmul_attention` vs SDPA: against an fp32 reference it is as close as SDPA in bf16 is, for
  every mask the model builds (causal, padding, packing, sliding window, ALiBi), GQA and a head size
  whose scale is not a power of two; its gradients too; and incremental decoding equals a full forward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.model import attention, layers
from lmforge.model.kv_cache import KVCache
from lmforge.model.layers import Linear


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_linear_matches_f_linear_with_gradients(bias, frozen_weight, monkeypatch):
    calls = []
    real = layers.onednn_linear
    monkeypatch.setattr(layers, "onednn_linear", lambda *args: calls.append(1) or real(*args))
    torch.manual_seed(0)
    layer = Linear(96, 64, bias=bias)  # 8·128·96·64 multiply-adds: above the size where oneDNN takes over
    layer.weight.requires_grad_(not frozen_weight)
    x = torch.randn(8, 128, 96, requires_grad=True)
    grad_out = torch.randn(8, 128, 64)
    layer(x).backward(grad_out)
    assert calls or layers._ONEDNN_LINEAR is None  # the oneDNN path ran (where PyTorch has oneDNN)
    x_ref = x.detach().clone().requires_grad_()
    w_ref = layer.weight.detach().clone().requires_grad_(not frozen_weight)
    b_ref = layer.bias.detach().clone().requires_grad_() if bias else None
    out_ref = F.linear(x_ref, w_ref, b_ref)
    out_ref.backward(grad_out)
    assert isinstance(layer, torch.nn.Linear)

    def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:  # fp32 sums in another order
        return bool((ours - reference).abs().max() <= 1e-6 * reference.abs().max() * reference.shape[-1] ** 0.5 + 1e-6)

    assert close(layer(x), out_ref)
    assert close(x.grad, x_ref.grad)
    if frozen_weight:
        assert layer.weight.grad is None
    else:
        assert close(layer.weight.grad, w_ref.grad)
    if bias:
        assert close(layer.bias.grad, b_ref.grad)


SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4)
CASES = {
    "mha": {}, "gqa": dict(num_kv_heads=2), "mqa": dict(num_kv_heads=1),
    "window": dict(model_type="mistral", sliding_window=5), "alibi": dict(position_embedding="alibi"),
    "head_dim_24": dict(hidden_size=96, num_kv_heads=2),  # scale 1/sqrt(24) is not a power of two
}


def model_for(case: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SHAPE, **CASES[case]}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def bf16_logits(model: Transformer, input_ids: torch.Tensor, matmul_path: bool, **kwargs) -> torch.Tensor:
    use = attention._use_matmul_attention
    try:
        if not matmul_path:
            attention._use_matmul_attention = lambda q, k: False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids, **kwargs).float()
    finally:
        attention._use_matmul_attention = use


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", ["causal", "padded", "packed"])
def test_bf16_matmul_attention_is_as_close_to_fp32_as_sdpa(case, layout):
    model = model_for(case)
    input_ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    padding = torch.ones(3, 20, dtype=torch.long)
    padding[0, :6] = 0
    documents = torch.tensor([[0] * 7 + [1] * 13, [0] * 20, [0] * 3 + [1] * 3 + [2] * 14])
    kwargs = {"padded": dict(attention_mask=padding), "packed": dict(document_ids=documents)}.get(layout, {})
    real = padding.bool()[..., None] if layout == "padded" else torch.ones(3, 20, 1, dtype=torch.bool)
    with torch.no_grad():
        reference = model(input_ids, **kwargs)
        ours = bf16_logits(model, input_ids, True, **kwargs)
        sdpa = bf16_logits(model, input_ids, False, **kwargs)
    error = ((ours - reference).abs() * real).max()
    sdpa_error = ((sdpa - reference).abs() * real).max()
    assert error <= 2 * sdpa_error + 1e-2, (float(error), float(sdpa_error))


def test_bf16_matmul_attention_gradients_match_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 32, requires_grad=True) for _ in range(3))  # 3 query blocks, ragged
    grad_out = torch.randn(2, 4, 300, 32)
    mask = attention.AttentionMask(None, is_causal=True)
    grads = []
    for fn in (lambda: attention.matmul_attention(q, k, v, mask),
               lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        out.float().backward(grad_out)
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    for ours, sdpa in zip(*grads):
        assert (ours - sdpa).abs().max() <= 0.05 * sdpa.abs().max()


def test_bf16_incremental_decoding_equals_full_forward():
    model = model_for("gqa").eval()
    input_ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(input_ids).float()
        cache = KVCache(2, 2, 2, 16, 32, dtype=torch.float32)
        steps = [model(input_ids[:, :5], kv_cache=cache).float()]
        steps += [model(input_ids[:, i:i + 1], kv_cache=cache).float() for i in range(5, 12)]
    print("MAXDIFF", (torch.cat(steps, dim=1) - full).abs().max())
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=2e-2, rtol=0)
