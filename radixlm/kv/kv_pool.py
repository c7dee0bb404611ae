"""KVPool: the per-layer K/V tensors, allocated once, and the page allocator over their slots.

Memory layout (page_size = P):

    buffer row:  0 .. P-1  | P .. 2P-1 | 2P .. 3P-1 | ...
    page id:        0      |     1     |      2     | ...
                 null page |  allocatable pages 1..num_pages

A *slot* is one token's K/V row in every layer. Page 0 is never handed out: padded gathers in the
attention backend point at slot 0, so they read finite garbage instead of going out of bounds.
The allocator hands out whole pages; a request that extends its last, partly filled page keeps writing
into it (``alloc(n, last_slot=...)``), so a sequence's slots are contiguous within each page.

Ownership is not tracked here: the pool only knows used vs free pages. Who holds a used page (the radix
tree or a running request) is the scheduler's and the cache's business, and ``Scheduler.check()`` adds the
counts up (DESIGN.md invariant 2).
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self,
        *,
        capacity: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if capacity < page_size:
            raise ValueError(f"KV pool capacity {capacity} is smaller than one page ({page_size} tokens)")
        self.page_size = page_size
        self.num_pages = capacity // page_size
        self.capacity = self.num_pages * page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        rows = (self.num_pages + 1) * page_size
        v_dim = v_head_dim or head_dim
        self.k_buffers = [
            torch.zeros(rows, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.zeros(rows, num_kv_heads, v_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        # A stack of free page ids; popping from the end keeps alloc O(n) in pages, not in the pool size.
        self._free_pages: list[int] = list(range(self.num_pages, 0, -1))
        self._page_used = torch.zeros(self.num_pages + 1, dtype=torch.bool)
        self._page_used[0] = True  # the null page

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_free_slots(self) -> int:
        return len(self._free_pages) * self.page_size

    @property
    def num_used_slots(self) -> int:
        return self.capacity - self.num_free_slots

    def pages_needed(self, n: int, last_slot: int | None) -> int:
        """Pages that `alloc(n, last_slot)` would take from the free list."""
        room = self._room_in_page(last_slot)
        extra = max(0, n - room)
        return -(-extra // self.page_size)

    def slots_needed(self, n: int, last_slot: int | None) -> int:
        return self.pages_needed(n, last_slot) * self.page_size

    # ---- allocation -------------------------------------------------------------------------------
    def alloc(self, n: int, last_slot: int | None = None) -> torch.Tensor | None:
        """Return `n` new slots that continue `last_slot`'s page, or None (and change nothing) if short."""
        if n <= 0:
            return torch.empty(0, dtype=torch.int64)
        need_pages = self.pages_needed(n, last_slot)
        if need_pages > len(self._free_pages):
            return None
        room = min(self._room_in_page(last_slot), n)
        parts = []
        if room:
            parts.append(torch.arange(last_slot + 1, last_slot + 1 + room, dtype=torch.int64))
        if need_pages:
            pages = self._free_pages[-need_pages:]
            del self._free_pages[-need_pages:]
            page_t = torch.tensor(pages[::-1], dtype=torch.int64)
            self._page_used[page_t] = True
            new = (page_t[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)
            parts.append(new[: n - room])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def free(self, slots: torch.Tensor) -> None:
        """Free the pages that hold `slots`. The caller owns every slot of those pages."""
        if slots.numel() == 0:
            return
        pages = torch.unique(slots // self.page_size)
        if bool((pages == 0).any()):
            raise RuntimeError("KVPool.free: the null page cannot be freed")
        if not bool(self._page_used[pages].all()):
            raise RuntimeError("KVPool.free: double free of a KV page")
        self._page_used[pages] = False
        self._free_pages.extend(pages.tolist())

    def clear(self) -> None:
        self._free_pages = list(range(self.num_pages, 0, -1))
        self._page_used.zero_()
        self._page_used[0] = True

    def check(self) -> None:
        used = int(self._page_used.sum()) - 1
        if used + len(self._free_pages) != self.num_pages:
            raise AssertionError(
                f"KVPool: {used} used + {len(self._free_pages)} free pages != {self.num_pages}"
            )
        if len(set(self._free_pages)) != len(self._free_pages):
            raise AssertionError("KVPool: a page is on the free list twice")

    # ---- K/V access -------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)

    def _room_in_page(self, last_slot: int | None) -> int:
        if last_slot is None or self.page_size == 1:
            return 0
        return self.page_size - 1 - (last_slot % self.page_size)


class ReqToTokenPool:
    """Row r of `table` lists, in order, the KV slots of the request that holds row r.

    Attention reads a request's whole KV history through its row, so a prefix hit, a chunk and a decode
    token are all just more entries in the same row (DESIGN.md invariant 1).
    """

    def __init__(self, size: int, max_context_len: int, device: torch.device | str) -> None:
        self.size = size
        self.max_context_len = max_context_len
        self.table = torch.zeros(size, max_context_len, dtype=torch.int64, device=device)
        self._free_rows: list[int] = list(range(size - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.table[row, start : start + slots.numel()] = slots.to(self.table.device)
