"""Paged KV storage and the attention over it, for one flat batch of many sequences per model call.

Storage: per layer, keys and values in preallocated pools [num_blocks, block_size, kv_heads, head_dim]
(token-major inside a block). Token t of a sequence lives in block `block_table[t // block_size]`, slot
`t % block_size`. Nothing is allocated per token; blocks are handed out by `block_manager.py`.

The model sees this object as its `kv_cache` and calls `attend(layer_idx, q, k, v)` (the optional hook of
the cache interface, see `lmforge/model/kv_cache.py`): the engine feeds all sequences as ONE row of N
tokens, so only the cache knows which keys belong to which query. Per layer, `attend` writes the step's
new keys/values into their slots (one `index_copy_`), then computes attention in two groups:
- decode rows (one new token each, placed first in the batch): their blocks are gathered into one padded
  [B, kv_heads, L, head_dim] view and run as ONE batched SDPA call with a key-padding mask;
- prefill chunks: one SDPA call per chunk over its gathered blocks with a causal mask offset by the
  tokens already cached (a chunk with nothing cached attends to its own new keys, no gather).

Why gather, measured on this machine's CPU (1 thread, fp32, 8 heads = 8 KV heads × 64, block 16; µs per
layer for K+V; `contiguous` is SDPA on the foundation's contiguous cache, the lower bound):

    decode rows × context      contiguous   gather only   gather + batched SDPA   per-row loop   one flat row
    1 × 256                          23           23                 56                 58            49
    1 × 1024                         81           75                189                191           167
    16 × 100                        156          132                325                442             -
    16 × 256                        355          494               1084               1284          3299
    16 × 1024                      3588         3103               9610               9413         39414

- One flat row (all sequences' keys concatenated, block-diagonal mask, one SDPA) is quadratic in the
  number of sequences (each query scores every sequence's keys): 3-4x slower at 16 rows.
- A Python loop of per-sequence SDPA calls is close at long contexts but pays ~15 µs per call.
- No gather at all (attention over the whole pool with a mask) costs the whole pool every layer:
  8.9 ms for 1 × 256 with a 2048-block pool.
- `torch.compile` of a paged decode attention (gather fused into the kernel) gave 74 µs (1 × 256) and
  700 µs (16 × 256): not worth a compile step, recompiles and a second code path.
- Gathering into a reused workspace (`index_select(out=)`) instead of a fresh tensor matters past a few
  MB: fresh 30+ MB buffers are page-faulted in every call (16 × 1024: 29 ms fresh vs 3.1 ms reused).
So the paged layout costs about 30 µs per layer at batch 1 (≈ 0.25 ms per token for 8 layers) and 2-3x
the contiguous attention time at 16 rows; the gain is that memory follows the tokens actually generated,
blocks are shared between prompts, and sequences join and leave the batch at any step. In the whole
engine (33.7M llama, hidden 512, 8 layers, vocab 8192, fp32, 1 thread) batch-1 greedy decode runs at
157-159 tokens/s against 161-164 for the contiguous-cache `generate()`: the paged attention plus all
per-step bookkeeping (scheduling, batch building, sampling, detokenizing) cost ≈ 0.2 ms of a ≈ 6.3 ms step.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..model.attention import AttentionMask, sdpa
from ..model.config import ModelConfig
from ..model.rope import alibi_slopes
from .block_manager import num_blocks_for


@dataclass
class PrefillChunk:
    """A run of `length` new tokens of one sequence at flat index `start`, after `cached` cached ones."""

    start: int
    length: int
    cached: int
    block_ids: torch.Tensor | None          # blocks to gather (None: nothing cached, use the new keys)
    masks: dict[bool, AttentionMask]        # keyed by "this layer uses the sliding window"


@dataclass
class PagedBatch:
    """Where one step's tokens go and what each attends to; built once per step, used by every layer."""

    slot_mapping: torch.Tensor              # [N] pool slot (block * block_size + offset) of each new token
    num_decode: int = 0                     # the first rows: one new token each
    decode_block_ids: torch.Tensor | None = None  # [num_decode × blocks of the longest row], short rows padded
    decode_keys: int = 0                    # longest decode context (keys kept after the gather)
    decode_masks: dict[bool, torch.Tensor | None] = field(default_factory=dict)
    prefills: list[PrefillChunk] = field(default_factory=list)


