"""int8 weight-only: one symmetric scale per output channel, torch's `_weight_int8pack_mm` kernel.

    W[o, i] ~= q[o, i] * scale[o]      q in [-127, 127] (int8), scale = max|W[o, :]| / 127

Activations stay in the model's dtype; the kernel converts each int8 weight element as it multiplies, so a
decode step reads a quarter of the bytes of float32 (half of bf16) from memory: on a CPU, decode is
bound by exactly that read.
"""

from __future__ import annotations

import torch

from radixlm.model.quantization.base import QuantizedWeight, WeightOnlyMethod


class Int8Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        w = weight.detach().float()
        self.out_features, self.in_features = w.shape
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.qweight = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        # The kernel wants scales in the activation dtype.
        self.scales = scale.to(dtype or weight.dtype).contiguous()

    @classmethod
    def from_parts(cls, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
        """Given int8 codes [out, in] and per-channel scales [out] (a checkpoint's own: repack.py)."""
        self = cls.__new__(cls)
        self.out_features, self.in_features = q.shape
        self.qweight = q.to(torch.int8).contiguous()
        self.scales = scale.to(dtype).contiguous()
        return self

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2, lead = self._flat(x)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * self.scales.element_size()


class Int8WeightOnly(WeightOnlyMethod):
    name = "int8"

    def unsupported(self, weight: torch.Tensor) -> str | None:
        if weight.device.type != "cpu":
            return f"the int8 kernel used here is torch's CPU one (weight on {weight.device.type})"
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no int8 kernel for {weight.dtype} activations"
        return None

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Weight:
        return Int8Weight(weight, dtype)
