"""The prefix cache contract: what KVManager and the schedule policies may ask of a cache.

A cache stores the KV slots of token sequences it was given and hands them out again for a matching
prefix. It **never frees** and never allocates: slots it gives up (``evict``, ``reset``) are returned to the
caller, KVManager, which is the one owner of every slot transition (DESIGN.md invariant 2). Slots are host
ints; a cache holds no device tensor.

Every slot a cache holds is *evictable* (no running request uses it) or *locked* (some request does);
``evictable_size + locked_size`` is all it holds. The handles it returns are opaque: pass them back to
``lock`` / ``unlock`` / ``parent`` / ``children``, never look inside.

Typical use (by KVManager)::

    m = cache.match(tokens)                # reuse m.slots for tokens[:len(m.slots)]
    cache.lock(m.handle)                   # the matched slots cannot be evicted while the request runs
    ... allocate the rest; if short, free(cache.evict(k)) first ...
    r = cache.insert(tokens[:n], slots[:n])  # a finished request, or the computed part of a running one
    # The cache now holds tokens[:len(r.slots)] in r.slots (a page-aligned prefix of the insert, possibly
    # empty). Where slots[i] != r.slots[i] it kept its own copy: slots[i] is the caller's to free.
    cache.lock(r.handle); cache.unlock(m.handle)   # move the lock (if the request still runs)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CacheHandle = Any  # opaque: a position in the cache, as returned by match / insert


@dataclass
class MatchResult:
    slots: list[int]  # the KV slots of the longest cached prefix (a fresh list)
    handle: CacheHandle  # where the match ends: lock it to keep those slots

    @property
    def length(self) -> int:
        return len(self.slots)


@dataclass
class InsertResult:
    slots: list[int]  # the cache's slots for tokens[:len(slots)] after the insert
    handle: CacheHandle  # where they end


class PrefixCache(ABC):
    page_size: int
    # Whether a match can ever be non-empty. Admission uses it to decide whether a request should wait for
    # another one's prompt (n > 1 samples, a shared system prompt): with nothing shared, waiting is a loss.
    shares_prefixes: bool

    @abstractmethod
    def match(self, tokens: Sequence[int]) -> MatchResult:
        """Longest cached prefix of ``tokens`` (whole pages only). May refresh recency; nothing else."""

    @abstractmethod
    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> InsertResult:
        """Offer the KV of ``tokens`` (``slots[i]`` holds ``tokens[i]``; only whole pages are taken).

        The cache takes over the slots of tokens it did not have; for tokens it had, it keeps its own
        slots. It may hold less than offered (NoPrefixCache holds nothing)."""

    @abstractmethod
    def lock(self, handle: CacheHandle) -> None:
        """Pin the slots from the root to ``handle``: locked slots are never evicted."""

    @abstractmethod
    def unlock(self, handle: CacheHandle) -> None:
        """Undo one ``lock(handle)``; RuntimeError if it was not locked."""

    @abstractmethod
    def evict(self, num_slots: int) -> list[int]:
        """Give up least-recently-used unlocked slots until at least ``num_slots`` were given up or
        nothing is evictable. Returns them: the caller frees them."""

    @abstractmethod
    def reset(self) -> list[int]:
        """Give up everything (RuntimeError if anything is locked); returns the slots."""

    @property
    @abstractmethod
    def evictable_size(self) -> int: ...

    @property
    @abstractmethod
    def locked_size(self) -> int: ...

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.locked_size

    # ---- structure, for the schedule policies ---------------------------------------------------
    @property
    @abstractmethod
    def root(self) -> CacheHandle:
        """The handle of the empty prefix."""

    @abstractmethod
    def parent(self, handle: CacheHandle) -> CacheHandle | None:
        """The handle one edge closer to the root; None for the root."""

    @abstractmethod
    def children(self, handle: CacheHandle) -> list[CacheHandle]: ...

    @abstractmethod
    def check(self) -> None:
        """Assert the cache's own invariants (AssertionError with a message)."""
