"""KVPool: the per-layer K/V device buffers, allocated once, and the write of a step's new K/V.

Row ``s`` of every buffer is slot ``s`` (see page_allocator.py for the page layout and the null page).
Which slots are free or held is not tracked here: PageAllocator and KVManager do that on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.kv.kv_cache_dtype import is_fp8, quantize_kv


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
        k_scales: list[float] | None = None,
        v_scales: list[float] | None = None,
    ) -> None:
        """Either `layers` (one shape per layer) or num_layers x (num_kv_heads, head_dim, v_head_dim).
        dtype is the stored one (--kv-cache-dtype); k_scales / v_scales (one per layer, default 1.0) are the
        fp8 dequantization scales (kv_cache_dtype.py)."""
        if layers is None:
            layers = LayerKV.uniform(num_layers, num_kv_heads, head_dim, v_head_dim)
        self.page_size = page_size
        self.num_layers = len(layers)
        self.dtype = dtype
        self.device = torch.device(device)
        rows = (num_pages + 1) * page_size  # +1: the null page
        self.k_buffers = [torch.zeros(rows, s.kv_heads, s.head_dim, dtype=dtype, device=device) for s in layers]
        self.v_buffers = [torch.zeros(rows, s.kv_heads, s.v_head_dim, dtype=dtype, device=device) for s in layers]
        self.k_scales = list(k_scales) if k_scales is not None else [1.0] * self.num_layers
        self.v_scales = list(v_scales) if v_scales is not None else [1.0] * self.num_layers
        if len(self.k_scales) != self.num_layers or len(self.v_scales) != self.num_layers:
            raise ValueError(
                f"KV scales: {len(self.k_scales)} / {len(self.v_scales)} for {self.num_layers} layers"
            )

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
        k_q = quantize_kv(k, self.dtype, self.k_scales[layer])
        v_q = quantize_kv(v, self.dtype, self.v_scales[layer])
        if is_fp8(self.dtype):
            # Through byte views of the same storage: float8 lacks some indexing kernels (index_copy_ on CPU,
            # measured with torch 2.13), and uint8 has them on every device.
            self.k_buffers[layer].view(torch.uint8)[slots] = k_q.view(torch.uint8)
            self.v_buffers[layer].view(torch.uint8)[slots] = v_q.view(torch.uint8)
            return
        self.k_buffers[layer][slots] = k_q
        self.v_buffers[layer][slots] = v_q
