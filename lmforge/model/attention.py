"""Grouped-query self-attention on `scaled_dot_product_attention`, and the masks it needs.

Masks are built once per forward (one for full-attention layers, one for sliding-window layers) by
`build_attention_masks`, never per layer. The plain training path (no padding, no packing, no window
shorter than the sequence, no cache) passes no mask at all and uses SDPA's `is_causal=True`.

Indices in the masks are cache *slots* (0..S-1 over cached + new tokens). With left padding or packing
the real tokens of a sequence are contiguous, so slot distances equal position distances; this is also
how transformers indexes its sliding window (`kv_idx > q_idx - sliding_window`: a window of W keys
including the query itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .rope import alibi_slopes, apply_rope

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class AttentionMask:
    """What SDPA gets: `mask` (bool [B|1, 1, T, S], True = attend; or an additive float ALiBi bias
    [B|1, H, T, S]) or None, plus `is_causal` for the unmasked square case."""

    mask: torch.Tensor | None
    is_causal: bool


def _allowed(
    q_slots: torch.Tensor, k_slots: torch.Tensor, window: int | None,
    padding: torch.Tensor | None, document_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Bool [B|1, 1, T, S]: causal ∧ in-window ∧ key not padding ∧ same document (∨ the diagonal)."""
    allowed = k_slots[None, :] <= q_slots[:, None]
    if window is not None:
        allowed = allowed & (k_slots[None, :] > q_slots[:, None] - window)
    allowed = allowed[None]
    if padding is not None:
        allowed = allowed & padding[:, None, :].bool()
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    # A query whose keys are all masked (a left-pad position) would give NaN on older torch; let it see
    # itself. Real tokens always see themselves already, so their outputs do not change.
    allowed = allowed | (k_slots[None, :] == q_slots[:, None])[None]
    return allowed[:, None]


def build_attention_masks(
    config: ModelConfig, num_new: int, past: int, attention_mask: torch.Tensor | None,
    document_ids: torch.Tensor | None, device: torch.device, dtype: torch.dtype,
) -> tuple[AttentionMask, AttentionMask]:
    """(mask for full-attention layers, mask for sliding-window layers) for T new tokens after `past` slots."""
    total = past + num_new
    window = config.sliding_window
    alibi = config.position_embedding == "alibi"
    if attention_mask is not None and attention_mask.shape[-1] != total:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} slots, expected past+new={total}")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # nothing is padding: keep the fast path
    if document_ids is not None and past:
        raise ValueError("document_ids (packed sequences) cannot be combined with a KV cache")

    def make(window_: int | None) -> AttentionMask:
        window_matters = window_ is not None and total > window_
        if attention_mask is None and document_ids is None and not window_matters and not alibi:
            if num_new == 1 or past == 0:
                return AttentionMask(None, is_causal=num_new > 1)
        q_slots = torch.arange(past, total, device=device)
        k_slots = torch.arange(total, device=device)
        allowed = _allowed(q_slots, k_slots, window_ if window_matters else None, attention_mask, document_ids)
        if not alibi:
            return AttentionMask(allowed, is_causal=False)
        slopes = alibi_slopes(config.num_heads).to(device)
        distance = (k_slots[None, :] - q_slots[:, None]).float()  # <= 0 for visible keys
        bias = slopes[:, None, None] * distance[None]
        bias = bias[None].masked_fill(~allowed, float("-inf"))
        return AttentionMask(bias.to(dtype), is_causal=False)

    full = make(None)
    sliding = make(window) if window is not None else full
    return full, sliding


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


class Attention(nn.Module):
    """Multi-head attention with GQA/MQA (num_kv_heads ≤ num_heads), RoPE or ALiBi, optional KV cache."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim_resolved
        self.use_rope = config.position_embedding == "rope"
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        # HF llama's attention_bias covers o_proj too; Qwen2 has biases on q/k/v only.
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias and config.model_type == "llama")

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: AttentionMask,
        kv_cache=None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and not _SDPA_HAS_GQA:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        gqa = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
        attn_mask = mask.mask
        if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
            attn_mask = attn_mask.to(q.dtype)  # ALiBi bias under autocast: SDPA wants q's dtype
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=mask.is_causal, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
