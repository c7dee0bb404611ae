"""GPTQ checkpoints (quant_method "gptq", 4 bits, groups in input order): repacked into the int4 kernel.

A GPTQ linear is four tensors (the AutoGPTQ / GPTQModel "gptq" layout, 4 bits):

    X.qweight  int32 [in / 8, out]     eight 4-bit codes per int32, input index i at bits 4 * (i % 8)
    X.qzeros   int32 [in / G, out / 8] eight 4-bit zero points per int32, output index o at bits 4 * (o % 8),
                                       stored minus one (the format's v1 convention: z = stored + 1)
    X.scales   fp16  [in / G, out]
    X.g_idx    int32 [in]              (optional) the group of each input index; must be i // G here

    W[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]        (sym checkpoints store z = 8 too)

The int4 kernel's convention is W = (q - 8) * scale + zero, so the codes are kept as they are and
scale = s, zero = (8 - z) * s: the same matrix, no second rounding. As with fp8, the layers load the float
weight this stands for through their own weight loaders; the codes, scales and zeros are kept aside per
checkpoint name, and after load each linear (a fused q/k/v or gate/up concatenating its parts' rows) is
packed from them. desc_act checkpoints (a permuted g_idx), 8-bit GPTQ and tensor parallelism are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from radixlm.messages import ModelLoadError

PARTS = ("qweight", "qzeros", "scales")


@dataclass
class Int4Parts:
    codes: torch.Tensor  # uint8 [out, in], 0..15
    scale: torch.Tensor  # float32 [out, in / G]
    zero: torch.Tensor  # float32 [out, in / G], the kernel's zero: the value code 8 stands for
    group_size: int


def _unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 holding eight 4-bit values (low bits first) -> uint8, eight times longer along `dim`."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    x = packed.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)])
    x = (x & 0xF).to(torch.uint8)
    shape = list(packed.shape)
    shape[dim] *= 8
    return x.reshape(shape)


def gptq_parts(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
) -> Int4Parts:
    in_f, out_f = qweight.shape[0] * 8, qweight.shape[1]
    g = in_f if group_size == -1 else group_size
    if in_f % g:
        raise ValueError(f"input width {in_f} is not a multiple of group_size {g}")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(in_f) // g):
        raise ValueError(
            "g_idx is not in input order (desc_act / act-order checkpoints are not supported yet)"
        )
    codes = _unpack_int4(qweight, 0).T.contiguous()  # [out, in]
    z = _unpack_int4(qzeros, 1).to(torch.float32)[:, :out_f] + 1.0  # [in / G, out]
    s = scales.float()
    if tuple(s.shape) != (in_f // g, out_f) or tuple(z.shape) != (in_f // g, out_f):
        raise ValueError(f"scales {tuple(s.shape)} / qzeros do not match {in_f // g} groups of {g} x {out_f}")
    return Int4Parts(codes, s.T.contiguous(), ((8.0 - z) * s).T.contiguous(), g)


def dequantize(parts: Int4Parts) -> torch.Tensor:
    scale = parts.scale.repeat_interleave(parts.group_size, dim=1)
    zero = parts.zero.repeat_interleave(parts.group_size, dim=1)
    return (parts.codes.float() - 8.0) * scale + zero


def check_config(hf_config) -> int:
    """The group size; refuses what this reader cannot repack, naming the field."""
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits = qc.get("bits", 4)
    if bits != 4:
        raise ModelLoadError(f"gptq: bits={bits} is not supported yet (4-bit GPTQ is)")
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", None):
        raise ModelLoadError(f"gptq: checkpoint_format {fmt!r} is not supported (the v1 'gptq' layout is)")
    return int(qc.get("group_size", 128))


class GPTQReader:
    """Streams a GPTQ checkpoint as float weights and keeps each linear's int4 parts for the repack."""

    def __init__(self, hf_config) -> None:
        self.group_size = check_config(hf_config)
        self.parts: dict[str, Int4Parts] = {}  # checkpoint module name -> its parts

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
                    parts = gptq_parts(*(have[k] for k in PARTS), have.get("g_idx"), self.group_size)
                except ValueError as exc:
                    raise ModelLoadError(f"gptq checkpoint tensor {stem}: {exc}") from None
                self.parts[stem] = parts
                yield stem + ".weight", dequantize(parts)
        if waiting:
            raise ModelLoadError(f"gptq checkpoint: incomplete linears {', '.join(sorted(waiting)[:6])}")


def fused_parts(reader: GPTQReader, module: str, packed_mapping: dict) -> Int4Parts | None:
    """The parts of one of our linears: its own checkpoint name's, or its fused pieces' rows, concatenated
    in the order the layer lays them out (q, k, v; gate, up)."""
    name = module.removeprefix("hf.")
    if name in reader.parts:
        return reader.parts[name]
    leaf = name.rpartition(".")[2]
    pieces = sorted(
        ((shard, ckpt) for ckpt, (packed, shard) in packed_mapping.items() if packed == leaf),
        key=lambda p: {"q": 0, "k": 1, "v": 2}.get(p[0], p[0]) if isinstance(p[0], str) else p[0],
    )
    found = [reader.parts.get(name[: -len(leaf)] + ckpt) for _, ckpt in pieces]
    if not pieces or any(p is None for p in found):
        return None
    if len({p.group_size for p in found}) != 1:
        return None
    return Int4Parts(
        torch.cat([p.codes for p in found]),
        torch.cat([p.scale for p in found]),
        torch.cat([p.zero for p in found]),
        found[0].group_size,
    )
