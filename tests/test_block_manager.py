"""Block allocator + prefix cache: reference counts, hashing by content and position, LRU eviction."""
from __future__ import annotations

import pytest

from lmforge.infer.block_manager import BlockManager, OutOfBlocksError, hash_block


def _chain(*blocks: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    for tokens in blocks:
        hashes.append(hash_block(hashes[-1] if hashes else None, tokens))
    return hashes


def test_allocate_and_release_return_every_block():
    manager = BlockManager(num_blocks=4, block_size=2)
    first = manager.allocate(3)
    assert len(set(first)) == 3 and manager.num_free_blocks == 1
    with pytest.raises(OutOfBlocksError):
        manager.allocate(2)
    manager.release(first)
    assert manager.num_free_blocks == 4
    with pytest.raises(Exception):
        manager.release(first)  # double free is refused


def test_hash_depends_on_tokens_and_on_everything_before():
    a, b = _chain([1, 2], [3, 4])
    c, d = _chain([9, 9], [3, 4])
    assert a != c and b != d  # same tokens after a different prefix: a different block
    assert _chain([1, 2], [3, 4]) == [a, b]
    assert hash_block(None, [1, 2], salt=b"adapter-x") != a


def test_cached_prefix_is_shared_with_reference_counts():
    manager = BlockManager(num_blocks=8, block_size=2)
    hashes = _chain([1, 2], [3, 4], [5, 6])
    owner = manager.allocate(3)
    for block_id, block_hash in zip(owner, hashes):
        manager.cache_block(block_id, block_hash)
    other = _chain([1, 2], [3, 4], [7, 7])
    hits = manager.match_prefix(other)
    assert hits == owner[:2]  # stops at the first differing block
    manager.acquire(hits)
    assert [manager.refcount(b) for b in owner] == [2, 2, 1]
    assert manager.num_exclusive(owner) == 1
    manager.release(owner)
    assert manager.num_free_blocks == 8 - 2  # the shared two are still held
    manager.release(hits)
    assert manager.num_free_blocks == 8
    assert manager.match_prefix(hashes) == owner  # freed, but still cached until reused
    assert manager.num_unreferenced(owner) == 3


def test_eviction_is_lru_and_uncached_blocks_go_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    old = _chain([1, 1], [2, 2])
    new = _chain([3, 3])
    blocks_old = manager.allocate(2)
    for block_id, block_hash in zip(blocks_old, old):
        manager.cache_block(block_id, block_hash)
    manager.release(blocks_old)
    block_new = manager.allocate(1)
    manager.cache_block(block_new[0], new[0])
    manager.release(block_new)
    scratch = manager.allocate(1)  # the never-cached block is reused before any cached one
    assert manager.match_prefix(old) == blocks_old and manager.match_prefix(new) == block_new
    manager.release(scratch)
    manager.allocate(2)  # scratch again, then the least recently freed cached block: old's last block
    assert manager.match_prefix(old) == blocks_old[:1]
    assert manager.match_prefix(new) == block_new
    manager.allocate(1)  # old's first block goes before the more recently freed `new`
    assert manager.match_prefix(old) == [] and manager.match_prefix(new) == block_new


def test_disabled_prefix_cache_never_hits_and_hit_rate_counts_tokens():
    manager = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=False)
    block = manager.allocate(1)
    manager.cache_block(block[0], _chain([1, 2])[0])
    assert manager.match_prefix(_chain([1, 2])) == []
    manager.record_lookup(10, 4)
    manager.record_lookup(10, 0)
    assert manager.prefix_hit_rate == pytest.approx(0.2)
