"""KVManager.extend_decodes, the decode step's one call for every running request: the same slots, rows and
table writes as extend(state, 1) one request after another, and no change at all when it declines."""

from __future__ import annotations

import pytest

from radixlm.kv.kv_manager import KVManager
from radixlm.kv.no_prefix_cache import NoPrefixCache
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.radix_cache import RadixCache
from radixlm.kv.req_to_token import ReqToToken


def _manager(page_size: int, num_pages: int, radix: bool) -> KVManager:
    cache = RadixCache(page_size) if radix else NoPrefixCache(page_size)
    return KVManager(PageAllocator(num_pages, page_size), ReqToToken(8, 64), cache)


def _running(kv: KVManager, lengths: list[int]) -> list:
    """Requests admitted with these prompt lengths (no prefix hit), their admission writes taken."""
    states = []
    for n in lengths:
        admitted = kv.admit(kv.match([]), n)
        assert admitted is not None
        states.append(admitted[0])
    kv.take_table_writes()
    return states


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("radix", [False, True])
def test_extend_decodes_gives_what_extend_gives_one_by_one(page_size: int, radix: bool) -> None:
    lengths = [1, 3, 4, 5, 8]  # with page_size 4: some continue their last page, some need a fresh one
    one, many = _manager(page_size, 80, radix), _manager(page_size, 80, radix)
    a, b = _running(one, lengths), _running(many, lengths)
    for _ in range(6):
        expected = [one.extend(s, 1) for s in a]
        got = many.extend_decodes(b)
        assert got == expected
        assert one.take_table_writes() == many.take_table_writes()
        assert [one.slots(s) for s in a] == [many.slots(s) for s in b]
        assert one.allocator.num_free_slots == many.allocator.num_free_slots
        many.check()


@pytest.mark.parametrize("page_size", [1, 4])
def test_extend_decodes_declines_without_a_change_when_the_pool_is_short(page_size: int) -> None:
    kv = _manager(page_size, 3, radix=False)
    states = _running(kv, [page_size] * 3)  # every page full: each decode needs a fresh page, none is free
    before = ([kv.slots(s)[:] for s in states], kv.allocator.num_free_slots)
    assert kv.extend_decodes(states) is None
    assert ([kv.slots(s)[:] for s in states], kv.allocator.num_free_slots) == before
    assert kv.take_table_writes() == []
    kv.check()


def test_extend_decodes_declines_a_full_row() -> None:
    kv = KVManager(PageAllocator(100, 1), ReqToToken(2, 4), NoPrefixCache(1))
    states = _running(kv, [4, 2])  # the first row is at the context length
    assert kv.extend_decodes(states) is None
    assert kv.allocator.num_free_slots == 100 - 6
    kv.check()
