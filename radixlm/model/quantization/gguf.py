"""`--quantization gguf`: a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks repacked, without requantizing, into the
int4 / int8 kernels.

The GGUF loader hands every layer float weights (dequantized exactly: each value is a small integer times
a per-block scale, plus a per-block minimum for Q4_1), and the layers load them with their own weight
loaders, fused q/k/v and gate/up and tensor-parallel shards included. This method then finds the blocks'
integers again, per group of 32 input columns (llama.cpp's block size), and packs them with the block's
own scale:

    Q4_1   x = q * d + m,        q in 0..15: the block's min is m (q = 0), its max m + 15 d (q = 15)
           -> scale d, zero m + 8 d
    Q4_0   x = (q - 8) * d,      q in 0..15: the value of largest magnitude is -8 d (q = 0)
           -> scale d, zero 0
    Q8_0   x = q * d,            q in -127..127 (llama.cpp picks d = max|x| / 127, so the block's largest
                                 magnitude is 127 d) -> int8 with a scale per block of 32 (radixlm's kernel)

A weight every one of whose groups fits one of these exactly (to float32 rounding) is packed as such and is
the same matrix; any other (F16, K-quants; Q8_0 without radixlm's CPU kernel, whose fallback, torch's,
takes per-channel scales only) is quantized to int8 per output channel, which does round again. The log
counts each. With radixlm's kernel the scales stay float32; with torch's they take the activation dtype
(in bfloat16 they round to bf16).
"""

from __future__ import annotations

import torch

from radixlm.model.quantization.base import QuantizedWeight, WeightOnlyMethod
from radixlm.model.quantization.int4 import Int4Weight
from radixlm.model.quantization.int8 import Int8Weight, grouped_ok

BLOCK = 32  # llama.cpp's Q4_0 / Q4_1 block
# How far a recovered value may be from the loaded one, relative to the block's step, to count as exact.
EXACT_TOLERANCE = 1e-3


def _fit_q4_1(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scale, low): x = code * scale + low."""
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    d = (hi - lo) / 15.0
    q = torch.round((g - lo) / torch.where(d == 0, 1.0, d)).clamp(0, 15)
    return q, d, lo


def _fit_q4_0(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = g.abs().argmax(dim=-1, keepdim=True)
    d = -torch.gather(g, -1, idx) / 8.0
    q = torch.round(g / torch.where(d == 0, 1.0, d) + 8.0).clamp(0, 15)
    return q, d, -8.0 * d


def _exact(fitted: torch.Tensor, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per block: whether the fitted values are the loaded ones, to EXACT_TOLERANCE of a step."""
    return (fitted - g).abs().amax(dim=-1, keepdim=True) <= EXACT_TOLERANCE * d.abs().clamp(min=1e-30)


def exact_int4(weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight | None:
    """The weight as int4 blocks of 32 when each block is exactly a Q4_0 or Q4_1 block; else None."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    if in_f % BLOCK:
        return None
    g = w.view(out_f, -1, BLOCK)
    best = None
    for fit in (_fit_q4_1, _fit_q4_0):
        q, d, low = fit(g)
        ok = _exact(q * d + low, g, d)
        if best is None:
            best = [q, d, low, ok]
        else:  # per block, the first fit that is exact wins
            take = ~best[3] & ok
            best = [torch.where(take, new, old) for new, old in zip((q, d, low), best[:3])] + [best[3] | ok]
    q, d, low, ok = best
    if not bool(ok.all()):
        return None
    d, low = d.squeeze(-1), low.squeeze(-1)
    return Int4Weight.from_parts(q.view(out_f, in_f), d, low + 8.0 * d, BLOCK, dtype, low=low)


def exact_int8_blocks(weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight | None:
    """The weight as int8 with a scale per block of 32 when each block is exactly a Q8_0 block, and
    radixlm's kernel (which takes such scales) is there; else None."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    if in_f % BLOCK or not grouped_ok(w.device):
        return None
    g = w.view(out_f, -1, BLOCK)
    d = g.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.round(g / torch.where(d == 0, 1.0, d)).clamp(-127, 127)
    if not bool(_exact(q * d, g, d).all()):
        return None
    return Int8Weight.from_parts(q.view(out_f, in_f).to(torch.int8), d.squeeze(-1), dtype)


class GGUFRepack(WeightOnlyMethod):
    name = "gguf"

    def __init__(self) -> None:
        self.repacked_int4 = 0
        self.repacked_int8 = 0
        self.requantized_int8 = 0

    def unsupported(self, weight: torch.Tensor) -> str | None:
        if weight.device.type != "cpu":
            return f"the int4 / int8 kernels used here are torch's CPU ones (weight on {weight.device.type})"
        if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"no int kernel for {weight.dtype} activations"
        return None

    def quantize(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> QuantizedWeight:
        packed = exact_int4(weight, dtype or weight.dtype)
        if packed is not None:
            self.repacked_int4 += 1
            return packed
        packed = exact_int8_blocks(weight, dtype or weight.dtype)
        if packed is not None:
            self.repacked_int8 += 1
            return packed
        self.requantized_int8 += 1
        return Int8Weight(weight, dtype)

    def describe(self) -> str:
        return (
            f"{self.repacked_int4} GGUF 4-bit weights repacked as int4, {self.repacked_int8} Q8_0 as int8 "
            f"blocks, {self.requantized_int8} others requantized as int8 per channel"
        )
