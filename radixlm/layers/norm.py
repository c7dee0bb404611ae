"""RMSNorm with the numerics of transformers' LlamaRMSNorm, plus an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from radixlm.layers import cpu_kernels

# Where cpu_elementwise.cpp's fused form runs: bf16 / fp16 (see `_fused_ok`).
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual).

        The residual form lets a decoder layer carry the running sum without a separate add; the add happens
        in the input dtype, exactly where HF's `residual + hidden_states` does it, so results are identical.
        """
        if self._fused_ok(x):
            ops = cpu_kernels.ops()
            if residual is None:
                return ops.rms_norm(x, self.weight, self.variance_epsilon)
            return ops.add_rms_norm(x, residual, self.weight, self.variance_epsilon)
        if residual is not None:
            x = x + residual
            residual = x
        input_dtype = x.dtype
        # As HF: variance in float32, normalize in float32, cast back, then scale by the weight in its dtype.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = self.weight * h.to(input_dtype)
        return out if residual is None else (out, residual)

    def _fused_ok(self, x: torch.Tensor) -> bool:
        """One C++ call instead of 9 torch ops (~16 us against ~40 us a call at decode sizes), for bf16 / fp16
        on a CPU where the kernels built. Not float32: the kernel's sum of squares adds in another order
        than torch's reduction, and float32 outputs are held bitwise to transformers'; in bf16 / fp16 the
        output's rounding swallows that float32 ulp of the variance but for rare ties. Not while torch.compile
        traces, which fuses the torch form itself."""
        return (
            x.dtype in _FUSED_DTYPES
            and x.device.type == "cpu"
            and self.weight.dtype == x.dtype
            and not torch.compiler.is_compiling()
            and cpu_kernels.elementwise_ok()
        )

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
