"""PageAllocator (free pages as host ints), KVPool's buffers and write, and the two halves of the slot table
(ReqToToken on the host, DeviceReqToToken on the device, fed only by the host's logged writes)."""

from __future__ import annotations

import pytest
import torch

from radixlm.kv.kv_pool import KVPool
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.req_to_token import DeviceReqToToken, ReqToToken


def pages_of(slots: list[int], page_size: int) -> set[int]:
    return {s // page_size for s in slots}


def take(alloc: PageAllocator, n: int, last_slot: int | None = None) -> list[int]:
    out = alloc.alloc(n, last_slot)
    assert out is not None
    return out


# ---- PageAllocator ---------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_free_accounting(page_size: int) -> None:
    alloc = PageAllocator(32 // page_size, page_size)
    assert alloc.capacity == 32 and alloc.num_free_slots == 32 and alloc.num_used_slots == 0
    a = take(alloc, 5)
    assert len(a) == 5 and all(isinstance(s, int) for s in a)
    used = alloc.slots_needed(5, None)  # whole pages: 5 with page 1, 8 with page 4
    assert used == -(-5 // page_size) * page_size
    assert alloc.num_free_slots == 32 - used and alloc.num_used_slots == used
    b = take(alloc, 3)
    assert not set(a) & set(b) and not pages_of(a, page_size) & pages_of(b, page_size)
    alloc.check()
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free_slots == 32
    alloc.check()


def test_page_layout_slots_within_a_page_are_contiguous() -> None:
    alloc = PageAllocator(8, 4)
    s = take(alloc, 10)
    for start in (0, 4):
        first = s[start]
        assert first % 4 == 0 and s[start : start + 4] == list(range(first, first + 4))
    assert s[8] % 4 == 0 and s[9] == s[8] + 1
    assert len(pages_of(s, 4)) == 3  # 10 slots take three whole pages


@pytest.mark.parametrize("page_size", [1, 4])
def test_null_page_never_handed_out(page_size: int) -> None:
    alloc = PageAllocator(6, page_size)
    seen: list[int] = []
    # Drain the pool in odd-sized pieces, then free and drain again: no slot of page 0 appears.
    for _ in range(2):
        got = []
        while (s := alloc.alloc(3)) is not None:
            got.append(s)
        slots = [x for s in got for x in s]
        seen += slots
        assert min(slots) >= page_size  # page 0 holds slots 0 .. page_size-1
        assert max(slots) < (alloc.num_pages + 1) * page_size
        assert len(set(slots)) == len(slots)
        for s in got:
            alloc.free(s)
        alloc.check()
    assert pages_of(seen, page_size) == set(range(1, alloc.num_pages + 1))


def test_alloc_continues_a_partial_page() -> None:
    alloc = PageAllocator(8, 4)
    first = take(alloc, 2)
    free_before = alloc.num_free_slots
    # Two more tokens fit in the partly filled page: no new page is taken.
    assert alloc.room_in_page(first[-1]) == 2 and alloc.slots_needed(2, first[-1]) == 0
    more = take(alloc, 2, last_slot=first[-1])
    assert more == [first[-1] + 1, first[-1] + 2]
    assert alloc.num_free_slots == free_before
    # The page is now full: the next token starts a fresh page.
    assert alloc.room_in_page(more[-1]) == 0
    nxt = take(alloc, 3, last_slot=more[-1])
    assert nxt[0] % 4 == 0 and nxt == list(range(nxt[0], nxt[0] + 3))
    assert alloc.num_free_slots == free_before - 4
    # Overflowing a partial page: fill the rest of it, then new pages.
    assert alloc.slots_needed(6, nxt[-1]) == 8
    tail = take(alloc, 6, last_slot=nxt[-1])
    assert tail[0] == nxt[-1] + 1 and tail[1] % 4 == 0 and tail[1:] == list(range(tail[1], tail[1] + 5))
    assert alloc.num_free_slots == free_before - 4 - 8
    alloc.check()
    # Freeing any slot of a page frees the whole page.
    alloc.free(first + more)
    assert alloc.num_free_slots == free_before - 8


def test_last_slot_is_ignored_with_page_size_1() -> None:
    alloc = PageAllocator(8, 1)
    a = take(alloc, 1)
    assert alloc.room_in_page(a[-1]) == 0 and alloc.slots_needed(2, a[-1]) == 2
    take(alloc, 2, last_slot=a[-1])
    assert alloc.num_free_slots == 5


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_returns_none_and_changes_nothing_when_short(page_size: int) -> None:
    alloc = PageAllocator(16 // page_size, page_size)
    a = take(alloc, 11 if page_size == 1 else 10)  # page 4: 10 slots in 3 pages, 2 slots of room left
    free = alloc.num_free_slots
    last = a[-1]
    room = alloc.room_in_page(last)
    free_list = list(alloc._free)
    assert alloc.alloc(free + 1) is None
    assert alloc.alloc(free + room + 1, last_slot=last) is None
    assert alloc.num_free_slots == free and alloc._free == free_list  # nothing was taken
    alloc.check()
    assert alloc.alloc(free + room, last_slot=last) is not None  # the room plus every free page: fits exactly
    assert alloc.num_free_slots == 0
    assert alloc.alloc(1) is None
    alloc.check()


def test_alloc_zero_returns_empty() -> None:
    alloc = PageAllocator(2, 4)
    assert alloc.alloc(0) == [] and alloc.alloc(-1) == []
    assert alloc.num_free_slots == 8
    alloc.free([])  # a no-op
    assert alloc.num_free_slots == 8
    alloc.check()


@pytest.mark.parametrize("page_size", [1, 4])
def test_double_free_raises(page_size: int) -> None:
    alloc = PageAllocator(16 // page_size, page_size)
    a = take(alloc, 4)
    alloc.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        alloc.free(a)
    alloc.check()
    assert alloc.num_free_slots == 16


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_free_that_raises_changes_nothing(page_size: int) -> None:
    """A free naming one bad page (already free, the null page, outside the pool) raises before it frees
    any of the others: the allocator stays consistent and every page stays where it was."""
    alloc = PageAllocator(16 // page_size, page_size)
    a = take(alloc, 8)
    b = take(alloc, 1)
    alloc.free(b)  # b's page is free again
    free = alloc.num_free_slots
    bad_lists = [a + b, a + [0], a + [(alloc.num_pages + 1) * page_size]]
    if page_size == 1:
        bad_lists.append(a[:1] + a[:1])  # the same page twice in one call
    for bad in bad_lists:
        with pytest.raises(RuntimeError):
            alloc.free(bad)
        alloc.check()
        assert alloc.num_free_slots == free
    alloc.free(a)  # still all ours
    assert alloc.num_free_slots == alloc.capacity


@pytest.mark.parametrize("page_size", [1, 4])
def test_freeing_the_null_page_or_outside_the_pool_raises(page_size: int) -> None:
    alloc = PageAllocator(4, page_size)
    with pytest.raises(RuntimeError, match="null page"):
        alloc.free([0])
    with pytest.raises(RuntimeError, match="outside the pool"):
        alloc.free([5 * page_size])
    alloc.check()
    assert alloc.num_free_slots == alloc.capacity


def test_rejects_an_empty_pool() -> None:
    with pytest.raises(ValueError):
        PageAllocator(0, 4)


def test_clear_returns_everything() -> None:
    alloc = PageAllocator(4, 4)
    take(alloc, 9)
    alloc.clear()
    assert alloc.num_free_slots == 16
    alloc.check()
    assert len(pages_of(take(alloc, 16), 4)) == 4


def test_check_catches_corruption() -> None:
    alloc = PageAllocator(4, 1)
    a = take(alloc, 1)
    alloc._free.append(a[0])  # a used page also on the free list
    with pytest.raises(AssertionError):
        alloc.check()
    alloc = PageAllocator(4, 1)
    alloc._free.append(alloc._free[-1])  # a page on the free list twice
    with pytest.raises(AssertionError):
        alloc.check()


# ---- KVPool ----------------------------------------------------------------------------------------


def make_pool(num_pages: int, page_size: int, dtype: torch.dtype = torch.float32) -> KVPool:
    return KVPool(
        num_pages=num_pages,
        page_size=page_size,
        num_layers=2,
        num_kv_heads=2,
        head_dim=3,
        v_head_dim=5,
        dtype=dtype,
        device="cpu",
    )


def test_kv_pool_buffers_include_the_null_page() -> None:
    pool = make_pool(3, 4)
    assert len(pool.k_buffers) == len(pool.v_buffers) == 2
    for k, v in zip(pool.k_buffers, pool.v_buffers):
        assert k.shape == (16, 2, 3) and v.shape == (16, 2, 5)  # (3 pages + the null page) * 4 rows


def test_kv_pool_write_touches_only_the_given_slots_and_layer() -> None:
    pool = make_pool(3, 4, dtype=torch.bfloat16)
    slots = torch.tensor([4, 5, 9], dtype=torch.int64)
    k = torch.arange(3 * 2 * 3, dtype=torch.float32).view(3, 2, 3)
    v = -torch.arange(3 * 2 * 5, dtype=torch.float32).view(3, 2, 5)
    pool.write(1, slots, k, v)
    assert pool.k_buffers[1].dtype == torch.bfloat16  # converted to the pool's dtype
    assert torch.equal(pool.k_buffers[1][slots].float(), k)
    assert torch.equal(pool.v_buffers[1][slots].float(), v)
    others = [s for s in range(16) if s not in (4, 5, 9)]
    assert not pool.k_buffers[1][others].any() and not pool.v_buffers[1][others].any()
    assert not pool.k_buffers[0].any() and not pool.v_buffers[0].any()


def test_bytes_per_token() -> None:
    assert KVPool.bytes_per_token(2, 2, 3, 5, torch.float32) == 2 * 2 * (3 + 5) * 4
    assert KVPool.bytes_per_token(4, 8, 64, None, torch.bfloat16) == 4 * 8 * 128 * 2
    pool = make_pool(3, 4)
    total = sum(b.numel() * b.element_size() for b in pool.k_buffers + pool.v_buffers)
    assert total == 16 * KVPool.bytes_per_token(2, 2, 3, 5, torch.float32)


# ---- ReqToToken / DeviceReqToToken -----------------------------------------------------------------


def test_rows_are_handed_out_and_returned() -> None:
    table = ReqToToken(3, 8)
    rows = [table.alloc_row() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2] and table.num_free_rows == 0
    assert table.alloc_row() is None
    table.append(rows[1], [5, 6])
    table.free_row(rows[1])
    assert table.num_free_rows == 1 and table.rows[rows[1]] == []
    assert table.alloc_row() == rows[1]


def test_writes_are_logged_and_applied() -> None:
    host = ReqToToken(4, 8)
    dev = DeviceReqToToken(4, 8, "cpu")
    a, b = host.alloc_row(), host.alloc_row()
    host.append(a, [4, 5, 6])
    host.append(b, [9])
    host.append(a, [7])
    writes = host.take_writes()
    assert writes == [(a, 0, [4, 5, 6]), (b, 0, [9]), (a, 3, [7])]
    assert host.take_writes() == []  # taken once
    dev.apply(writes)
    assert dev.table[a, :4].tolist() == [4, 5, 6, 7] and dev.table[b, :1].tolist() == [9]
    assert not dev.table[a, 4:].any() and not dev.table[b, 1:].any()
    host.replace_head(a, [12, 13])
    assert host.rows[a] == [12, 13, 6, 7]
    assert host.take_writes() == [(a, 0, [12, 13])]
    dev.apply([(a, 0, [12, 13])])
    assert dev.table[a, :4].tolist() == host.rows[a]
    dev.apply([])  # nothing to do


def test_append_past_the_context_length_raises_and_logs_nothing() -> None:
    host = ReqToToken(2, 4)
    r = host.alloc_row()
    host.append(r, [1, 2, 3])
    host.take_writes()
    with pytest.raises(RuntimeError, match="context length"):
        host.append(r, [4, 5])
    assert host.rows[r] == [1, 2, 3] and host.take_writes() == []


def test_a_cell_written_twice_in_one_step_keeps_the_later_value() -> None:
    host = ReqToToken(2, 8)
    dev = DeviceReqToToken(2, 8, "cpu")
    r = host.alloc_row()
    host.append(r, [4, 5, 6, 7, 8])
    host.replace_head(r, [20, 21, 22, 23])  # the head is replaced after the append, in the same step
    host.free_row(r)  # ... and the row is freed and reused by another request
    r2 = host.alloc_row()
    assert r2 == r
    host.append(r2, [30])
    writes = host.take_writes()
    dev.apply(writes)
    assert dev.table[r, :5].tolist() == [30, 21, 22, 23, 8]
    assert host.rows[r2] == [30]
    # The same in reverse order: the later write wins, whatever the order of the cells.
    dev2 = DeviceReqToToken(1, 4, "cpu")
    dev2.apply([(0, 1, [3, 3]), (0, 0, [1, 2, 9]), (0, 2, [5])])
    assert dev2.table[0].tolist() == [1, 2, 5, 0]
