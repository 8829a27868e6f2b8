"""KV blocks: an allocator with reference counts, and a prefix cache over full blocks.

The paged KV cache (`paged_cache.py`) stores keys/values in fixed-size blocks of `block_size` tokens; a
sequence owns a *block table*, the list of block ids holding its tokens in order. This module only does
the bookkeeping — which block ids are free, who holds them, what they contain — and never touches tensors.

Prefix caching. A full block is identified by `hash_block(parent_hash, token_ids)`: the hash of the block
before it and its own tokens, so equal hashes mean the same tokens at the same positions with the same
history, i.e. the same keys and values. When a full block is computed its hash is registered
(`cache_block`); a later sequence whose prompt starts with the same tokens finds those blocks
(`match_prefix`), takes a reference (`acquire`) and skips their prefill. SHA-256 rather than Python's
`hash()`: the cache is shared between users of a server, and a collision would hand one user's keys and
values to another; SHA-256 collisions cannot be crafted, Python's integer-tuple hash collisions can.

Eviction. A block whose reference count drops to 0 goes to the free queue but keeps its contents and
hash, so it can still be hit. Allocation takes the block at the head of the queue and only then forgets
its hash: freed blocks without a hash are put at the head (nothing to lose), cached ones at the tail
(least recently used first out), and a sequence's blocks are released last-block-first so a prefix's
first blocks, shared by the most prompts, are evicted last.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ..core.errors import LMForgeError

BlockHash = bytes


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], salt: bytes = b"") -> BlockHash:
    """SHA-256 of (parent block's hash, this block's token ids); `salt` separates caches that must not
    share blocks for the same tokens (e.g. different adapters) and only matters for the first block."""
    digest = hashlib.sha256(parent if parent is not None else b"root:" + salt)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens (ceil division)."""
    return -(-num_tokens // block_size)


class OutOfBlocksError(LMForgeError):
    """More blocks were asked for than are free (the scheduler should have prevented it)."""


class BlockManager:
    """Free queue + reference counts + hash → block map for `num_blocks` blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise LMForgeError(f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = next to reuse
        self._hash_of_block: list[BlockHash | None] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        self.queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0      # of which found there (prefill skipped)

    # ---- state ----------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they are reused when nothing else is free)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    @property
    def prefix_hit_rate(self) -> float:
        """Share of looked-up prompt tokens whose KV came from the prefix cache."""
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def refcount(self, block_id: int) -> int:
        return self._refcount[block_id]

    def num_exclusive(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` would become free if their holder released them (refcount 1)."""
        refcount = self._refcount
        return sum(1 for b in block_ids if refcount[b] == 1)

    def num_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` sit in the free queue (taking them uses up free blocks)."""
        refcount = self._refcount
        return sum(1 for b in block_ids if refcount[b] == 0)

    # ---- prefix cache ---------------------------------------------------------------------------------

    def match_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """Block ids of the longest run of leading `block_hashes` that are cached (read-only)."""
        if not self.enable_prefix_caching:
            return []
        found = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def cache_block(self, block_id: int, block_hash: BlockHash) -> None:
        """Register a full, computed block under its hash (a no-op when the hash already has a block)."""
        if not self.enable_prefix_caching or self._hash_of_block[block_id] is not None:
            return
        if block_hash not in self._block_of_hash:
            self._block_of_hash[block_hash] = block_id
            self._hash_of_block[block_id] = block_hash

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queried_tokens += queried_tokens
        self.hit_tokens += hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every hash (blocks in use keep their contents; they just cannot be hit any more)."""
        self._block_of_hash.clear()
        self._hash_of_block = [None] * self.num_blocks

    # ---- allocation -----------------------------------------------------------------------------------

    def acquire(self, block_ids: Sequence[int]) -> None:
        """Take a reference on blocks found by `match_prefix` (pulling free ones out of the free queue)."""
        for block_id in block_ids:
            if self._refcount[block_id] == 0:
                del self._free[block_id]
            self._refcount[block_id] += 1

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (refcount 1), evicting the least recently used cached blocks if needed."""
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} KV blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            old_hash = self._hash_of_block[block_id]
            if old_hash is not None:  # evict: the contents are about to be overwritten
                del self._block_of_hash[old_hash]
                self._hash_of_block[block_id] = None
            self._refcount[block_id] = 1
            blocks.append(block_id)
        return blocks

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block of a block table; blocks nobody holds become free."""
        for block_id in reversed(block_ids):  # last block first: it is evicted before the prefix
            count = self._refcount[block_id] - 1
            if count < 0:
                raise LMForgeError(f"block {block_id} released more often than it was taken")
            self._refcount[block_id] = count
            if count == 0:
                self._free[block_id] = None
                if self._hash_of_block[block_id] is None:
                    self._free.move_to_end(block_id, last=False)  # no contents worth keeping: reuse first
