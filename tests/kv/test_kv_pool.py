"""Unit tests of KVPool's page allocator: accounting, page continuation, all-or-nothing, misuse."""

from __future__ import annotations

import pytest
import torch

from radixlm.kv.kv_pool import KVPool


def make_pool(capacity: int, page_size: int) -> KVPool:
    return KVPool(
        capacity=capacity,
        page_size=page_size,
        num_layers=1,
        num_kv_heads=1,
        head_dim=2,
        dtype=torch.float32,
        device="cpu",
    )


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_free_accounting(page_size: int) -> None:
    pool = make_pool(32, page_size)
    assert pool.capacity == 32 and pool.num_free_slots == 32 and pool.num_used_slots == 0
    a = pool.alloc(5)
    assert a is not None and a.numel() == 5 and a.dtype == torch.int64
    used = pool.slots_needed(5, None)  # whole pages: 5 with page 1, 8 with page 4
    assert used == -(-5 // page_size) * page_size
    assert pool.num_free_slots == 32 - used and pool.num_used_slots == used
    b = pool.alloc(3)
    assert b is not None
    assert not set(a.tolist()) & set(b.tolist())
    pool.check()
    pool.free(a)
    pool.free(b)
    assert pool.num_free_slots == 32
    pool.check()


def test_slots_within_a_page_are_contiguous() -> None:
    pool = make_pool(32, 4)
    s = pool.alloc(10)
    assert s is not None
    pages = s[:8].view(-1, 4)
    assert bool((pages[:, 0] % 4 == 0).all())
    assert bool((pages - pages[:, :1] == torch.arange(4)).all())
    assert int(s[8]) % 4 == 0 and int(s[9]) == int(s[8]) + 1


def test_page_continuation_via_last_slot() -> None:
    pool = make_pool(32, 4)
    first = pool.alloc(2)
    assert first is not None
    free_before = pool.num_free_slots
    # Two more tokens fit in the partly filled page: no new page is taken.
    assert pool.pages_needed(2, int(first[-1])) == 0
    more = pool.alloc(2, last_slot=int(first[-1]))
    assert more is not None
    assert more.tolist() == [int(first[-1]) + 1, int(first[-1]) + 2]
    assert pool.num_free_slots == free_before
    # The page is now full: the next token starts a fresh page.
    nxt = pool.alloc(3, last_slot=int(more[-1]))
    assert (
        nxt is not None and int(nxt[0]) % 4 == 0 and nxt.tolist() == list(range(int(nxt[0]), int(nxt[0]) + 3))
    )
    assert pool.num_free_slots == free_before - 4
    # Overflowing a partial page: fill the rest of it, then new pages.
    tail = pool.alloc(6, last_slot=int(nxt[-1]))
    assert tail is not None
    assert int(tail[0]) == int(nxt[-1]) + 1 and int(tail[1]) % 4 == 0
    assert pool.num_free_slots == free_before - 4 - 8
    pool.check()


def test_last_slot_ignored_with_page_size_1() -> None:
    pool = make_pool(8, 1)
    a = pool.alloc(1)
    assert a is not None
    b = pool.alloc(2, last_slot=int(a[-1]))
    assert b is not None and pool.num_free_slots == 5


@pytest.mark.parametrize("page_size", [1, 4])
def test_alloc_is_all_or_nothing(page_size: int) -> None:
    pool = make_pool(16, page_size)
    a = pool.alloc(12)
    assert a is not None
    free = pool.num_free_slots
    assert pool.alloc(free + 1) is None
    assert pool.num_free_slots == free  # nothing was taken by the failed call
    pool.check()
    assert pool.alloc(free) is not None
    assert pool.num_free_slots == 0
    assert pool.alloc(1) is None


def test_alloc_zero_returns_empty() -> None:
    pool = make_pool(8, 4)
    out = pool.alloc(0)
    assert out is not None and out.numel() == 0 and out.dtype == torch.int64
    assert pool.num_free_slots == 8
    pool.free(torch.empty(0, dtype=torch.int64))  # a no-op
    assert pool.num_free_slots == 8


@pytest.mark.parametrize("page_size", [1, 4])
def test_double_free_raises(page_size: int) -> None:
    pool = make_pool(16, page_size)
    a = pool.alloc(4)
    assert a is not None
    pool.free(a)
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(a)
    pool.check()
    assert pool.num_free_slots == 16


def test_freeing_the_null_page_raises() -> None:
    pool = make_pool(16, 4)
    with pytest.raises(RuntimeError, match="null page"):
        pool.free(torch.tensor([1], dtype=torch.int64))


@pytest.mark.parametrize("page_size", [1, 4])
def test_null_page_never_handed_out(page_size: int) -> None:
    pool = make_pool(24, page_size)
    seen: list[int] = []
    # Drain the pool in odd-sized pieces, then free and drain again: slot page 0 never appears.
    for _ in range(2):
        got = []
        while (s := pool.alloc(3)) is not None:
            got.append(s)
        slots = torch.cat(got)
        seen += slots.tolist()
        assert bool((slots >= page_size).all())
        assert int(slots.max()) < (pool.num_pages + 1) * page_size
        for s in got:
            pool.free(s)
        pool.check()
    assert min(seen) >= page_size


def test_capacity_rounds_down_to_pages_and_rejects_tiny() -> None:
    pool = make_pool(10, 4)
    assert pool.capacity == 8 and pool.num_pages == 2
    with pytest.raises(ValueError):
        make_pool(3, 4)


def test_clear_returns_everything() -> None:
    pool = make_pool(16, 4)
    assert pool.alloc(9) is not None
    pool.clear()
    assert pool.num_free_slots == 16
    pool.check()
