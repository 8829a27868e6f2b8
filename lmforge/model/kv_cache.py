"""Contiguous, preallocated key/value cache for incremental decoding.

The interface the model relies on (a paged-KV engine can hand the model any object providing it):

    cache.length                         -> int: slots already filled (same for every row; left padding
                                            keeps rows aligned, and the attention mask hides pad slots)
    cache.update(layer_idx, k, v)        -> (k_all, v_all): store this step's k, v [B, kv_heads, T, head_dim]
                                            at slots length..length+T-1 and return every slot so far,
                                            [B, kv_heads, length+T, head_dim]
    cache.advance(num_tokens)            -> None: called once by the model after all layers ran, so
                                            every layer of one forward writes at the same offset

Slot indices are what the causal, sliding-window and ALiBi masks are built from; see attention.py.

Optional hook, for a cache that packs several sequences into one row (the engine's paged cache,
`lmforge/infer/paged_cache.py`):

    cache.attend(layer_idx, q, k, v)     -> out [B, heads, T, head_dim]: store k, v and compute the
                                            attention itself, because only the cache knows which keys
                                            belong to which query; the model then skips update() and its
                                            own masks (the caller passes position_ids).
"""
from __future__ import annotations

import torch

from ..core.errors import LMForgeError


class KVCache:
    """Per-layer K/V tensors [B, kv_heads, max_len, head_dim], allocated once (no per-token allocation)."""

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache shaped for `model` (a Transformer), in its parameters' dtype and device."""
        config = model.config
        weight = model.lm_head.weight
        return cls(config.num_layers, batch_size, config.num_kv_heads, config.head_dim_resolved, max_len,
                   dtype=weight.dtype, device=weight.device)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise LMForgeError(f"KV cache full: {end} tokens do not fit in max_len={self.max_len}")
        self.keys[layer_idx][:, :, self.length:end] = k
        self.values[layer_idx][:, :, self.length:end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def reset(self) -> None:
        self.length = 0
