"""NoPrefixCache: the null prefix cache (``--disable-radix-cache``). It matches nothing and holds nothing,
so it substitutes for RadixCache anywhere: KVManager frees what the cache does not take, with no special case.
"""

from __future__ import annotations

from collections.abc import Sequence

from radixlm.kv.prefix_cache import CacheHandle, InsertResult, MatchResult, PrefixCache

_ROOT = "root"  # the one handle this cache ever returns


class NoPrefixCache(PrefixCache):
    shares_prefixes = False

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def match(self, tokens: Sequence[int]) -> MatchResult:
        return MatchResult([], _ROOT)

    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> InsertResult:
        return InsertResult([], _ROOT)

    def lock(self, handle: CacheHandle) -> None:
        pass

    def unlock(self, handle: CacheHandle) -> None:
        pass

    def evict(self, num_slots: int) -> list[int]:
        return []

    def reset(self) -> list[int]:
        return []

    @property
    def evictable_size(self) -> int:
        return 0

    @property
    def locked_size(self) -> int:
        return 0

    @property
    def root(self) -> CacheHandle:
        return _ROOT

    def parent(self, handle: CacheHandle) -> CacheHandle | None:
        return None

    def children(self, handle: CacheHandle) -> list[CacheHandle]:
        return []

    def check(self) -> None:
        pass
