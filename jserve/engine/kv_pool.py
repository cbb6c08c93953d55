"""The KV page pool and the automatic prefix cache. Pure Python, no JAX.

Pages are reference counted. A page whose count drops to zero goes back to
the free list; if it holds a full, hashed page of tokens it stays findable
in the prefix cache until it is handed out again, least recently freed
first. Free pages without cached content are handed out before cached ones.

A full page is identified by a hash chained over its parent page's hash and
its own tokens, so equal hashes mean equal prefixes (tokens are also
compared on a hit, so a hash collision can never return wrong K/V).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

_ROOT_HASH = 0x6A736572  # the chain's starting value


def page_hash(parent: int | None, tokens: Sequence[int], salt: int = 0) -> int:
    """A full page's key: chained over its parent's key, or for a first page over
    ``salt`` (the LoRA adapter id: equal tokens under different adapters hold different
    K/V, so their pages never match)."""
    return hash(((_ROOT_HASH, salt) if parent is None else parent, tuple(tokens)))


class PagePool:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_pages
        # Free pages in hand-out order (first = next). Ordered dict: O(1) pop,
        # O(1) removal of a cached page that gets reused.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self._key_of: dict[int, int] = {}  # page -> hash key
        self._tokens_of: dict[int, tuple[int, tuple[int, ...]]] = {}  # page -> (salt, tokens)
        self._page_of: dict[int, int] = {}  # hash key -> page
        # Counters (in tokens) for the prefix cache hit rate.
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Pages that can be handed out now (cached-but-unused pages included)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._page_of)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages with {len(self._free)} free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._uncache(page)
            self.ref_count[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Adds a reference to pages that are in use (a forked sequence)."""
        for p in pages:
            assert self.ref_count[p] > 0, p
            self.ref_count[p] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drops one reference to each page; the tail is freed first so it is evicted first."""
        for p in reversed(pages):
            self.ref_count[p] -= 1
            assert self.ref_count[p] >= 0, p
            if self.ref_count[p] == 0:
                self._free[p] = None
                if p not in self._key_of:
                    # Nothing worth keeping: hand it out before any cached page.
                    self._free.move_to_end(p, last=False)

    def lookup(
        self, tokens: Sequence[int], max_pages: int, salt: int = 0
    ) -> tuple[list[int], list[int]]:
        """Takes a reference on the longest cached run of full pages that prefixes ``tokens``
        (computed under adapter ``salt``, see ``page_hash``).

        Returns (pages, their hash keys). At most ``max_pages`` pages.
        """
        if not self.enable_prefix_caching:
            return [], []
        s = self.page_size
        pages: list[int] = []
        keys: list[int] = []
        parent: int | None = None
        for i in range(min(max_pages, len(tokens) // s)):
            chunk = tuple(tokens[i * s : (i + 1) * s])
            key = page_hash(parent, chunk, salt)
            page = self._page_of.get(key)
            if page is None or self._tokens_of[page] != (salt, chunk):
                break
            if self.ref_count[page] == 0:
                del self._free[page]
            self.ref_count[page] += 1
            pages.append(page)
            keys.append(key)
            parent = key
        return pages, keys

    def record_query(self, num_tokens: int, num_hit: int) -> None:
        self.query_tokens += num_tokens
        self.hit_tokens += num_hit

    def register(self, page: int, key: int, tokens: Sequence[int], salt: int = 0) -> None:
        """Makes a full, computed page findable by its hash key."""
        if not self.enable_prefix_caching or key in self._page_of or page in self._key_of:
            return
        self._page_of[key] = page
        self._key_of[page] = key
        self._tokens_of[page] = (salt, tuple(tokens))

    def _uncache(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]
            del self._tokens_of[page]
