"""Gated activations for the fused gate_up projection: [T, 2*I] -> [T, I]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import cpu_kernels

# silu and mul in one pass of cpu_elementwise.cpp for these; float32 keeps torch's ops (held bitwise to
# transformers; the kernel's exp differs from torch's by about a float32 ulp).
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


class SiluAndMul(nn.Module):
    """silu(gate) * up, where the input is [gate | up]: HF's `act_fn(gate_proj(x)) * up_proj(x)` for silu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype in _FUSED_DTYPES
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()  # the compiler fuses the torch form itself
            and cpu_kernels.elementwise_ok()
        ):
            return cpu_kernels.ops().silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


# transformers' ACT2FN names that are exactly F.silu.
_SILU_NAMES = ("silu", "swish")


def get_act_and_mul(hidden_act: str) -> nn.Module:
    """The gated activation for a config's `hidden_act`; only silu is implemented natively."""
    if hidden_act in _SILU_NAMES:
        return SiluAndMul()
    raise ValueError(
        f"hidden_act={hidden_act!r} is not supported by the native gated MLP (only {', '.join(_SILU_NAMES)}); "
        "use model_impl='transformers' for this model"
    )
