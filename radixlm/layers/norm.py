"""RMSNorm with the numerics of transformers' LlamaRMSNorm, plus an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn


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
        if residual is not None:
            x = x + residual
            residual = x
        input_dtype = x.dtype
        # As HF: variance in float32, normalize in float32, cast back, then scale by the weight in its dtype.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = self.weight * h.to(input_dtype)
        return out if residual is None else (out, residual)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