def _mask_or_bias(allowed: torch.Tensor, distance: torch.Tensor, slopes: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """The bool mask, or for ALiBi the additive bias slope·(key − query) with -inf where not allowed."""
    if slopes is None:
        return allowed
    bias = slopes.view(1, -1, 1, 1) * distance.float()
    return bias.masked_fill(~allowed, float("-inf")).to(dtype)


class PagedBatchBuilder:
    """Turns (block_table, num_cached, num_new) rows into a `PagedBatch` for one model's attention."""

    def __init__(self, config: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.window = config.sliding_window
        self.dtype = dtype
        self.device = torch.device(device)
        self.slopes = alibi_slopes(config.num_heads).to(self.device) if config.position_embedding == "alibi" else None
        self.variants = (False, True) if self.window is not None else (False,)

    def build(self, rows: Sequence[tuple[Sequence[int], int, int]]) -> PagedBatch:
        """`rows` in batch order, decode rows (num_new == 1) first."""
        size = self.block_size
        slots: list[int] = []
        num_decode = 0
        for table, cached, new in rows:
            if new == 1 and num_decode == len(slots):
                num_decode += 1
            slots.extend(table[p // size] * size + p % size for p in range(cached, cached + new))
        batch = PagedBatch(torch.tensor(slots, dtype=torch.long, device=self.device), num_decode=num_decode)
        if num_decode:
            self._add_decode_rows(batch, rows[:num_decode])
        start = num_decode
        for table, cached, new in rows[num_decode:]:
            batch.prefills.append(self._prefill_chunk(table, cached, new, start))
            start += new
        return batch

    def _add_decode_rows(self, batch: PagedBatch, rows: Sequence[tuple[Sequence[int], int, int]]) -> None:
        contexts = [cached + 1 for _, cached, _ in rows]
        per_row = max(num_blocks_for(c, self.block_size) for c in contexts)
        ids: list[int] = []
        for table, cached, _ in rows:
            used = table[:num_blocks_for(cached + 1, self.block_size)]
            ids.extend(used)
            ids.extend([used[0]] * (per_row - len(used)))  # padding: any valid block, masked out below
        longest = max(contexts)
        batch.decode_block_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        batch.decode_keys = longest
        context = torch.tensor(contexts, device=self.device)[:, None]        # [B, 1]
        keys = torch.arange(longest, device=self.device)[None]                # [1, L]
        for windowed in self.variants:
            needs_window = windowed and longest > self.window
            if min(contexts) == longest and not needs_window and self.slopes is None:
                batch.decode_masks[windowed] = None  # every row sees all `longest` keys: no mask
                continue
            allowed = keys < context
            if needs_window:
                allowed = allowed & (keys > context - 1 - self.window)
            distance = (keys - (context - 1))[:, None, None, :]
            batch.decode_masks[windowed] = _mask_or_bias(allowed[:, None, None, :], distance, self.slopes, self.dtype)

    def _prefill_chunk(self, table: Sequence[int], cached: int, new: int, start: int) -> PrefillChunk:
        total = cached + new
        block_ids = None
        if cached:
            block_ids = torch.tensor(table[:num_blocks_for(total, self.block_size)], dtype=torch.long,
                                     device=self.device)
        masks: dict[bool, AttentionMask] = {}
        queries = torch.arange(cached, total, device=self.device)[:, None]
        keys = torch.arange(total, device=self.device)[None]
        for windowed in self.variants:
            needs_window = windowed and total > self.window
            if not cached and not needs_window and self.slopes is None:
                masks[windowed] = AttentionMask(None, is_causal=new > 1)
                continue
            allowed = keys <= queries
            if needs_window:
                allowed = allowed & (keys > queries - self.window)
            masks[windowed] = AttentionMask(
                _mask_or_bias(allowed[None, None], (keys - queries)[None, None], self.slopes, self.dtype), False)
        return PrefillChunk(start, new, cached, block_ids, masks)


class PagedKVCache:
    """Block pools for every layer + `attend`, the model's cache hook for a flat multi-sequence batch."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim_resolved
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.key_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.value_pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        slots = (num_blocks * block_size, self.num_kv_heads, self.head_dim)  # the same memory, one row per token
        self._key_slots = [pool.view(slots) for pool in self.key_pools]
        self._value_slots = [pool.view(slots) for pool in self.value_pools]
        window = config.sliding_window
        self.uses_window = [window is not None and i >= config.max_window_layers for i in range(config.num_layers)]
        self.gqa = {"enable_gqa": True} if config.num_heads != config.num_kv_heads else {}
        self.builder = PagedBatchBuilder(config, block_size, dtype, device)
        self._workspace = (torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=dtype, device=device))
        self._batch: PagedBatch | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_blocks: int, block_size: int) -> "PagedKVCache":
        weight = model.lm_head.weight
        return cls(model.config, num_blocks, block_size, dtype=weight.dtype, device=weight.device)

    @staticmethod
    def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Memory one block takes over all layers, keys and values."""
        per_token = config.num_kv_heads * config.head_dim_resolved * torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * per_token

    # ---- the model's cache interface ------------------------------------------------------------------

    length = 0  # the model builds no masks or positions from it: positions come in, masks are built here

    def begin(self, rows: Sequence[tuple[Sequence[int], int, int]]) -> None:
        """Prepare the next forward: (block_table, num_cached, num_new) per sequence, decodes first."""
        self._batch = self.builder.build(rows)

    def advance(self, num_tokens: int) -> None:
        """Called by the model after a forward; the engine keeps each sequence's length itself."""

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        raise TypeError("PagedKVCache computes attention itself: the model must call attend(), not update()")

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store this step's k, v [1, kv_heads, N, head_dim] and return attention [1, heads, N, head_dim]."""
        batch = self._batch
        key_pool, value_pool = self.key_pools[layer_idx], self.value_pools[layer_idx]
        new_keys, new_values = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [N, kv_heads, head_dim]
        self._key_slots[layer_idx].index_copy_(0, batch.slot_mapping, new_keys.to(key_pool.dtype))
        self._value_slots[layer_idx].index_copy_(0, batch.slot_mapping, new_values.to(value_pool.dtype))
        windowed = self.uses_window[layer_idx]
        decoded = None
        if batch.num_decode:
            rows = batch.num_decode
            keys, values = self._gather(key_pool, value_pool, batch.decode_block_ids, rows)
            keys, values = keys[:, :batch.decode_keys].transpose(1, 2), values[:, :batch.decode_keys].transpose(1, 2)
            queries = q[0, :, :rows].transpose(0, 1)[:, :, None]  # [rows, heads, 1, head_dim]
            mask = batch.decode_masks[windowed]
            decoded = sdpa(queries, keys, values, mask)  # one query per row: fp32 for a bf16 cache on CPU
            decoded = decoded[:, :, 0].transpose(0, 1)[None]  # [1, heads, rows, head_dim]
            if not batch.prefills:
                return decoded
        out = torch.empty_like(q)
        if decoded is not None:
            out[:, :, :batch.num_decode] = decoded
        for chunk in batch.prefills:
            span = slice(chunk.start, chunk.start + chunk.length)
            if chunk.block_ids is None:
                keys, values = k[:, :, span], v[:, :, span]
            else:
                keys, values = self._gather(key_pool, value_pool, chunk.block_ids, 1)
                total = chunk.cached + chunk.length
                keys, values = keys[:, :total].transpose(1, 2), values[:, :total].transpose(1, 2)
            mask = chunk.masks[windowed]
            out[:, :, span] = F.scaled_dot_product_attention(
                q[:, :, span], keys, values, attn_mask=mask.mask, is_causal=mask.is_causal, **self.gqa)
        return out

    def _gather(self, key_pool: torch.Tensor, value_pool: torch.Tensor, block_ids: torch.Tensor, rows: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks `block_ids` (rows × blocks-per-row) copied into the reused workspace: [rows, keys, kv, d]."""
        count = block_ids.numel()
        block_shape = key_pool.shape[1:]
        numel = count * key_pool[0].numel()
        if self._workspace[0].numel() < numel:
            self._workspace = tuple(torch.empty(numel, dtype=key_pool.dtype, device=key_pool.device) for _ in range(2))
        key_out = self._workspace[0][:numel].view(count, *block_shape)
        value_out = self._workspace[1][:numel].view(count, *block_shape)
        torch.index_select(key_pool, 0, block_ids, out=key_out)
        torch.index_select(value_pool, 0, block_ids, out=value_out)
        per_row = count // rows * self.block_size
        return (key_out.view(rows, per_row, self.num_kv_heads, self.head_dim),
                value_out.view(rows, per_row, self.num_kv_heads, self.head_dim))
