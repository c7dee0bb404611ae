"""The KV pieces the layer and model tests drive by hand, in the shape those tests use: a pool that
allocates and writes, and a slot table with rows. Each wraps the engine's own classes (PageAllocator,
KVPool, ReqToToken + DeviceReqToToken); nothing here re-implements them."""

from __future__ import annotations

import torch

from radixlm.kv.kv_pool import KVPool
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.req_to_token import DeviceReqToToken, ReqToToken


class HandPool:
    """KVPool buffers plus a PageAllocator over them; slots come back as int64 tensors."""

    def __init__(
        self,
        *,
        capacity: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.allocator = PageAllocator(capacity // page_size, page_size)
        self.kv = KVPool(
            num_pages=capacity // page_size,
            page_size=page_size,
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            dtype=dtype,
            device="cpu",
        )
        self.k_buffers, self.v_buffers = self.kv.k_buffers, self.kv.v_buffers
        self.k_scales, self.v_scales = self.kv.k_scales, self.kv.v_scales  # what attention reads (fp8 KV)

    def alloc(self, n: int, last_slot: int | None = None) -> torch.Tensor:
        slots = self.allocator.alloc(n, last_slot)
        assert slots is not None, "test pool too small"
        return torch.tensor(slots, dtype=torch.int64)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.kv.write(layer, slots, k, v)

    @property
    def num_used_slots(self) -> int:
        return self.allocator.num_used_slots

    def check(self) -> None:
        self.allocator.check()


class HandRows:
    """A slot table: host rows, and the device table they are applied to after every write."""

    def __init__(self, size: int, max_context_len: int) -> None:
        self.host = ReqToToken(size, max_context_len)
        self.device = DeviceReqToToken(size, max_context_len, "cpu")
        self.table = self.device.table

    def alloc(self) -> int:
        row = self.host.alloc_row()
        assert row is not None
        return row

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        assert len(self.host.rows[row]) == start, "rows are written in order"
        self.host.append(row, slots.tolist())
        self.device.apply(self.host.take_writes())
