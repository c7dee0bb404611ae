"""KVPool: the per-layer K/V device buffers, allocated once, and the write of a step's new K/V.

Row ``s`` of every buffer is slot ``s`` (see page_allocator.py for the page layout and the null page).
Which slots are free or held is not tracked here: PageAllocator and KVManager do that on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerKV:
    """One layer's K/V row shape: its KV heads, the key head size and the value head size (MLA models and
    Gemma 4's global layers differ from the rest)."""

    kv_heads: int
    head_dim: int
    v_head_dim: int

    @staticmethod
    def uniform(num_layers: int, kv_heads: int, head_dim: int, v_head_dim: int | None = None) -> list[LayerKV]:
        return [LayerKV(kv_heads, head_dim, v_head_dim or head_dim)] * num_layers


class KVPool:
    def __init__(
        self,
        *,
        num_pages: int,
        page_size: int,
        num_layers: int = 0,
        num_kv_heads: int = 0,
        head_dim: int = 0,
        v_head_dim: int | None = None,
        layers: list[LayerKV] | None = None,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        """Either `layers` (one shape per layer) or num_layers x (num_kv_heads, head_dim, v_head_dim)."""
        if layers is None:
            layers = LayerKV.uniform(num_layers, num_kv_heads, head_dim, v_head_dim)
        self.page_size = page_size
        self.num_layers = len(layers)
        self.dtype = dtype
        self.device = torch.device(device)
        rows = (num_pages + 1) * page_size  # +1: the null page
        self.k_buffers = [torch.zeros(rows, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in layers]
        self.v_buffers = [torch.zeros(rows, s.kv_heads, s.v_head_dim, dtype=dtype, device=device) for s in layers]

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None, dtype: torch.dtype
    ) -> int:
        return KVPool.layout_bytes_per_token(LayerKV.uniform(num_layers, num_kv_heads, head_dim, v_head_dim), dtype)

    @staticmethod
    def layout_bytes_per_token(layers: list[LayerKV], dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return sum(s.kv_heads * (s.head_dim + s.v_head_dim) for s in layers) * elem

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k_buffers[layer][slots] = k.to(self.dtype)
        self.v_buffers[layer][slots] = v.to(self.dtype)
