"""What every weight quantization method gives: a quantized weight that multiplies like F.linear.

A method turns a float [out, in] weight (one rank's shard, already loaded by the layer's own weight_loader)
into a `QuantizedWeight`: it keeps the packed integer weight and its scales, is called as `qw(x, bias)`
in place of `F.linear(x, weight, bias)`, can give back its float reference (`dequantize()`, what tests
compare the kernel against) and says how many bytes it holds. Layers ask for nothing more (layers/linear.py
duck-types it), so every method plugs into native linears, the LM head and the Transformers backend alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class QuantizedWeight(ABC):
    """A packed weight and its scales; `__call__` is its matmul."""

    out_features: int
    in_features: int

    @abstractmethod
    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The float32 [out, in] weight this packing stands for: the kernel's exact reference."""

    @property
    @abstractmethod
    def nbytes(self) -> int: ...

    def _flat(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        return (x2 if x2.is_contiguous() else x2.contiguous()), lead


class WeightOnlyMethod(ABC):
    """A quantization applied at load to a float checkpoint's linear weights."""

    name: str

    @abstractmethod
    def unsupported(self, weight: torch.Tensor) -> str | None:
        """Why this weight cannot be quantized by the method (its shape, the device), or None."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
        """Pack `weight` for activations of `dtype` (default: the weight's own)."""
