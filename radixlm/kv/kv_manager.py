"""KVManager: the one owner of every KV slot transition, and of the accounting invariant.

Every slot of the pool is exactly one of (DESIGN.md invariant 2):

* **free**: on the PageAllocator's free list;
* **cached**: held by the prefix cache, *evictable* (no running request uses it) or *locked*;
* **private**: allocated for one running request and not given to the cache.

    free + evictable + locked + private == capacity         (check(), after every operation in tests)

A running request's slots, in the order of its tokens, are its row of the slot table::

    row:   [ 0 .. cached_len-1           | cached_len .. len(row)-1 ]
             the cache's (locked through   private to this request
             the request's handle)

Transitions, each one method (none of them reads a device tensor; slots are host ints):

    admit(match, n)       lock the matched prefix, take a row, allocate n more slots     free -> private
    extend(state, n)      allocate n more slots for a running request                   free -> private
    cache_computed(...)   offer the computed part to the cache (chunked prefill)       private -> cached
    release(...)          a finished, aborted or retracted request leaves: its computed KV is offered to
                          the cache, what the cache does not take is freed              private -> cached|free
    evict (inside every allocation that falls short)                                   evictable -> free
    flush()               the cache gives up everything                                 cached -> free

The cache never frees (prefix_cache.py): whatever it gives up or declines comes back here to be freed,
so NoPrefixCache substitutes for RadixCache with no special case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.prefix_cache import CacheHandle, InsertResult, MatchResult, PrefixCache
from radixlm.kv.req_to_token import ReqToToken, TableWrite


@dataclass
class KVState:
    """One running request's KV: its slot-table row, how much of it the cache holds, and its lock."""

    row: int
    cached_len: int  # leading slots that belong to the cache (page-aligned)
    handle: CacheHandle  # the cache position locked on this request's behalf


