"""RadixCache and NoPrefixCache: a hypothesis state machine against a plain-dict model, and unit tests.

The contract (prefix_cache.py): a cache never frees and never allocates. ``insert`` keeps the tree's own
slots for what it had (the caller frees its duplicates, ``slots[i] != r.slots[i]``), ``evict`` and ``reset``
return the slots given up. Here the test plays KVManager: it owns a PageAllocator, frees what the cache
returns or declines, and keeps exact accounting (free + cache.total_size + its private pages == capacity).
The model (tests/kv/tree_view.py) maps every stored page prefix to the slots of its last page.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixlm.kv.no_prefix_cache import NoPrefixCache
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.prefix_cache import InsertResult, MatchResult
from radixlm.kv.radix_cache import RadixCache, TreeNode
from tests.kv.tree_view import Model, longest_match, model_slots, node_depth, tree_items

# ---- helpers ---------------------------------------------------------------------------------------


def make(capacity: int, page_size: int) -> tuple[PageAllocator, RadixCache]:
    return PageAllocator(capacity // page_size, page_size), RadixCache(page_size)


def alloc(pool: PageAllocator, n: int, last_slot: int | None = None) -> list[int]:
    out = pool.alloc(n, last_slot)
    assert out is not None
    return out


def insert_and_free(
    pool: PageAllocator, cache: RadixCache, tokens: list[int], slots: list[int]
) -> InsertResult:
    """Insert as KVManager does: free the caller's duplicates of what the tree already had."""
    r = cache.insert(tokens, slots)
    pool.free([ours for ours, theirs in zip(slots, r.slots) if ours != theirs])
    return r


# ---- the state machine -----------------------------------------------------------------------------


