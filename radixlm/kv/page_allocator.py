"""PageAllocator: which KV pages are free, as host ints. It never touches a device tensor.

Memory layout (page_size = P) of the pool this allocator hands out:

    buffer row:  0 .. P-1  | P .. 2P-1 | 2P .. 3P-1 | ...
    page id:        0      |     1     |      2     | ...
                 null page |  allocatable pages 1..num_pages

A *slot* is one token's K/V row in every layer; slot s lives in page s // P. Page 0 is never handed out:
padded gathers in the attention backend point at slot 0, so they read finite garbage instead of going out
of bounds. The allocator hands out whole pages; a request that extends its last, partly filled page keeps
writing into it (``alloc(n, last_slot=...)``), so a sequence's slots are contiguous within each page.

Who holds a used page (the prefix cache or a running request) is KVManager's business, not this one's.
"""

from __future__ import annotations

from collections.abc import Iterable


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.capacity = num_pages * page_size
        # A stack of free page ids; popping from the end keeps alloc O(pages taken), not O(pool size).
        self._free: list[int] = list(range(num_pages, 0, -1))
        self._used = bytearray(num_pages + 1)  # 1 = handed out; index 0 is the null page
        self._used[0] = 1

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free) * self.page_size

    @property
    def num_used_slots(self) -> int:
        return self.capacity - self.num_free_slots

    def room_in_page(self, last_slot: int | None) -> int:
        """Slots left in the page that holds ``last_slot`` (0 for a fresh sequence or page_size 1)."""
        if last_slot is None or self.page_size == 1:
            return 0
        return self.page_size - 1 - last_slot % self.page_size

    def slots_needed(self, n: int, last_slot: int | None) -> int:
        """Free-list slots (whole pages) that ``alloc(n, last_slot)`` would take."""
        extra = max(0, n - self.room_in_page(last_slot))
        return -(-extra // self.page_size) * self.page_size

    # ---- allocation -------------------------------------------------------------------------------
    def alloc(self, n: int, last_slot: int | None = None) -> list[int] | None:
        """``n`` new slots continuing ``last_slot``'s page, or None (and nothing changes) if short."""
        if n <= 0:
            return []
        page = self.page_size
        need_pages = self.slots_needed(n, last_slot) // page
        if need_pages > len(self._free):
            return None
        room = min(self.room_in_page(last_slot), n)
        slots = list(range(last_slot + 1, last_slot + 1 + room)) if room else []
        if need_pages:
            pages = self._free[-need_pages:][::-1]
            del self._free[-need_pages:]
            used = self._used
            for p in pages:
                used[p] = 1
            if page == 1:
                slots.extend(pages)
            else:
                slots.extend(p * page + i for p in pages for i in range(page))
                del slots[n:]
        return slots

    def take_pages(self, n: int) -> list[int] | None:
        """``n`` free pages, in the order n calls of ``alloc`` for a fresh page each would take them, or None
        (and nothing changes) if fewer are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[-n:][::-1]
        del self._free[-n:]
        used = self._used
        for p in pages:
            used[p] = 1
        return pages

    def free(self, slots: Iterable[int]) -> None:
        """Free the pages that hold ``slots``. The caller owns every slot of those pages."""
        page = self.page_size
        pages = list(slots) if page == 1 else sorted({s // page for s in slots})
        if not pages:
            return
        used = self._used
        # Check every page before changing any: a bad call must leave the allocator as it was.
        for p in pages:
            if p <= 0 or p > self.num_pages:
                raise RuntimeError(f"PageAllocator.free: page {p} is the null page or outside the pool")
            if not used[p]:
                raise RuntimeError(f"PageAllocator.free: double free of KV page {p}")
        if page == 1 and len(set(pages)) != len(pages):
            raise RuntimeError("PageAllocator.free: double free of a KV page passed twice")
        for p in pages:
            used[p] = 0
        self._free.extend(pages)

    def clear(self) -> None:
        self._free = list(range(self.num_pages, 0, -1))
        self._used = bytearray(self.num_pages + 1)
        self._used[0] = 1

    def check(self) -> None:
        used = sum(self._used) - 1
        if used + len(self._free) != self.num_pages:
            raise AssertionError(
                f"PageAllocator: {used} used + {len(self._free)} free pages != {self.num_pages}"
            )
        if len(set(self._free)) != len(self._free):
            raise AssertionError("PageAllocator: a page is on the free list twice")
        if any(self._used[p] for p in self._free):
            raise AssertionError("PageAllocator: a free page is marked used")
