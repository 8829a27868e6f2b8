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

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding's rollback of rejected tokens)."""
        if not 0 <= length <= self.length:
            raise LMForgeError(f"cannot truncate a KV cache of length {self.length} to {length}")
        self.length = length


class SinkKVCache(KVCache):
    """StreamingLLM's attention-sink cache (Xiao et al. 2023): keeps the first `num_sinks` slots and the
    most recent tokens in a fixed `capacity`, so generation can run on past any length.

    Positions are cache slots, as in the paper: a new token is rotated by its slot index, not by how many
    tokens came before it. When `make_room(n)` finds fewer than n free slots it evicts the oldest
    non-sink tokens, `evict_chunk` at a time (at least n), shifts the kept ones left and re-rotates their
    keys by minus the shift. RoPE angles are linear in position (default, linear, YaRN and llama3
    scaling), so R(-d)·R(p)·k = R(p-d)·k: the kept keys end up exactly as if they had been rotated at
    their new slots, without storing keys before RoPE. Evicting a chunk at a time (default a quarter of
    the recent part) rather than one token per step keeps that re-rotation off most decode steps; the
    price is that the recent part holds between capacity - num_sinks - evict_chunk and
    capacity - num_sinks tokens. ALiBi needs no re-rotation (its bias is built from slot distances);
    dynamic-NTK RoPE, whose frequencies depend on the length, is refused.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 num_sinks: int = 4, evict_chunk: int = 0, inv_freq: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity < num_sinks + 2:
            raise LMForgeError(f"sink_window={capacity} must exceed num_sinks={num_sinks} by at least 2")
        super().__init__(num_layers, batch_size, num_kv_heads, head_dim, capacity, dtype=dtype, device=device)
        self.num_sinks = num_sinks
        self.evict_chunk = evict_chunk if evict_chunk > 0 else max(1, (capacity - num_sinks) // 4)
        self.inv_freq = inv_freq
        self.evicted = 0  # tokens dropped so far

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, capacity: int, num_sinks: int = 4,
                  evict_chunk: int = 0) -> "SinkKVCache":
        config = model.config
        rotary = model.model.rotary_emb
        if rotary is not None and rotary.dynamic:
            raise LMForgeError("sink_window: dynamic-NTK RoPE (rope_scaling.rope_type=dynamic) changes its "
                               "frequencies with the length, so kept keys cannot be re-rotated")
        weight = model.lm_head.weight
        return cls(config.num_layers, batch_size, config.num_kv_heads, config.head_dim_resolved, capacity,
                   num_sinks=num_sinks, evict_chunk=evict_chunk,
                   inv_freq=rotary.inv_freq if rotary is not None else None, dtype=weight.dtype, device=weight.device)

    def make_room(self, num_new: int) -> int:
        """Evict so that `num_new` more tokens fit; returns how many slots were dropped (0: none).
        The dropped slots are num_sinks .. num_sinks+dropped-1; callers holding per-slot data (an
        attention mask) shift it the same way with `shift_slots`."""
        free = self.max_len - self.length
        if num_new <= free:
            return 0
        recent = self.length - self.num_sinks
        drop = min(recent, max(num_new - free, self.evict_chunk))
        if num_new > free + drop:
            raise LMForgeError(f"{num_new} new tokens do not fit in a sink cache of {self.max_len} slots "
                               f"with {self.num_sinks} sinks")
        rotation = self._rotation(-drop) if self.inv_freq is not None else None
        for cache in (self.keys, self.values):
            for layer, tensor in enumerate(cache):
                kept = shift_slots(tensor, self.num_sinks, drop, self.length, dim=2)
                if rotation is not None and cache is self.keys:
                    cos, sin = rotation
                    span = kept[:, :, self.num_sinks:self.length - drop]
                    x = span.float()
                    span.copy_(x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin)
        self.length -= drop
        self.evicted += drop
        return drop

    def _rotation(self, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [head_dim] rotating by `delta` positions (HF's half layout; no YaRN scale)."""
        angle = delta * self.inv_freq.float()
        angle = torch.cat((angle, angle))
        half = angle.shape[0] // 2
        sin = angle.sin()
        return angle.cos(), torch.cat((-sin[:half], sin[half:]))


def shift_slots(tensor: torch.Tensor, start: int, drop: int, length: int, dim: int) -> torch.Tensor:
    """Drop slots start..start+drop-1 of the first `length` along `dim` by moving the later ones left
    (in place); returns `tensor`."""
    tail = tensor.narrow(dim, start + drop, length - start - drop)
    tensor.narrow(dim, start, length - start - drop).copy_(tail.clone())
    return tensor
