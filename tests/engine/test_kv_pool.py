"""Page pool and prefix cache: exact page ids and eviction order."""

from __future__ import annotations

import pytest

from jserve.engine.kv_pool import PagePool, page_hash


def test_allocate_and_free_order() -> None:
    pool = PagePool(num_pages=6, page_size=2)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(1) == [3]
    assert pool.num_free == 2
    pool.free([0, 1])
    # Uncached pages go to the front: the most recently freed comes out first.
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(RuntimeError):
        pool.allocate(3)


def test_shared_pages_are_freed_on_last_reference() -> None:
    pool = PagePool(num_pages=4, page_size=2)
    pages = pool.allocate(2)
    pool.share(pages)
    pool.free(pages)
    assert pool.num_free == 2
    pool.free(pages)
    assert pool.num_free == 4


def test_prefix_lookup_hits_full_pages_and_verifies_tokens() -> None:
    pool = PagePool(num_pages=8, page_size=2)
    tokens = [1, 2, 3, 4, 5]
    pages = pool.allocate(3)
    k0 = page_hash(None, tokens[0:2])
    k1 = page_hash(k0, tokens[2:4])
    pool.register(pages[0], k0, tokens[0:2])
    pool.register(pages[1], k1, tokens[2:4])
    pool.free(pages)
    hit, keys = pool.lookup([1, 2, 3, 4, 9, 9], max_pages=3)
    assert hit == pages[:2] and keys == [k0, k1]
    assert pool.ref_count[pages[0]] == 1
    # A different first page shares nothing, even though the second page matches.
    assert pool.lookup([7, 7, 3, 4], max_pages=2) == ([], [])
    # max_pages caps the hit.
    pool.free(hit)
    assert pool.lookup(tokens, max_pages=1)[0] == [pages[0]]


def test_lru_eviction_of_cached_pages() -> None:
    pool = PagePool(num_pages=4, page_size=1)
    a = pool.allocate(2)  # [0, 1]
    b = pool.allocate(2)  # [2, 3]
    for p, tok in zip(a + b, [10, 11, 20, 21], strict=True):
        pool.register(p, page_hash(None, [tok]), [tok])
    pool.free(a)  # freed tail first: order 1, 0
    pool.free(b)  # then 3, 2
    assert pool.num_cached == 4
    # Least recently freed cached pages are reused first.
    assert pool.allocate(1) == [1]
    assert pool.num_cached == 3
    assert pool.lookup([11], 1) == ([], [])
    assert pool.lookup([10], 1)[0] == [0]
    assert pool.allocate(2) == [3, 2]


def test_prefix_caching_disabled() -> None:
    pool = PagePool(num_pages=2, page_size=1, enable_prefix_caching=False)
    (p,) = pool.allocate(1)
    pool.register(p, page_hash(None, [5]), [5])
    pool.free([p])
    assert pool.lookup([5], 1) == ([], [])
    assert pool.num_cached == 0
