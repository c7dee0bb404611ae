"""KVManager: a hypothesis state machine over every slot transition, for RadixCache and NoPrefixCache, page
sizes 1 and 4, in a pool small enough that allocations often evict or fail.

The machine plays the scheduler: requests are admitted (a prefix match, then fresh slots), extended,
computed (a forward pass: no manager call), committed (cache_computed), aborted, retracted and later
re-admitted with the same tokens, finished, pushed into an allocation that must evict, and the cache is
flushed. Each rule predicts exactly what the manager must do (whether an allocation fits after eviction,
which slots the cache keeps, how many pages are freed) and after every rule the invariant checks
``manager.check()`` plus the model:

* every used page is held by the tree or by a live row, and by nothing else;
* a live row has one slot per allocated token, its cached head is the tree's (locked) content for its
  tokens, its private tail is no one else's, and position i of a row lives at offset i % P of a page;
* the tree only ever holds what some request stored, and a present prefix keeps its slots;
* with NoPrefixCache nothing is ever matched or cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from radixlm.kv.kv_manager import KVManager, KVState
from radixlm.kv.no_prefix_cache import NoPrefixCache
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.prefix_cache import MatchResult, PrefixCache
from radixlm.kv.radix_cache import RadixCache
from radixlm.kv.req_to_token import ReqToToken
from tests.kv.tree_view import Model, locked_prefixes, model_slots, tree_items

# Set to False once KVManager.flush is fixed (see test_flush_while_requests_run_without_a_lock): the machine
# then also flushes while requests run on the root handle.


@dataclass
class Live:
    tokens: tuple[int, ...]  # the whole sequence this request will have
    state: KVState
    computed: int  # tokens whose KV is computed (a matched prefix counts)
    allocated: int  # slots in its row


def used_pages(alloc: PageAllocator) -> set[int]:
    # PageAllocator has no public per-page query; its used-map is the ground truth for this test.
    return {p for p in range(1, alloc.num_pages + 1) if alloc._used[p]}


class KVManagerMachine(RuleBasedStateMachine):
    cache_cls: type[PrefixCache] = RadixCache
    page_size = 1
    num_pages = 20
    num_rows = 4
    max_len = 14
    alphabet = 2

    def __init__(self) -> None:
        super().__init__()
        P = self.page_size
        self.alloc = PageAllocator(self.num_pages, P)
        self.cache = self.cache_cls(P)
        self.manager = KVManager(self.alloc, ReqToToken(self.num_rows, self.max_len), self.cache)
        self.radix = isinstance(self.cache, RadixCache)
        self.live: list[Live] = []
        self.retracted: list[tuple[tuple[int, ...], int]] = []  # tokens, tokens computed when retracted
        self.seqs: list[tuple[int, ...]] = []
        self.history: Model = {}  # page prefix -> the slots the request that stored it had for that page
        self.prev_tree: Model = {}
        self.storing = False  # set by the rules that may add tree content

    # ---- helpers ------------------------------------------------------------------------------------
    def aligned(self, n: int) -> int:
        return n - n % self.page_size

    def page_prefixes(self, toks: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
        P = self.page_size
        return [toks[: i + P] for i in range(0, self.aligned(n), P)]

    def row(self, r: Live) -> list[int]:
        return self.manager.slots(r.state)

    def draw_tokens(self, data: st.DataObject) -> tuple[int, ...]:
        base: tuple[int, ...] = ()
        if self.seqs and data.draw(st.booleans(), label="share"):
            s = data.draw(st.sampled_from(self.seqs), label="base")
            # page-aligned cuts share whole pages; any cut splits nodes
            cuts = st.sampled_from(range(0, len(s) + 1, self.page_size)) | st.integers(0, len(s))
            base = s[: data.draw(cuts, label="cut")]
        ext = data.draw(st.lists(st.integers(0, self.alphabet - 1), min_size=2, max_size=self.max_len))
        toks = (base + tuple(ext))[: self.max_len]
        self.seqs.append(toks)
        return toks

    def checked_match(self, toks: tuple[int, ...]) -> MatchResult:
        tree = tree_items(self.cache)
        m = self.manager.match(toks)
        P = self.page_size
        if not self.radix:
            assert m.length == 0 and m.slots == [], "NoPrefixCache matched something"
            return m
        expect = 0
        while expect + P <= len(toks) and toks[: expect + P] in tree:
            expect += P
        assert m.length == expect, f"match {toks}: {m.length}, the tree holds {expect}"
        for i, p in enumerate(self.page_prefixes(toks, m.length)):
            assert tuple(m.slots[i * P : (i + 1) * P]) == self.history[p], "match: not what was stored"
        return m

    def unlocked_slots(self, toks: tuple[int, ...], n: int) -> int:
        """Slots of the cached prefix toks[:n] that are evictable now (locking it takes them off)."""
        locked = locked_prefixes(self.cache)
        return sum(self.page_size for p in self.page_prefixes(toks, n) if p not in locked)

    def expected_kept(self, r: Live, n: int, tree: Model) -> list[int]:
        """The slots the cache holds for r.tokens[:n] after an insert of r's first n slots."""
        if not self.radix:
            return []
        row, P = self.row(r), self.page_size
        kept: list[int] = []
        for i, p in enumerate(self.page_prefixes(r.tokens, n)):
            kept += list(tree[p]) if p in tree else row[i * P : (i + 1) * P]
        return kept

    def record(self, toks: tuple[int, ...], kept: list[int]) -> None:
        P = self.page_size
        for i, p in enumerate(self.page_prefixes(toks, len(kept))):
            self.history[p] = tuple(kept[i * P : (i + 1) * P])
        self.storing = True

    # ---- rules --------------------------------------------------------------------------------------
    # Rules without a precondition do nothing when nothing fits them: a precondition that most states
    # fail makes hypothesis discard whole examples.
    def pick(self, data: st.DataObject, candidates: list[Live]) -> Live | None:
        return data.draw(st.sampled_from(candidates), label="req") if candidates else None

    def _admit(self, toks: tuple[int, ...], data: st.DataObject, evicting: bool = False) -> None:
        m = self.checked_match(toks[:-1])  # as the scheduler does: the last token is always computed
        lo, hi = 1, len(toks) - m.length
        reserve = 0
        if evicting:  # an n that needs more than the free slots and fits after evicting
            lo = max(lo, self.alloc.num_free_slots + 1)
            unlocked = self.unlocked_slots(toks, m.length)
            hi = min(hi, self.alloc.num_free_slots + self.cache.evictable_size - unlocked)
            if lo > hi or not self.manager.num_free_rows:
                return
        else:
            reserve = data.draw(st.sampled_from([0, 0, self.page_size, 3 * self.page_size]), label="reserve")
        n = data.draw(st.integers(lo, hi), label="n")
        rows_ok = self.manager.num_free_rows > 0
        need = self.alloc.slots_needed(n, m.slots[-1] if m.slots else None) + reserve
        unlocked_match = self.unlocked_slots(toks, m.length)
        free, evictable, locked = self.alloc.num_free_slots, self.cache.evictable_size, self.cache.locked_size
        avail = free + evictable - unlocked_match
        tree = tree_items(self.cache)

        res = self.manager.admit(m, n, reserve)

        if not rows_ok or need > avail:
            event("admit refused: " + ("slots" if rows_ok else "rows"))
            assert res is None, f"admit fitted: rows_ok={rows_ok} need={need} avail={avail}"
            assert self.cache.locked_size == locked, "a refused admit kept its lock"
            assert self.alloc.num_free_slots + self.cache.evictable_size == free + evictable
            if rows_ok:  # short of slots: it evicted everything it could, then gave the match's lock back
                assert self.cache.evictable_size == unlocked_match
            else:
                assert tree_items(self.cache) == tree, "admit without a free row evicted"
            return
        assert res is not None, f"admit refused: need={need} avail={avail}"
        assert need > free or not evicting
        event(f"admit: {'a prefix hit' if m.length else 'no hit'}, {'evicted' if need > free else 'fitted'}")
        state, slots = res
        assert len(slots) == n and state.cached_len == m.length
        assert self.manager.slots(state) == m.slots + slots
        assert self.alloc.num_free_slots >= reserve, "admit ate into the reserve"
        if need <= free:
            assert tree_items(self.cache) == tree, "an admit that fitted evicted"
        self.live.append(Live(toks, state, m.length, m.length + n))

    @initialize(data=st.data())
    def warm(self, data: st.DataObject) -> None:
        """Every example starts with a few requests run to the end (a cache with content), then one more
        admitted: hypothesis disables a random subset of the rules in each example (swarm testing), and
        without this many examples would never reach an interesting state."""
        for _ in range(data.draw(st.integers(1, 3), label="warm")):
            self._admit(self.draw_tokens(data), data)
            if self.live:
                r = self.live.pop()
                self.live.append(r)
                r.computed = r.allocated
                self._release(r)
        self._admit(self.draw_tokens(data), data)

    @rule(data=st.data())
    def admit(self, data: st.DataObject) -> None:
        self._admit(self.draw_tokens(data), data)

    @rule(data=st.data())
    def admit_twins(self, data: st.DataObject) -> None:
        """Two requests with the same tokens in one step: both compute the uncached part, and the second
        to be cached frees its copy."""
        toks = self.draw_tokens(data)
        self._admit(toks, data)
        self._admit(toks, data)

    @rule(data=st.data())
    def readmit(self, data: st.DataObject) -> None:
        """A retracted request comes back with the same tokens: its computed part may still be cached."""
        if not self.retracted:
            return
        i = data.draw(st.integers(0, len(self.retracted) - 1), label="retracted")
        toks, computed = self.retracted.pop(i)
        tree = tree_items(self.cache)
        kept = all(p in tree for p in self.page_prefixes(toks, min(computed, len(toks) - 1)))
        if self.radix and computed >= self.page_size:
            event("readmit: " + ("its prefix is still cached" if kept else "evicted"))
        self._admit(toks, data)

    @rule(data=st.data())
    def extend(self, data: st.DataObject) -> None:
        r = self.pick(data, [r for r in self.live if r.allocated < len(r.tokens)])
        if r is not None:
            self._extend(r, data.draw(st.integers(1, len(r.tokens) - r.allocated), label="n"))

    def _extend(self, r: Live, n: int) -> list[int] | None:
        row = list(self.row(r))
        need = self.alloc.slots_needed(n, row[-1])
        free, evictable = self.alloc.num_free_slots, self.cache.evictable_size
        tree = tree_items(self.cache)
        slots = self.manager.extend(r.state, n)
        if need > free + evictable:
            event("extend refused")
            assert slots is None, f"extend fitted: need={need} free={free} evictable={evictable}"
            assert self.row(r) == row
            assert self.cache.evictable_size == 0, "a failed extend left something evictable"
            assert self.alloc.num_free_slots == free + evictable
            return None
        assert slots is not None and len(slots) == n, f"extend refused: need={need} free={free} +{evictable}"
        assert self.row(r) == row + slots
        if need > free:
            event("extend evicted")
            assert self.cache.evictable_size < evictable, "an allocation that needed eviction evicted nothing"
        else:
            assert tree_items(self.cache) == tree, "an allocation that fitted evicted"
        assert self.alloc.num_free_slots == free + (evictable - self.cache.evictable_size) - need
        r.allocated += n
        return slots

    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        """An allocation that fits only after evicting: the manager must evict, and must succeed."""
        free, evictable = self.alloc.num_free_slots, self.cache.evictable_size
        options = []
        for r in self.live:
            room = self.alloc.room_in_page(self.row(r)[-1])
            lo, hi = room + free + 1, min(room + free + evictable, len(r.tokens) - r.allocated)
            if lo <= hi:
                options.append((r, lo, hi))
        if not options or data.draw(st.booleans(), label="by admission"):
            self._admit(self.draw_tokens(data), data, evicting=True)
            return
        r, lo, hi = data.draw(st.sampled_from(options), label="req")
        assert self._extend(r, data.draw(st.integers(lo, hi), label="n")) is not None

    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """A forward pass computes some of a request's allocated tokens (no KV call)."""
        r = self.pick(data, [r for r in self.live if r.computed < r.allocated])
        if r is not None:
            r.computed = data.draw(st.integers(r.computed + 1, r.allocated), label="computed")

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """A forward pass may compute more of the allocated tokens, then cache_computed of the request's
        computed part (chunked prefill)."""
        r = self.pick(data, [r for r in self.live if r.allocated > r.state.cached_len])
        if r is None:
            return
        r.computed = data.draw(
            st.integers(max(r.computed, r.state.cached_len + 1), r.allocated), label="computed"
        )
        tree = tree_items(self.cache)
        row = list(self.row(r))
        free = self.alloc.num_free_slots
        kept = self.expected_kept(r, r.computed, tree)
        old_cached = r.state.cached_len

        self.manager.cache_computed(r.state, r.tokens[: r.computed])

        after = self.row(r)
        if not self.radix:
            assert r.state.cached_len == 0 and after == row and self.alloc.num_free_slots == free
            return
        assert r.state.cached_len == len(kept) == self.aligned(r.computed)
        assert after == kept + row[len(kept) :], "the row must read the cache's copies"
        duplicates = sum(1 for a, b in zip(row[old_cached:], kept[old_cached:]) if a != b)
        event(f"commit: {'duplicates freed' if duplicates else 'no duplicates'}")
        assert self.alloc.num_free_slots == free + duplicates, "our duplicates were not freed"
        self.record(r.tokens, kept)

    def _release(self, r: Live) -> None:
        tree = tree_items(self.cache)
        row = list(self.row(r))
        free, rows = self.alloc.num_free_slots, self.manager.num_free_rows
        kept = self.expected_kept(r, r.computed, tree)

        self.manager.release(r.state, r.tokens[: r.computed])

        self.live.remove(r)
        assert self.manager.num_free_rows == rows + 1
        after = tree_items(self.cache)
        if self.radix:
            assert after.keys() >= tree.keys(), "release evicted"
            for i, p in enumerate(self.page_prefixes(r.tokens, len(kept))):
                assert after[p] == tuple(kept[i * self.page_size : (i + 1) * self.page_size])
            self.record(r.tokens, kept)
        else:
            assert after == {}
        held = {s for slots in after.values() for s in slots} | {s for o in self.live for s in self.row(o)}
        freed_pages = {s // self.page_size for s in row if s not in held}
        assert self.alloc.num_free_slots == free + len(freed_pages) * self.page_size

    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """Release before finishing: slots of an uncomputed span are freed, the computed part offered."""
        r = self.pick(data, self.live)
        if r is not None:
            event("abort: " + ("with uncomputed slots" if r.computed < r.allocated else "all computed"))
            self._release(r)

    @rule(data=st.data())
    def retract(self, data: st.DataObject) -> None:
        r = self.pick(data, [r for r in self.live if r.computed == r.allocated])  # between steps
        if r is not None:
            self._release(r)
            self.retracted.append((r.tokens, r.computed))

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """The last span is computed and the request leaves."""
        r = self.pick(data, self.live)
        if r is not None:
            r.computed = r.allocated
            self._release(r)

    @rule()
    def flush(self) -> None:
        """Only when nothing is running: while any request runs (even one on the root handle, with no
        lock) it refuses with RuntimeError and changes nothing."""
        tree = tree_items(self.cache)
        free = self.alloc.num_free_slots
        if self.live:
            event("flush refused")
            with pytest.raises(RuntimeError):
                self.manager.flush()
            assert tree_items(self.cache) == tree and self.alloc.num_free_slots == free
            return
        event("flush")
        self.manager.flush()
        assert tree_items(self.cache) == {} and self.cache.total_size == 0
        assert self.alloc.num_free_slots == free + len(tree) * self.page_size == self.alloc.capacity

    # ---- invariant ----------------------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        self.manager.check()
        P = self.page_size
        tree = tree_items(self.cache)
        if not self.radix:
            assert tree == {} and self.cache.total_size == 0
        # the tree only holds what some request stored; a present prefix keeps its slots
        for p, v in tree.items():
            assert self.history.get(p) == v, f"tree holds {p} -> {v}, stored {self.history.get(p)}"
            assert p not in self.prev_tree or self.prev_tree[p] == v
        if not self.storing:
            assert tree.keys() <= self.prev_tree.keys(), "tree content appeared outside commit/release"
        self.prev_tree, self.storing = tree, False
        tree_slots = {s for v in tree.values() for s in v}
        held_pages = {s // P for s in tree_slots}
        private_pages: set[int] = set()
        must_lock: set[tuple[int, ...]] = set()
        for r in self.live:
            row = self.row(r)
            c = r.state.cached_len
            assert len(row) == r.allocated, f"row has {len(row)} slots for {r.allocated} allocated tokens"
            assert c <= r.computed <= r.allocated <= len(r.tokens) and c % P == 0
            assert self.radix or c == 0
            assert row[:c] == model_slots(tree, r.tokens, c, P), "the cached head is not the tree's"
            must_lock.update(self.page_prefixes(r.tokens, c))
            for i, s in enumerate(row):
                assert s >= P and s % P == i % P, f"position {i} in slot {s}: pages must be runs"
                assert row[i - i % P] // P == s // P, "a page block of the row spans two pages"
            mine = {s // P for s in row[c:]}
            assert not {s for s in row[c:]} & tree_slots, "a private slot is also in the tree"
            assert not mine & private_pages, "two live rows share a private page"
            private_pages |= mine
            held_pages |= {s // P for s in row}
        assert locked_prefixes(self.cache) == must_lock
        assert used_pages(self.alloc) == held_pages, "a used page is held by no one, or a held page is free"

    def teardown(self) -> None:
        for r in list(self.live):
            self._release(r)
        self.manager.flush()
        self.manager.check()
        assert self.alloc.num_free_slots == self.alloc.capacity, "a slot leaked"
        assert self.manager.num_free_rows == self.num_rows


class RadixPage4(KVManagerMachine):
    page_size = 4
    num_pages = 7
    max_len = 20


class NoCachePage1(KVManagerMachine):
    cache_cls = NoPrefixCache


class NoCachePage4(RadixPage4):
    cache_cls = NoPrefixCache


_settings = settings(max_examples=50, stateful_step_count=40, deadline=None)
TestKVManagerRadixPage1 = KVManagerMachine.TestCase
TestKVManagerRadixPage4 = RadixPage4.TestCase
TestKVManagerNoCachePage1 = NoCachePage1.TestCase
TestKVManagerNoCachePage4 = NoCachePage4.TestCase
TestKVManagerRadixPage1.settings = _settings
TestKVManagerRadixPage4.settings = _settings
TestKVManagerNoCachePage1.settings = _settings
TestKVManagerNoCachePage4.settings = _settings


# ---- unit tests ----------------------------------------------------------------------------------------


def make(page_size: int = 1, num_pages: int = 16, cache: str = "radix") -> KVManager:
    c = RadixCache(page_size) if cache == "radix" else NoPrefixCache(page_size)
    return KVManager(PageAllocator(num_pages, page_size), ReqToToken(4, 64), c)


def test_page_sizes_must_agree() -> None:
    with pytest.raises(ValueError, match="page size"):
        KVManager(PageAllocator(4, 4), ReqToToken(2, 8), RadixCache(1))


def test_a_second_request_reuses_the_first_ones_prefix() -> None:
    kv = make(page_size=4)
    toks = list(range(10))
    a, slots_a = kv.admit(kv.match(toks[:-1]), 10)
    kv.release(a, toks)  # finished: 8 tokens cached, the partial page freed
    assert kv.cache.total_size == 8 and kv.allocator.num_used_slots == 8
    m = kv.match(toks[:-1])
    assert m.slots == slots_a[:8]
    b, new = kv.admit(m, 2)
    assert kv.slots(b) == slots_a[:8] + new and b.cached_len == 8
    assert kv.cache.locked_size == 8
    kv.check()
    kv.release(b, toks[:8])  # aborted before its span was computed: the new slots go back
    assert kv.cache.locked_size == 0 and kv.allocator.num_used_slots == 8
    kv.check()


def test_duplicates_are_freed_and_the_row_reads_the_caches_copy() -> None:
    """Two requests compute the same prompt side by side; the second to commit frees its copy."""
    kv = make(page_size=1)
    toks = [5, 6, 7, 8]
    a, _ = kv.admit(kv.match(toks), 4)
    b, slots_b = kv.admit(kv.match(toks), 4)
    kv.cache_computed(a, toks)
    used = kv.allocator.num_used_slots
    kv.cache_computed(b, toks)
    assert kv.allocator.num_used_slots == used - 4
    assert kv.slots(b) == kv.slots(a) and b.cached_len == 4
    assert kv.take_table_writes()[-1] == (b.row, 0, kv.slots(a))  # the device row is re-pointed too
    kv.check()


def test_admit_without_a_free_row_changes_nothing() -> None:
    kv = KVManager(PageAllocator(16, 1), ReqToToken(1, 16), RadixCache(1))
    kv.admit(kv.match([1]), 2)
    free = kv.allocator.num_free_slots
    assert kv.admit(kv.match([2]), 1) is None
    assert kv.allocator.num_free_slots == free and kv.num_free_rows == 0
    kv.check()


def test_reserve_stays_free() -> None:
    kv = make(page_size=1, num_pages=8)
    assert kv.admit(kv.match([1]), 6, reserve_slots=3) is None
    st, _ = kv.admit(kv.match([1]), 5, reserve_slots=3)
    assert kv.allocator.num_free_slots == 3
    assert kv.extend(st, 3) is not None  # extend with no reserve may take it
    kv.check()


def test_flush_refuses_while_a_request_holds_a_lock() -> None:
    kv = make(page_size=1)
    toks = [1, 2, 3]
    st, _ = kv.admit(kv.match(toks), 3)
    kv.cache_computed(st, toks)
    with pytest.raises(RuntimeError):
        kv.flush()
    assert kv.cache.total_size == 3
    kv.check()
    kv.release(st, toks)
    kv.flush()
    assert kv.allocator.num_free_slots == kv.capacity
    kv.check()


def test_release_of_more_tokens_than_slots_raises() -> None:
    kv = make(page_size=1)
    st, _ = kv.admit(kv.match([1, 2]), 2)
    with pytest.raises(RuntimeError, match="computed tokens"):
        kv.release(st, [1, 2, 3])


def test_check_catches_a_leak() -> None:
    kv = make(page_size=1)
    kv.allocator.alloc(1)  # taken behind the manager's back
    with pytest.raises(AssertionError, match="KV accounting"):
        kv.check()


def test_flush_refuses_while_requests_run_without_a_lock() -> None:
    """A running request with no prefix hit holds the root handle: flush() must refuse while it runs
    (replacing the tree would leave that handle unreleasable), and the request must still commit and
    release afterwards."""
    kv = make(page_size=1)
    done, _ = kv.admit(kv.match([7, 8]), 2)
    kv.release(done, [7, 8])  # something cached, nothing locked
    st, _ = kv.admit(kv.match([1, 2, 3]), 3)  # no hit: its handle is the root
    assert kv.cache.locked_size == 0
    with pytest.raises(RuntimeError):
        kv.flush()
    assert kv.cache.total_size == 2  # refused: nothing changed
    kv.check()
    kv.cache_computed(st, [1, 2, 3])
    kv.release(st, [1, 2, 3])
    kv.flush()
    kv.check()
    assert kv.allocator.num_free_slots == kv.capacity
