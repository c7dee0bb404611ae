"""KVPool: the per-layer K/V device buffers, allocated once, and the write of a step's new K/V.

Row ``s`` of every buffer is slot ``s`` (see page_allocator.py for the page layout and the null page).
Which slots are free or held is not tracked here: PageAllocator and KVManager do that on the host.
"""

from __future__ import annotations

import torch


class KVPool:
    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.page_size = page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = torch.device(device)
        rows = (num_pages + 1) * page_size  # +1: the null page
        v_dim = v_head_dim or head_dim
        self.k_buffers = [
            torch.zeros(rows, num_kv_heads, head_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]
        self.v_buffers = [
            torch.zeros(rows, num_kv_heads, v_dim, dtype=dtype, device=device) for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None, dtype: torch.dtype
    ) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return num_layers * num_kv_heads * (head_dim + (v_head_dim or head_dim)) * elem

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)