class RadixCacheMachine(RuleBasedStateMachine):
    page_size = 1
    capacity = 48  # small, so that inserts often have to evict
    alphabet = 3  # few token ids, so that random sequences share prefixes and split nodes

    def __init__(self) -> None:
        super().__init__()
        self.pool = PageAllocator(self.capacity // self.page_size, self.page_size)
        self.cache = RadixCache(self.page_size)
        self.model: Model = {}
        self.seqs: list[tuple[int, ...]] = []  # earlier sequences: new ones extend their prefixes
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []  # handle, the prefix it protects
        self.private: list[list[int]] = []  # slots the "caller" still holds (partial pages)

    # -- model helpers --
    def draw_tokens(self, data: st.DataObject) -> tuple[int, ...]:
        base: tuple[int, ...] = ()
        if self.seqs and data.draw(st.booleans(), label="extend"):
            s = data.draw(st.sampled_from(self.seqs), label="base")
            base = s[: data.draw(st.integers(0, len(s)), label="cut")]
        ext = data.draw(
            st.lists(st.integers(0, self.alphabet - 1), max_size=3 * self.page_size + 3), label="ext"
        )
        toks = (base + tuple(ext))[: 6 * self.page_size]
        self.seqs.append(toks)
        return toks

    def model_match(self, toks: tuple[int, ...]) -> int:
        return longest_match(self.model, toks, self.page_size)

    def model_slots(self, toks: tuple[int, ...], length: int) -> list[int]:
        return model_slots(self.model, toks, length, self.page_size)

    def prefixes(self, toks: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The page prefixes of a page-aligned token run."""
        return [toks[: i + self.page_size] for i in range(0, len(toks), self.page_size)]

    def checked_match(self, toks: tuple[int, ...]) -> MatchResult:
        expect = self.model_match(toks)
        m = self.cache.match(list(toks))
        assert m.length == expect, f"match {toks}: got {m.length}, model says {expect}"
        assert m.slots == self.model_slots(toks, expect)
        assert node_depth(m.handle) == expect
        assert tree_items(self.cache) == self.model, "match changed the tree's content"
        return m

    def checked_evict(self, k: int) -> list[int]:
        free_before = self.pool.num_free_slots
        given = self.cache.evict(k)
        after = tree_items(self.cache)
        assert after.items() <= self.model.items(), "evict changed or invented tree content"
        removed = [s for p in self.model.keys() - after.keys() for s in self.model[p]]
        assert sorted(given) == sorted(removed), "evict returned other slots than it gave up"
        assert len(given) >= k or self.cache.evictable_size == 0, (
            "evict stopped while something was evictable"
        )
        for p in after:
            assert len(p) == self.page_size or p[: -self.page_size] in after, "evict left a hole in the tree"
        for _, prefix in self.locks:
            for p in self.prefixes(prefix):
                assert p in after, "evict removed a locked page"
        self.pool.free(given)  # the cache never frees: we do
        assert self.pool.num_free_slots - free_before == len(given)
        self.model = after
        return given

    # -- rules --
    @rule(data=st.data(), fresh=st.booleans())
    def insert(self, data: st.DataObject, fresh: bool) -> None:
        """KVManager's flow: match, lock, (evict,) alloc the rest, insert, free duplicates, unlock.

        ``fresh`` allocates slots for the whole sequence instead of reusing the match, as a request that
        was computed without a cache hit would: the tree must keep its slots and the caller frees its own.
        """
        toks = self.draw_tokens(data)
        if not toks:
            return
        m = self.checked_match(toks)
        self.cache.lock(m.handle)
        reuse = 0 if fresh else m.length
        last = m.slots[-1] if reuse else None
        need = self.pool.slots_needed(len(toks) - reuse, last)
        if need > self.pool.num_free_slots:
            self.checked_evict(need - self.pool.num_free_slots)
        new = self.pool.alloc(len(toks) - reuse, last)
        if new is None:
            self.cache.unlock(m.handle)
            return
        slots = m.slots[:reuse] + new
        n = len(toks) // self.page_size * self.page_size
        existing = self.model_match(toks[:n])
        tree_slots = self.model_slots(toks, existing)
        free_before = self.pool.num_free_slots
        size_before = self.cache.total_size

        r = self.cache.insert(toks, slots)

        assert isinstance(r, InsertResult)
        assert r.slots == tree_slots + slots[existing:n], "the tree must keep its own slots for what it had"
        assert node_depth(r.handle) == n
        assert self.pool.num_free_slots == free_before, "the cache freed something"
        assert self.cache.total_size == size_before + n - existing
        duplicates = [ours for ours, theirs in zip(slots, r.slots) if ours != theirs]
        if fresh:
            assert len(duplicates) == existing  # every fresh slot of a cached prefix is a duplicate
        else:
            assert duplicates == [] and r.slots[:reuse] == slots[:reuse]
        self.pool.free(duplicates)
        assert self.pool.num_free_slots - free_before == len(duplicates)
        for i in range(existing, n, self.page_size):
            self.model[toks[: i + self.page_size]] = tuple(slots[i : i + self.page_size])
        if n < len(toks):
            self.private.append(slots[n:])
        self.cache.unlock(m.handle)

    @rule(data=st.data())
    def match(self, data: st.DataObject) -> None:
        self.checked_match(self.draw_tokens(data))

    @rule(data=st.data())
    def lock_a_match(self, data: st.DataObject) -> None:
        toks = self.draw_tokens(data)
        m = self.checked_match(toks)
        if m.length:
            self.cache.lock(m.handle)
            self.locks.append((m.handle, toks[: m.length]))

    @precondition(lambda self: self.locks)
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.locks) - 1), label="lock")
        node, _ = self.locks.pop(i)
        self.cache.unlock(node)

    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        self.checked_evict(data.draw(st.integers(0, self.capacity), label="k"))

    @precondition(lambda self: self.private)
    @rule()
    def release_private(self) -> None:
        self.pool.free(self.private.pop())

    @rule()
    def reset(self) -> None:
        if self.locks:
            with pytest.raises(RuntimeError, match="locked"):
                self.cache.reset()
            return  # and nothing changed (the invariant checks the content)
        given = self.cache.reset()
        assert sorted(given) == sorted(s for slots in self.model.values() for s in slots)
        self.pool.free(given)
        self.model = {}
        assert self.cache.total_size == 0

    # -- invariants --
    @invariant()
    def consistent(self) -> None:
        self.cache.check()
        self.pool.check()
        # Partial tail pages are private: count whole pages, as the allocator does.
        private_pages = sum(-(-len(p) // self.page_size) for p in self.private) * self.page_size
        assert self.pool.num_free_slots + self.cache.total_size + private_pages == self.pool.capacity
        assert tree_items(self.cache) == self.model
        locked = {p for _, prefix in self.locks for p in self.prefixes(prefix)}
        assert self.cache.locked_size == len(locked) * self.page_size
        assert self.cache.evictable_size == (len(self.model) - len(locked)) * self.page_size

    def teardown(self) -> None:
        for node, _ in self.locks:
            self.cache.unlock(node)
        self.pool.free(self.cache.reset())
        for p in self.private:
            self.pool.free(p)
        assert self.pool.num_free_slots == self.pool.capacity
        self.pool.check()


class RadixCacheMachinePage4(RadixCacheMachine):
    page_size = 4
    capacity = 96
    alphabet = 2  # pages of 4 tokens collide less often than single tokens


_settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestRadixCacheStateful = RadixCacheMachine.TestCase
TestRadixCacheStateful.settings = _settings
TestRadixCacheStatefulPage4 = RadixCacheMachinePage4.TestCase
TestRadixCacheStatefulPage4.settings = _settings


# ---- unit tests ------------------------------------------------------------------------------------


def test_split_on_partial_match() -> None:
    pool, cache = make(32, 1)
    s = alloc(pool, 5)
    cache.insert([1, 2, 3, 4, 5], s)
    m = cache.match([1, 2, 3, 9])
    assert m.length == 3 and m.slots == s[:3]
    assert m.handle.key == (1, 2, 3)
    assert cache.children(cache.root) == [m.handle] and cache.parent(m.handle) is cache.root
    (lower,) = cache.children(m.handle)
    assert lower.key == (4, 5) and lower.value == s[3:] and cache.parent(lower) is m.handle
    assert cache.parent(cache.root) is None
    cache.check()
    # A second sequence branches at the split point.
    r = cache.insert([1, 2, 3, 7, 8], m.slots + alloc(pool, 2))
    assert r.slots[:3] == s[:3] and cache.parent(r.handle) is m.handle and len(cache.children(m.handle)) == 2
    assert cache.total_size == 7
    cache.check()


def test_match_inside_an_edge_ending_the_query() -> None:
    pool, cache = make(32, 1)
    cache.insert([1, 2, 3, 4], alloc(pool, 4))
    m = cache.match([1, 2])
    assert m.length == 2 and m.handle.key == (1, 2)
    assert cache.match([5, 1]).length == 0
    empty = cache.match([])
    assert empty.handle is cache.root and empty.slots == []
    cache.check()


def test_insert_keeps_the_trees_slots_and_the_caller_frees_its_duplicates() -> None:
    pool, cache = make(32, 1)
    s1 = alloc(pool, 4)
    cache.insert([1, 2, 3, 4], s1)
    s2 = alloc(pool, 6)  # a request that computed the same prefix without a hit, then two more tokens
    free_before = pool.num_free_slots
    r = cache.insert([1, 2, 3, 4, 5, 6], s2)
    assert pool.num_free_slots == free_before  # the cache never frees
    assert r.slots == s1 + s2[4:]  # the tree kept its own copy
    duplicates = [ours for ours, theirs in zip(s2, r.slots) if ours != theirs]
    assert duplicates == s2[:4]
    pool.free(duplicates)  # the caller's 4 duplicate slots go back
    assert pool.num_free_slots == free_before + 4
    assert cache.total_size == 6
    cache.check()
    # Inserting with the tree's own slots: no duplicates, and the same handle.
    r2 = cache.insert([1, 2, 3, 4, 5, 6], r.slots)
    assert r2.slots == r.slots and r2.handle is r.handle
    pool.check()
    assert pool.num_free_slots + cache.total_size == pool.capacity


def test_insert_duplicates_page4_are_whole_pages() -> None:
    pool, cache = make(64, 4)
    toks = list(range(10))
    s1 = alloc(pool, 10)
    r1 = cache.insert(toks, s1)
    assert r1.slots == s1[:8]
    pool.free(s1[8:])  # the partial page stayed ours
    s2 = alloc(pool, 12)
    free_before = pool.num_free_slots
    r2 = insert_and_free(pool, cache, toks + [10, 11], s2)
    assert pool.num_free_slots == free_before + 8  # two whole duplicate pages
    assert r2.slots == s1[:8] + s2[8:]
    assert cache.total_size == 12
    cache.check()
    pool.check()
    assert pool.num_free_slots + cache.total_size == pool.capacity


def test_insert_refuses_a_page_shared_only_in_part() -> None:
    pool, cache = make(32, 4)
    s = alloc(pool, 4)
    cache.insert([1, 2, 3, 4], s)
    bad = s[:2] + [s[2] + 100, s[3] + 100]  # half the tree's page, half someone else's
    with pytest.raises(RuntimeError, match="some but not all"):
        cache.insert([1, 2, 3, 4, 5, 6, 7, 8], bad + alloc(pool, 4))
    cache.check()


def test_insert_needs_a_slot_per_token() -> None:
    _, cache = make(32, 1)
    with pytest.raises(ValueError):
        cache.insert([1, 2, 3], [4, 5])
    assert cache.total_size == 0
    r = cache.insert([], [])
    assert r.slots == [] and r.handle is cache.root


def test_chunked_insert_of_a_running_request() -> None:
    """Insert the computed part, continue into the caller's partial page, insert again: no duplicates."""
    pool, cache = make(64, 4)
    toks = list(range(100, 114))
    slots = alloc(pool, 6)  # first chunk: 6 tokens
    r = cache.insert(toks[:6], slots)
    cache.lock(r.handle)
    assert r.slots == slots[:4]
    slots = r.slots + slots[4:]  # the tree's slots for the inserted part, ours for the rest
    slots = slots + alloc(pool, 8, last_slot=slots[-1])  # second chunk continues the page
    free_before = pool.num_free_slots
    r2 = cache.insert(toks, slots)
    assert pool.num_free_slots == free_before and r2.slots == slots[:12]
    cache.lock(r2.handle)
    cache.unlock(r.handle)
    assert cache.locked_size == 12 and cache.evictable_size == 0
    cache.check()
    cache.unlock(r2.handle)
    pool.free(slots[12:])
    pool.free(cache.reset())
    assert pool.num_free_slots == pool.capacity


def test_lru_eviction_order_and_evict_returns_the_slots() -> None:
    pool, cache = make(32, 1)
    a, b, c = [1, 1, 1], [2, 2], [3, 3, 3, 3]
    slots = {}
    for toks in (a, b, c):
        slots[tuple(toks)] = alloc(pool, len(toks))
        cache.insert(toks, slots[tuple(toks)])
    cache.match(a)  # a is now the most recently used
    free = pool.num_free_slots
    given = cache.evict(1)
    assert given == slots[(2, 2)]  # b: the least recently used leaf, given up whole
    assert pool.num_free_slots == free  # ... but not freed: that is the caller's job
    pool.free(given)
    assert cache.match(b).length == 0 and cache.match(a).length == 3
    assert sorted(cache.evict(1)) == sorted(slots[(3, 3, 3, 3)])  # then c (a was touched again just now)
    assert cache.match(c).length == 0
    assert sorted(cache.evict(100)) == sorted(slots[(1, 1, 1)]) and cache.total_size == 0
    assert cache.evict(5) == []
    cache.check()


def test_parent_becomes_evictable_after_its_children() -> None:
    pool, cache = make(32, 1)
    first = alloc(pool, 3)
    cache.insert([1, 2, 3], first)
    second = alloc(pool, 2)
    r = cache.insert([1, 2, 3, 4, 5], cache.match([1, 2, 3]).slots + second)
    cache.insert([9], alloc(pool, 1))
    cache.match([9])  # [9] is newest; the chain 1-2-3 / 4-5 is older
    given = cache.evict(4)  # the leaf [4, 5], then its parent [1, 2, 3], once it became a leaf
    assert sorted(given) == sorted(first + second)
    assert r.handle.parent is None  # detached
    assert cache.match([1]).length == 0 and cache.match([9]).length == 1
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        cache.lock(r.handle)
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        cache.unlock(r.handle)
    cache.check()


def test_lock_prevents_eviction() -> None:
    pool, cache = make(32, 1)
    s = alloc(pool, 4)
    cache.insert([1, 2, 3, 4], s)
    other = alloc(pool, 2)
    cache.insert([1, 2, 5, 6], s[:2] + other)
    m = cache.match([1, 2, 3, 4])
    cache.lock(m.handle)
    assert cache.locked_size == 4 and cache.evictable_size == 2
    assert cache.parent(m.handle).lock_ref == 1
    cache.check()
    assert cache.evict(100) == other  # only the unlocked branch [5, 6]
    assert cache.match([1, 2, 3, 4]).slots == s
    cache.lock(m.handle)  # locks nest
    cache.unlock(m.handle)
    assert cache.evict(100) == []
    cache.unlock(m.handle)
    assert cache.locked_size == 0 and cache.evictable_size == 4
    with pytest.raises(RuntimeError, match="unlocked"):
        cache.unlock(m.handle)
    cache.check()
    assert sorted(cache.evict(100)) == sorted(s)
    cache.lock(cache.root)  # the root is never counted
    cache.unlock(cache.root)
    assert cache.locked_size == 0
    cache.check()


def test_split_of_a_locked_node_keeps_counts() -> None:
    pool, cache = make(32, 1)
    r = cache.insert([1, 2, 3, 4], alloc(pool, 4))
    cache.lock(r.handle)
    m = cache.match([1, 2, 7])  # splits the locked node
    assert m.handle.lock_ref == 1 and cache.parent(r.handle) is m.handle
    assert cache.locked_size == 4
    cache.check()
    cache.unlock(r.handle)  # the original handle still unlocks the whole path
    assert cache.locked_size == 0 and cache.evictable_size == 4
    cache.check()


def test_reset_returns_every_slot() -> None:
    pool, cache = make(32, 1)
    a = alloc(pool, 3)
    cache.insert([1, 2, 3], a)
    b = alloc(pool, 2)
    r = cache.insert([4, 5], b)
    cache.lock(r.handle)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    assert cache.total_size == 5
    cache.unlock(r.handle)
    free = pool.num_free_slots
    given = cache.reset()
    assert sorted(given) == sorted(a + b) and pool.num_free_slots == free
    pool.free(given)
    assert cache.total_size == 0 and pool.num_free_slots == pool.capacity
    assert cache.match([1, 2, 3]).length == 0 and cache.children(cache.root) == []
    with pytest.raises(RuntimeError, match="no longer in the tree"):
        cache.lock(r.handle)  # handles from before the reset are dead
    cache.check()
    # Still usable afterwards.
    cache.insert([1, 2], alloc(pool, 2))
    assert cache.match([1, 2]).length == 2
    cache.check()


def test_page_size_4_alignment() -> None:
    pool, cache = make(64, 4)
    toks = list(range(10))
    s = alloc(pool, 10)
    r = cache.insert(toks, s)
    assert r.slots == s[:8]  # slots 8, 9 stay the caller's
    assert cache.total_size == 8
    assert cache.match(toks[:7]).length == 4  # a partial last page is not matched
    assert cache.match(toks[:3]).length == 0
    m = cache.match(toks[:6] + [99, 98])  # diverges inside page 2: split at the page boundary
    assert m.length == 4 and m.handle.key == (0, 1, 2, 3)
    (lower,) = cache.children(m.handle)
    assert lower.key == (4, 5, 6, 7)
    assert set(cache.root.children) == {(0, 1, 2, 3)} and set(m.handle.children) == {(4, 5, 6, 7)}
    cache.check()
    # Inserting fewer than a page stores nothing.
    short = alloc(pool, 3)
    r2 = cache.insert([7, 7, 7], short)
    assert r2.slots == [] and r2.handle is cache.root and cache.total_size == 8
    pool.free(short)
    pool.free(s[8:])
    pool.free(cache.reset())
    assert pool.num_free_slots == pool.capacity


def test_tuple_tokens_are_accepted() -> None:
    pool, cache = make(32, 1)
    s = alloc(pool, 3)
    cache.insert((5, 6, 7), s)
    assert cache.match([5, 6, 7, 8]).slots == s
    assert cache.match((5, 6)).length == 2


def test_results_are_not_views_into_the_tree() -> None:
    pool, cache = make(32, 1)
    s = alloc(pool, 3)
    original = list(s)
    r = cache.insert([1, 2, 3], s)
    r.slots[0] = 0
    m = cache.match([1, 2, 3])
    m.slots[:] = [0, 0, 0]
    s[1] = 0  # nor does the tree keep the caller's list
    assert cache.match([1, 2, 3]).slots == original
    cache.check()


def test_check_catches_a_corrupted_counter() -> None:
    pool, cache = make(32, 1)
    cache.insert([1, 2], alloc(pool, 2))
    cache._evictable += 1
    with pytest.raises(AssertionError, match="evictable"):
        cache.check()


def test_check_catches_a_null_page_slot() -> None:
    _, cache = make(32, 4)
    cache.insert([1, 2, 3, 4], [0, 1, 2, 3])
    with pytest.raises(AssertionError, match="null-page"):
        cache.check()


def test_pretty_print(capsys: pytest.CaptureFixture[str]) -> None:
    pool, cache = make(32, 1)
    cache.insert([1, 2, 3], alloc(pool, 3))
    cache.match([1, 9])
    cache.pretty_print()
    out = capsys.readouterr().out
    assert "root" in out and "[1]" in out and "[2, 3]" in out


def test_radix_cache_shares_prefixes() -> None:
    assert RadixCache(1).shares_prefixes is True


@pytest.mark.parametrize("page_size", [1, 4])
def test_no_prefix_cache_contract(page_size: int) -> None:
    """The null cache matches nothing and holds nothing: the caller frees every slot it offers."""
    pool = PageAllocator(32 // page_size, page_size)
    cache = NoPrefixCache(page_size)
    assert cache.shares_prefixes is False and cache.page_size == page_size
    s = alloc(pool, 6)
    m = cache.match([1, 2, 3, 4, 5, 6])
    assert m.length == 0 and m.slots == [] and m.handle is cache.root
    cache.lock(m.handle)
    cache.unlock(m.handle)
    free = pool.num_free_slots
    r = cache.insert([1, 2, 3, 4, 5, 6], s)
    assert r.slots == [] and r.handle is cache.root
    assert pool.num_free_slots == free  # it never frees: every offered slot is still the caller's
    assert cache.match([1, 2, 3, 4]).length == 0
    assert cache.evict(100) == [] and cache.reset() == []
    assert cache.evictable_size == cache.locked_size == cache.total_size == 0
    assert cache.parent(cache.root) is None and cache.children(cache.root) == []
    cache.check()
    pool.free(s)
    assert pool.num_free_slots == pool.capacity


def test_match_is_fast_on_a_long_prompt() -> None:
    """A 2000-token prompt against a tree of a few hundred nodes matches in about a millisecond."""
    import random

    rng = random.Random(0)
    pool, cache = make(200_000, 1)
    system = [rng.randrange(1000) for _ in range(1500)]
    prompts = []
    for i in range(300):  # shared system prompt, branching tails: a few hundred nodes
        branch = system[: 100 * (i % 15)] + [rng.randrange(1000) for _ in range(500)]
        prompts.append(branch)
        m = cache.match(branch)
        cache.insert(branch, m.slots + alloc(pool, len(branch) - m.length))
    query = prompts[14] + [7] * 100  # 1900 cached tokens, 100 new ones
    cache.match(query)  # warm up (and do the one split)
    runs = 200
    t0 = time.perf_counter()
    for _ in range(runs):
        m = cache.match(query)
    per_match = (time.perf_counter() - t0) / runs
    assert m.length == 1900
    cache.check()
    # Generous bound so a loaded CI box does not flake; typically well under 1 ms.
    assert per_match < 5e-3, f"match took {per_match * 1e3:.2f} ms"
