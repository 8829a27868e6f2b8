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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import FusedPackMixin, Linear
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


# bf16 attention on CPU is faster as batched matmuls around a softmax than in SDPA's flash kernel
# (8 heads, forward + backward, this repo's CPU: 64 tokens 5x, 256 tokens 2.4x, 1024 tokens 1.3x, 2048
# even), but it keeps the [B, H, T, S] probabilities for backward where flash keeps O(T). So it is used
# while those stay small (2^24 scores, 32 MB of bf16 per layer). Queries go in blocks so that a block's
# scores only cover the keys it can see (causal: no later slot), skipping the masked corner.
MATMUL_ATTENTION_MAX_SCORES = 1 << 24
MATMUL_ATTENTION_QUERY_BLOCK = 128


def _use_matmul_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    if q.device.type != "cpu" or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] > MATMUL_ATTENTION_MAX_SCORES:
        return False
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    return dtype == torch.bfloat16


def _additive_mask(mask: AttentionMask, t: int, s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The mask as a bias added to the scores: [B|1, 1|H, T, S], 0 where allowed, -inf where not."""
    if mask.mask is not None:
        if mask.mask.dtype == torch.bool:
            return torch.zeros((), dtype=dtype, device=device).masked_fill(~mask.mask, float("-inf"))
        return mask.mask.to(dtype)
    if mask.is_causal:  # square: query i sees keys 0..i
        return torch.full((t, s), float("-inf"), dtype=dtype, device=device).triu_(1)
    return None


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v for q [B, H, T, D], k/v [B, KV, S, D], in the autocast dtype.

    The numerics of transformers' eager attention: scores in the compute dtype, softmax accumulated in
    fp32 and rounded once, probabilities times v in the compute dtype. Every mask built here is causal
    in slot terms (the T queries are the last T of the S slots and see no later slot), so each block
    of queries multiplies only the keys up to its last query.
    """
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype
    t, s, head_dim = q.shape[2], k.shape[2], q.shape[-1]
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), _repeat_kv(k.to(dtype), groups), _repeat_kv(v.to(dtype), groups)
    scale = head_dim ** -0.5
    if math.log2(scale).is_integer():  # a power of two scales q exactly, on T·D values instead of T·S
        q, scale = q * scale, None
    bias = _additive_mask(mask, t, s, dtype, q.device)
    past = s - t
    outputs = []
    for start in range(0, t, MATMUL_ATTENTION_QUERY_BLOCK):
        end = min(start + MATMUL_ATTENTION_QUERY_BLOCK, t)
        keys = past + end
        scores = torch.matmul(q[:, :, start:end], k[:, :, :keys].transpose(-1, -2))
        if scale is not None:
            scores.mul_(scale)  # in place: the matmul's backward needs q and k, not its output
        if bias is not None:
            scores.add_(bias[..., start:end, :keys])
        outputs.append(torch.matmul(torch.softmax(scores, dim=-1), v[:, :, :keys]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


# A few queries (a decode step, speculative verification) against a bf16/fp16 cache on CPU: the reduced-
# precision kernels are slow at this shape, so q, k, v go to fp32 and the output back (this repo's CPU,
# 12 heads × 64, one query, 256 keys: bf16 SDPA 119 us, bf16 matmuls 90 us, upcast + fp32 SDPA 36 us;
# 1024 keys: 508 / 306 / 116 us). It is also the more exact result. Not under autocast (fp32 weights):
# there the compute dtype stays autocast's, as in training.
UPCAST_MAX_QUERIES = 8


def _upcast_few_queries(q: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and q.shape[2] <= UPCAST_MAX_QUERIES and not torch.is_autocast_enabled("cpu"))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
         is_causal: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention with GQA (k/v may have fewer heads), upcast to fp32 for a few
    low-precision queries on CPU (see UPCAST_MAX_QUERIES)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and not _SDPA_HAS_GQA:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    gqa = {"enable_gqa": True} if groups > 1 and _SDPA_HAS_GQA else {}
    dtype = q.dtype
    if _upcast_few_queries(q):
        q, k, v = q.float(), k.float(), v.float()
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, q.dtype):
        attn_mask = attn_mask.to(q.dtype)  # an ALiBi bias: SDPA wants q's dtype
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **gqa).to(dtype)


class Attention(FusedPackMixin, nn.Module):
    """Multi-head attention with GQA/MQA (num_kv_heads ≤ num_heads), RoPE or ALiBi, optional KV cache."""

    FUSED = ("q_proj", "k_proj", "v_proj")  # one packed product at inference (layers.pack_weights)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim_resolved
        self.use_rope = config.position_embedding == "rope"
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        # HF llama's attention_bias covers o_proj too; Qwen2 has biases on q/k/v only.
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias and config.model_type == "llama")

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: AttentionMask,
        kv_cache=None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.run_fused(x) if self._fused is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None and hasattr(kv_cache, "attend"):  # paged: many sequences in one row
            out = kv_cache.attend(self.layer_idx, q, k, v)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if _use_matmul_attention(q, k) and not _upcast_few_queries(q):
            out = matmul_attention(q, k, v, mask)
        else:
            out = sdpa(q, k, v, mask.mask, mask.is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
