"""int4 weight-only, group-wise asymmetric: torch's `_weight_int4pack_mm_for_cpu` kernel.

Each output row is cut into groups of G input columns (G = 128, or 64 / 32 when the width needs it); a
group has its own scale and zero point:

    W[o, g*G + j] ~= (q[o, g*G + j] - 8) * scale[g, o] + zero[g, o]      q in [0, 15]

    scale = (max - min) / 15 over the group, zero = min + 8 * scale (the value q = 8 stands for),

which is torch's kernel's convention: scales_and_zeros is [in / G, out, 2]. The 4-bit codes are packed two
per byte, so a decode step reads an eighth of float32's bytes.

Two kernels, chosen when the weight is packed (cpu_kernels.py says which is there):
- radixlm's CPU kernel (cpu_kernels.cpp; AVX2, or AVX512_BF16 for bf16 activations): its own nibble
  order, float32 (scale, min) per group with min = zero - 8 * scale, the value code 0 stands for;
- torch's `_weight_int4pack_mm_for_cpu` otherwise (`_convert_weight_to_int4pack_for_cpu`'s layout, scales
  in the activation dtype).
"""

from __future__ import annotations

import torch

from radixlm.layers import cpu_kernels
from radixlm.model.quantization.base import QuantizedWeight, WeightOnlyMethod

GROUP_SIZES = (128, 64, 32)  # the first that divides the input width is used


class Int4Weight(QuantizedWeight):
    def __init__(self, weight: torch.Tensor, group_size: int, dtype: torch.dtype | None = None) -> None:
        """Quantize a float weight: per group, the min..max range in 15 steps."""
        w = weight.detach().float()
        groups = w.view(w.shape[0], -1, group_size)
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15.0).clamp(min=1e-12)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32)
        zero = (lo + 8.0 * scale).squeeze(-1)
        self._pack(
            q.view(w.shape), scale.squeeze(-1), zero, group_size, dtype or weight.dtype, lo.squeeze(-1)
        )

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        dtype: torch.dtype,
        low: torch.Tensor | None = None,
    ) -> Int4Weight:
        """Pack given codes [out, in] in 0..15 and per-group scale / zero [out, in / G] (a repack of
        another format's 4-bit blocks: gguf.py, repack.py). `low`, the value code 0 stands for, when the
        format has it exactly (GGUF Q4_1's min): radixlm's kernel stores that instead of zero - 8 * scale."""
        self = cls.__new__(cls)
        self._pack(codes.to(torch.int32), scale.float(), zero.float(), group_size, dtype, low)
        return self

    def _pack(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group_size: int,
        dtype: torch.dtype,
        low: torch.Tensor | None = None,
    ) -> None:
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self._ops = cpu_kernels.ops() if codes.device.type == "cpu" else None
        if self._ops is not None:
            self.packed = cpu_kernels.pack_int4(codes)
            if low is None:  # in float64, so that min is zero - 8 * scale rounded once
                low = (zero.double() - 8.0 * scale.double()).float()
            self.sm = torch.stack([scale.float(), low.float()], dim=-1).contiguous()  # [out, in/G, 2]
            return
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        sz = torch.stack([scale, zero], dim=-1)  # [out, in/G, 2]
        # In the activation dtype, as the kernel wants them (so bf16 models keep bf16 scales).
        self.scales_and_zeros = sz.transpose(0, 1).contiguous().to(dtype)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._ops is not None and x.dim() == 2 and x.is_contiguous():  # the usual [T, in]: no reshapes
            return self._ops.int4_linear(x, self.packed, self.sm, self.group_size, bias, cpu_kernels.dense_above(x.dtype))
        x2, lead = self._flat(x)
        if self._ops is not None:
            y = self._ops.int4_linear(
                x2, self.packed, self.sm, self.group_size, bias, cpu_kernels.dense_above(x2.dtype)
            )
            return y.view(*lead, self.out_features)
        if x2.dtype != self.scales_and_zeros.dtype:
            x2 = x2.to(self.scales_and_zeros.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        )
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the packed bytes hold (not what we meant to store). radixlm's layout is
        unpacked by plain torch ops (cpu_kernels.int4_reference); torch's through its kernel itself (an
        identity matmul), then scale and zero are applied."""
        if self._ops is not None:
            return cpu_kernels.int4_reference(self.packed, self.sm, self.group_size)
        sz = self.scales_and_zeros.float()  # [in/G, out, 2]
        unit = torch.stack([torch.ones_like(sz[..., 0]), torch.full_like(sz[..., 0], 8.0)], dim=-1)
        eye = torch.eye(self.in_features, dtype=torch.float32)
        codes = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, unit).T
        scale = sz[..., 0].T.repeat_interleave(self.group_size, dim=1)
        zero = sz[..., 1].T.repeat_interleave(self.group_size, dim=1)
        return (codes - 8.0) * scale + zero

    @property
    def nbytes(self) -> int:
        scales = self.sm if self._ops is not None else self.scales_and_zeros
        return self.packed.numel() * self.packed.element_size() + scales.numel() * scales.element_size()


def group_size_for(in_features: int) -> int | None:
    return next((g for g in GROUP_SIZES if in_features % g == 0), None)


class Int4WeightOnly(WeightOnlyMethod):
    name = "int4"

    def unsupported(self, weight: torch.Tensor) -> str | None:
        out_f, in_f = weight.shape
        if weight.device.type != "cpu":
            return f"the int4 kernels used here are CPU ones (weight on {weight.device.type})"
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no int4 kernel for {weight.dtype} activations"
        if group_size_for(in_f) is None:
            return (
                f"input width {in_f} is not a multiple of any group size ({', '.join(map(str, GROUP_SIZES))})"
            )
        if out_f % 16 and cpu_kernels.ops() is None:  # torch's packing takes output rows by 16
            return f"output width {out_f} is not a multiple of 16 (torch's int4 kernel; radixlm's is off here)"
        return None

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int4Weight:
        group = group_size_for(weight.shape[1])
        assert group is not None, "unsupported() first"
        return Int4Weight(weight, group, dtype)