class KVManager:
    def __init__(self, allocator: PageAllocator, req_to_token: ReqToToken, cache: PrefixCache) -> None:
        if cache.page_size != allocator.page_size:
            raise ValueError(f"cache page size {cache.page_size} != pool page size {allocator.page_size}")
        self.allocator = allocator
        self.req_to_token = req_to_token
        self.cache = cache
        self.page_size = allocator.page_size
        self._live: dict[int, KVState] = {}  # row -> state, for check()

    # ---- queries ----------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.allocator.capacity

    @property
    def num_free_rows(self) -> int:
        return self.req_to_token.num_free_rows

    def match(self, tokens: Sequence[int]) -> MatchResult:
        return self.cache.match(tokens)

    def slots(self, state: KVState) -> list[int]:
        """The request's slots (the live row: read, do not change)."""
        return self.req_to_token.rows[state.row]

    def num_slots(self, state: KVState) -> int:
        return len(self.req_to_token.rows[state.row])

    def take_table_writes(self) -> list[TableWrite]:
        """The slot-table changes since the last call, for the device table (they travel in StepInput)."""
        return self.req_to_token.take_writes()

    # ---- transitions ------------------------------------------------------------------------------
    def admit(self, match: MatchResult, n: int, reserve_slots: int = 0) -> tuple[KVState, list[int]] | None:
        """A waiting request starts: its matched prefix is locked and put in a fresh row, and ``n`` slots
        follow it. ``reserve_slots`` must stay free afterwards (room for the running requests' next
        decodes). None, and nothing changed, when a row or the slots cannot be had."""
        row = self.req_to_token.alloc_row()
        if row is None:
            return None
        self.cache.lock(match.handle)
        state = KVState(row, match.length, match.handle)
        if match.length:
            self.req_to_token.append(row, match.slots)
        slots = self._alloc(state, n, reserve_slots)
        if slots is None:
            self.cache.unlock(match.handle)
            self.req_to_token.free_row(row)
            return None
        self._live[row] = state
        return state, slots

    def extend(self, state: KVState, n: int, reserve_slots: int = 0) -> list[int] | None:
        """``n`` more slots for a running request, or None (nothing changed) when the pool is short even
        after evicting every evictable slot it takes."""
        return self._alloc(state, n, reserve_slots)

    def extend_decodes(self, states: Sequence[KVState]) -> list[list[int]] | None:
        """One more slot for each of these running requests (a decode step), the same slots extend(state, 1)
        would give them one after another, in one call. None, and nothing changed, when the free pages do
        not cover them all or a row is full: then the caller extends one by one (evicting, retracting)."""
        rows = self.req_to_token.rows
        page = self.page_size
        limit = self.req_to_token.max_context_len
        lasts: list[int] = []
        need = 0
        for state in states:
            row = rows[state.row]
            if len(row) >= limit:
                return None
            last = row[-1] if row else -1
            lasts.append(last)
            # a fresh page unless the last slot's page has room (page_size 1: always)
            need += last < 0 or (last + 1) % page == 0
        pages = self.allocator.take_pages(need)
        if pages is None:
            return None
        if need == len(states):
            slots = [[p * page] for p in pages]
        else:
            fresh = iter(pages)
            slots = [
                [next(fresh) * page] if last < 0 or (last + 1) % page == 0 else [last + 1] for last in lasts
            ]
        self.req_to_token.append_each([state.row for state in states], slots)
        return slots

    def cache_computed(self, state: KVState, tokens: Sequence[int]) -> None:
        """Offer the computed part of a running request (``tokens``, one per slot so far) to the cache, so
        that other requests, or its own resumption after a retraction, reuse it. The request keeps running
        on the cache's slots: its lock moves to the longer prefix."""
        if len(tokens) <= state.cached_len:
            return
        taken = self._offer(state, tokens)
        if len(taken.slots) > state.cached_len:
            self.cache.lock(taken.handle)
            self.cache.unlock(state.handle)
            state.handle = taken.handle
            state.cached_len = len(taken.slots)

    def release(self, state: KVState, tokens: Sequence[int]) -> None:
        """The request leaves the running batch (finished, aborted or retracted). ``tokens`` are the
        tokens whose KV is computed, one per slot of its row. The cache gets the chance to keep them; the
        request's own remaining slots are freed and its row returned."""
        row_slots = self.req_to_token.rows[state.row]
        taken = self._offer(state, tokens)
        self.cache.unlock(state.handle)
        # Everything past what the cache holds is ours to free: the rest of the computed tokens (the
        # partial last page; all of them for NoPrefixCache), and slots of a span that was never computed.
        own = max(len(taken.slots), state.cached_len)
        self.allocator.free(row_slots[own:])
        self.req_to_token.free_row(state.row)
        del self._live[state.row]

    def flush(self) -> None:
        """Empty the prefix cache. RuntimeError, and nothing changes, while any request runs: even one
        that matched nothing holds a cache handle (the root) that it must be able to release."""
        if self._live:
            raise RuntimeError(f"cannot flush the prefix cache while {len(self._live)} request(s) run")
        self.allocator.free(self.cache.reset())

    # ---- internals --------------------------------------------------------------------------------
    def _alloc(self, state: KVState, n: int, reserve_slots: int) -> list[int] | None:
        row = self.req_to_token.rows[state.row]
        last = row[-1] if row else None
        need = self.allocator.slots_needed(n, last) + reserve_slots
        short = need - self.allocator.num_free_slots
        if short > 0:
            self.allocator.free(self.cache.evict(short))
            if self.allocator.num_free_slots < need:
                return None
        slots = self.allocator.alloc(n, last)
        if slots is None:
            return None
        self.req_to_token.append(state.row, slots)
        return slots

    def _offer(self, state: KVState, tokens: Sequence[int]) -> InsertResult:
        """Insert ``tokens`` with the row's slots; free our duplicates of what the cache already had and
        point the row at the cache's copies."""
        row_slots = self.req_to_token.rows[state.row]
        n = len(tokens)
        if n > len(row_slots):
            raise RuntimeError(f"KV: {n} computed tokens but row {state.row} has {len(row_slots)} slots")
        taken = self.cache.insert(tokens, row_slots[:n])
        kept = taken.slots
        # The cache keeps its own copy of a prefix it already had (another request computed it too):
        # ours are then duplicates, freed here, and the row now reads the cache's.
        start = state.cached_len
        duplicates = [
            ours for ours, theirs in zip(row_slots[start : len(kept)], kept[start:]) if ours != theirs
        ]
        if duplicates:
            self.allocator.free(duplicates)
            self.req_to_token.replace_head(state.row, kept)
        return taken

    # ---- invariant --------------------------------------------------------------------------------
    def private_slots(self) -> int:
        page = self.page_size
        total = 0
        for state in self._live.values():
            # a private run starts page-aligned (cached_len is), so it spans ceil(len / page) pages
            own = len(self.req_to_token.rows[state.row]) - state.cached_len
            total += -(-own // page) * page
        return total

    def check(self) -> None:
        """DESIGN.md invariant 2: free + evictable + locked + private == capacity (AssertionError if not)."""
        self.allocator.check()
        self.cache.check()
        free = self.allocator.num_free_slots
        evictable, locked = self.cache.evictable_size, self.cache.locked_size
        private = self.private_slots()
        if free + evictable + locked + private != self.capacity:
            raise AssertionError(
                f"KV accounting: free {free} + evictable {evictable} + locked {locked} + private {private} "
                f"!= capacity {self.capacity}"
            )
        if len(self._live) + self.req_to_token.num_free_rows != self.req_to_token.num_rows:
            raise AssertionError(
                f"KV rows: {len(self._live)} live + {self.req_to_token.num_free_rows} free != "
                f"{self.req_to_token.num_rows}"
            )
