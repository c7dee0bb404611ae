"""GPTQ checkpoints (quant_method "gptq", 4 or 8 bits, act-order or not): repacked into the int4 / int8
kernels where the math allows, dequantized at load otherwise.

A GPTQ linear is four tensors (the AutoGPTQ / GPTQModel "gptq" layout, b = 4 or 8 bits, k = 32 / b):

    X.qweight  int32 [in / k, out]     k b-bit codes per int32, input index i at bits b * (i % k)
    X.qzeros   int32 [in / G, out / k] k zero points per int32, output index o at bits b * (o % k),
                                       stored minus one (the format's v1 convention: z = stored + 1)
    X.scales   fp16  [in / G, out]
    X.g_idx    int32 [in]              (optional) the group of each input index: i // G, or with
                                       desc_act (act-order) any assignment

    W[o, i] = (q[i, o] - z[g(i), o]) * s[g(i), o]        g(i) = g_idx[i] (or i // G)

4 bits, groups in input order: the int4 kernel's convention is W = (q - 8) * scale + zero, so the codes
are kept as they are and scale = s, zero = (8 - z) * s: the same matrix, no second rounding. 8 bits,
symmetric (z = 128) with one group per column (group_size -1): q - 128 and s are the int8 kernel's codes
and per-channel scales. 4-bit act-order (desc_act): the columns sorted by group are packed the same way and
the input's features are gathered in that order at each call (repack.PermutedInput); a fused q/k/v or
gate/up needs its pieces to share the order (GPTQ gives pieces of one input the same one). 8-bit groups,
asymmetric 8-bit and act-order 8-bit have no kernel here: they are dequantized at load and the log says
so. Tensor parallelism is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from radixlm.messages import ModelLoadError
from radixlm.model.quantization.repack import Int4Parts, Int8Parts, RepackingReader, int4_parts

PARTS = ("qweight", "qzeros", "scales")
BITS = (4, 8)


def unpack_int32(packed: torch.Tensor, dim: int, bits: int = 4) -> torch.Tensor:
    """int32 holding 32 / bits values (low bits first) -> int32 values, that many times longer along `dim`."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    x = packed.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)])
    x = x & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per
    return x.reshape(shape)


def gptq_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    bits: int = 4,
) -> tuple[torch.Tensor, Int4Parts | Int8Parts | None, str]:
    """(the float32 [out, in] weight, the kernel's parts or None, why none)."""
    in_f, out_f = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = in_f if group_size == -1 else group_size
    if in_f % g:
        raise ValueError(f"input width {in_f} is not a multiple of group_size {g}")
    in_order = torch.arange(in_f) // g
    group_of = in_order if g_idx is None else g_idx.to(torch.int64)
    if tuple(group_of.shape) != (in_f,) or int(group_of.max()) >= in_f // g or int(group_of.min()) < 0:
        raise ValueError(f"g_idx must give each of the {in_f} inputs a group in [0, {in_f // g})")
    q = unpack_int32(qweight, 0, bits).T.contiguous()  # [out, in]
    z = unpack_int32(qzeros, 1, bits).to(torch.float32)[:, :out_f] + 1.0  # [in / G, out]
    s = scales.float()
    if tuple(s.shape) != (in_f // g, out_f) or tuple(z.shape) != (in_f // g, out_f):
        raise ValueError(f"scales {tuple(s.shape)} / qzeros do not match {in_f // g} groups of {g} x {out_f}")
    dense = (q.float() - z.T.index_select(1, group_of)) * s.T.index_select(1, group_of)
    if not torch.equal(group_of, in_order):
        # Act-order: the columns sorted by group make groups of G contiguous columns again (desc_act gives
        # every group exactly G); the int4 kernel runs on them and the input is gathered in that order.
        perm = torch.argsort(group_of, stable=True)
        if bits != 4 or not torch.equal(group_of[perm], in_order):
            return dense, None, "act-order groups (desc_act g_idx) of unequal sizes or 8-bit"
        parts = int4_parts(q[:, perm], s.T, ((8.0 - z) * s).T, g)
        if parts is not None:
            parts.perm = perm
        return dense, parts, f"group size {g}: not one the int4 kernel divides"
    if bits == 4:
        parts = int4_parts(q, s.T, ((8.0 - z) * s).T, g)
        return dense, parts, f"group size {g}: not one the int4 kernel divides"
    if g == in_f and bool((z == 128).all()):
        return dense, Int8Parts((q - 128).to(torch.int8), s[0].contiguous()), ""
    return dense, None, "8-bit groups or zero points: the int8 kernel is per-channel symmetric"


def check_config(hf_config) -> tuple[int, int]:
    """(group size, bits); refuses what this reader cannot read, naming the field."""
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits = qc.get("bits", 4)
    if bits not in BITS:
        raise ModelLoadError(f"gptq: bits={bits} is not supported (supported: {', '.join(map(str, BITS))})")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", None):
        raise ModelLoadError(f"gptq: checkpoint_format {fmt!r} is not supported (the v1 'gptq' layout is)")
    return int(qc.get("group_size", 128)), int(bits)


class GPTQReader(RepackingReader):
    """Streams a GPTQ checkpoint as float weights and keeps each linear's codes for the repack."""

    method = "gptq"

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.group_size, self.bits = check_config(hf_config)

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        waiting: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            stem, _, kind = name.rpartition(".")
            if kind not in (*PARTS, "g_idx"):
                yield name, tensor
                continue
            have = waiting.setdefault(stem, {})
            have[kind] = tensor
            if all(k in have for k in PARTS):
                waiting.pop(stem)
                try:
                    dense, parts, why = gptq_weight(
                        *(have[k] for k in PARTS), have.get("g_idx"), self.group_size, self.bits
                    )
                except ValueError as exc:
                    raise ModelLoadError(f"gptq checkpoint tensor {stem}: {exc}") from None
                self.record(stem, parts, why)
                yield stem + ".weight", parts.dequantize() if parts is not None else dense
        if waiting:
            raise ModelLoadError(f"gptq checkpoint: incomplete linears {', '.join(sorted(waiting)[:6])}")
