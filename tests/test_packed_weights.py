"""oneDNN-packed linear weights for inference: same outputs, dropped when stale, never used with grads."""
from __future__ import annotations

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.layers import Linear, _REORDER_WEIGHT, pack_weights, unpack_weights

pytestmark = pytest.mark.skipif(_REORDER_WEIGHT is None, reason="oneDNN weight packing unavailable")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_matches_the_plain_one(dtype):
    model = _model().to(dtype)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        plain = model(ids).float()
        assert pack_weights(model) == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
        packed = model(ids).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed, plain, atol=tol, rtol=tol)


def test_a_changed_weight_drops_the_stale_pack():
    model = _model()
    ids = torch.randint(0, 97, (1, 5))
    pack_weights(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: same storage, new version
        doubled = model(ids)
    assert model.lm_head._packed is None
    unpack_weights(model)
    with torch.no_grad():
        torch.testing.assert_close(doubled, model(ids))
    pack_weights(model)
    model.to(torch.bfloat16)  # new storage and dtype
    with torch.no_grad():
        model(ids)
    assert all(m._packed is None for m in model.modules() if isinstance(m, Linear))


def test_training_forward_ignores_the_pack_and_gets_gradients():
    model = _model()
    pack_weights(model)
    model.train()
    loss = model(torch.randint(0, 97, (2, 6))).float().logsumexp(-1).mean()
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_fused_qkv_and_gate_up_follow_weight_changes_and_replaced_modules():
    model = _model()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        plain = model(ids)
        pack_weights(model)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn._fused is not None and mlp._fused is not None and attn.q_proj._packed is None
        torch.testing.assert_close(model(ids), plain, atol=1e-5, rtol=1e-5)
        mlp.up_proj.weight.zero_()  # stale fused pack: must not be used
        zeroed = model(ids)
        assert mlp._fused is None
        unpack_weights(model)
        torch.testing.assert_close(model(ids), zeroed)
        pack_weights(model)
        replacement = Linear(64, 64, bias=False)  # what wrapping by an adapter looks like to the fused pack
        replacement.weight.copy_(attn.q_proj.weight * 0.5)
        attn.q_proj = replacement
        changed = model(ids)
        unpack_weights(model)
        torch.testing.assert_close(model(ids), changed, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(changed, zeroed)
