"""int8 weight-only: symmetric int8 codes with one scale per output channel (or per group of input columns).

    W[o, i] ~= q[o, i] * scale[o]      q in [-127, 127] (int8), scale = max|W[o, :]| / 127

Activations stay in the model's dtype; the kernel converts each int8 weight element as it multiplies, so a
decode step reads a quarter of the bytes of float32 (half of bf16) from memory: on a CPU, decode is
bound by exactly that read.

Two kernels, chosen when the weight is packed (cpu_kernels.py says which is there):
- radixlm's CPU kernel (cpu_kernels.cpp; AVX2, or AVX-512): float32 scales, also a scale per group of input columns
  (GGUF Q8_0's blocks of 32, repacked without rounding again: gguf.py);
- torch's `_weight_int8pack_mm` otherwise: per-channel scales only, in the activation dtype.
"""

from __future__ import annotations

import torch

from radixlm.layers import cpu_kernels
from radixlm.model.quantization.base import QuantizedWeight, WeightOnlyMethod


class Int8Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self._pack(q, scale[:, None], dtype or weight.dtype, weight.device)

    @classmethod
    def from_parts(cls, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """Given int8 codes [out, in] and scales [out] per channel or [out, in / G] per group of G input
        columns (a checkpoint's own: repack.py, gguf.py). Groups need radixlm's kernel (`grouped_ok`)."""
        self = cls.__new__(cls)
        self._pack(q, scale if scale.dim() == 2 else scale[:, None], dtype, q.device)
        return self

    def _pack(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.out_features, self.in_features = q.shape
        self.qweight = q.to(torch.int8).contiguous()
        groups = scale.shape[1]
        self.group_size = self.in_features // groups
        self._ops = cpu_kernels.ops() if device.type == "cpu" else None
        if self._ops is not None:
            self._scales2d = scale.float().contiguous()  # [out, groups], float32: the kernel's
            if groups != 1 and (self.group_size % 16 or self.in_features % groups):
                raise ValueError(
                    f"int8 groups of {self.group_size} columns: the kernel takes multiples of 16"
                )
        elif groups != 1:
            raise ValueError("int8 with a scale per group needs radixlm's CPU kernel (cpu_kernels.py)")
        else:
            # torch's kernel wants per-channel scales in the activation dtype.
            self._scales2d = scale.to(dtype).contiguous()
        # Per channel: [out]; per group: [out, in / G] (what tests compare the rounding against).
        self.scales = self._scales2d[:, 0] if groups == 1 else self._scales2d

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._ops is not None and x.dim() == 2 and x.is_contiguous():  # the usual [T, in]: no reshapes
            return self._ops.int8_linear(x, self.qweight, self._scales2d, self.group_size, bias, cpu_kernels.dense_above(x.dtype))
        x2, lead = self._flat(x)
        if self._ops is not None:
            y = self._ops.int8_linear(
                x2, self.qweight, self._scales2d, self.group_size, bias, cpu_kernels.dense_above(x2.dtype)
            )
            return y.view(*lead, self.out_features)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return cpu_kernels.int8_reference(self.qweight, self._scales2d, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self._scales2d.numel() * self._scales2d.element_size()


def grouped_ok(device: torch.device) -> bool:
    """Whether int8 with a scale per group of input columns can run here (radixlm's kernel only)."""
    return device.type == "cpu" and cpu_kernels.ops() is not None


class Int8WeightOnly(WeightOnlyMethod):
    name = "int8"

    def unsupported(self, weight: torch.Tensor) -> str | None:
        if weight.device.type != "cpu":
            return f"the int8 kernels used here are CPU ones (weight on {weight.device.type})"
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no int8 kernel for {weight.dtype} activations"
        return None

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Weight:
        return Int8Weight(weight, dtype)
