"""Checkpoint integer formats (GPTQ, AWQ, compressed-tensors) repacked into the int8 / int4 CPU kernels.

A reader (`RepackingReader`) sits between the checkpoint and the layers. For every quantized linear it
yields the float weight the codes stand for (so the layers' own weight loaders, fused q/k/v and gate/up
included, load it like any float checkpoint) and keeps the codes aside, by checkpoint name, as one of:

    Int4Parts   codes [out, in] in 0..15, scale / zero [out, in / G]:  W = (codes - 8) * scale + zero
    Int8Parts   q [out, in] in -127..127 (int8), scale [out]:          W = q * scale

which are the int4 / int8 kernels' own conventions (int4.py, int8.py), so a format's codes go in as they
are: no second rounding. After load `repack_model` packs each of our linears from its parts (a fused linear
from its pieces' rows, in the layer's order). A linear whose format the kernels cannot take (act-order,
8-bit groups, asymmetric 8-bit, odd group sizes) has no parts: it stays dense, and the reader says why in
`dense_notes`, which the start-up log shows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from radixlm.model.quantization.base import QuantizedWeight
from radixlm.model.quantization.int4 import GROUP_SIZES


@dataclass
class Int4Parts:
    codes: torch.Tensor  # uint8 [out, in], 0..15
    scale: torch.Tensor  # float32 [out, in / G]
    zero: torch.Tensor  # float32 [out, in / G], the kernel's zero: the value code 8 stands for
    group_size: int
    # Act-order (GPTQ desc_act): the columns above are the weight's columns taken in this order, so that
    # each group is contiguous; the matmul takes the input's features in the same order. None: in order.
    perm: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        scale = self.scale.repeat_interleave(self.group_size, dim=1)
        zero = self.zero.repeat_interleave(self.group_size, dim=1)
        w = (self.codes.float() - 8.0) * scale + zero
        return w if self.perm is None else w.index_select(1, torch.argsort(self.perm))


@dataclass
class Int8Parts:
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    group_size: int = 0  # per channel; a field so fused pieces compare like Int4Parts

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]


def int4_parts(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> Int4Parts | None:
    """Int4Parts for the kernel from a format's groups of `group` input columns (codes [out, in] 0..15,
    scale / zero [out, in / group] in the kernel's form), or None when no kernel group size divides
    `group`. A group larger than the kernel's (a per-channel scale: group = in) repeats its scale and zero
    over kernel-sized groups: the same matrix."""
    kernel_group = next((g for g in GROUP_SIZES if group % g == 0), None)
    if kernel_group is None or codes.shape[1] % kernel_group:
        return None
    rep = group // kernel_group
    return Int4Parts(
        codes.to(torch.uint8).contiguous(),
        scale.float().repeat_interleave(rep, dim=1).contiguous(),
        zero.float().repeat_interleave(rep, dim=1).contiguous(),
        kernel_group,
    )


class RepackingReader:
    """Base of the readers whose codes are repacked after load: `parts` by checkpoint module name,
    `dense_notes` (why some linears stay dense), `method` for messages."""

    method = ""

    def __init__(self) -> None:
        self.parts: dict[str, Int4Parts | Int8Parts] = {}
        self.dense_notes: dict[str, str] = {}  # checkpoint module name -> why it is dequantized

    def record(self, stem: str, parts: Int4Parts | Int8Parts | None, why_dense: str = "") -> None:
        """Remember a linear's parts, or why it has none (it then runs dense)."""
        if parts is None:
            self.dense_notes[stem] = why_dense
        else:
            self.parts[stem] = parts

    def describe(self) -> str:
        kinds = sorted({"int4" if isinstance(p, Int4Parts) else "int8" for p in self.parts.values()})
        head = f"{' / '.join(kinds)} codes and scales from the checkpoint, repacked" if kinds else ""
        if self.dense_notes:
            why = sorted(set(self.dense_notes.values()))
            dense = f"{len(self.dense_notes)} linears dequantized at load ({'; '.join(why)})"
            head = f"{head}; {dense}" if head else dense
        return head


def fused_parts(
    parts: dict[str, Int4Parts | Int8Parts], module: str, packed_mapping: dict
) -> Int4Parts | Int8Parts | None:
    """The parts of one of our linears: its own checkpoint name's, or its fused pieces' rows concatenated
    in the order the layer lays them out (q, k, v; gate, up). None if any piece has none, or they differ
    in kind or group size."""
    name = module.removeprefix("hf.")
    if name in parts:
        return parts[name]
    leaf = name.rpartition(".")[2]
    pieces = sorted(
        ((shard, ckpt) for ckpt, (packed, shard) in packed_mapping.items() if packed == leaf),
        key=lambda p: {"q": 0, "k": 1, "v": 2}.get(p[0], p[0]) if isinstance(p[0], str) else p[0],
    )
    found = [parts.get(name[: -len(leaf)] + ckpt) for _, ckpt in pieces]
    if not pieces or any(p is None for p in found):
        return None
    if len({(type(p), p.group_size) for p in found}) != 1:
        return None
    perms = [getattr(p, "perm", None) for p in found]
    if any(p is None for p in perms) != all(p is None for p in perms):
        return None
    if perms[0] is not None and not all(torch.equal(perms[0], p) for p in perms[1:]):
        return None  # pieces of one input taking its features in different orders: no shared matmul
    cls = type(found[0])
    cat = {
        f.name: torch.cat([getattr(p, f.name) for p in found])
        for f in dataclasses.fields(cls)
        if f.name not in ("group_size", "perm")
    }
    extra = {"perm": perms[0]} if perms[0] is not None else {}
    return cls(**cat, group_size=found[0].group_size, **extra)


def packed_weight(parts: Int4Parts | Int8Parts, dtype: torch.dtype):
    """The kernel's QuantizedWeight for a linear's parts, for activations of `dtype`."""
    from radixlm.model.quantization.int4 import Int4Weight
    from radixlm.model.quantization.int8 import Int8Weight

    if isinstance(parts, Int4Parts):
        packed = Int4Weight.from_parts(parts.codes, parts.scale, parts.zero, parts.group_size, dtype)
        return packed if parts.perm is None else PermutedInput(packed, parts.perm)
    return Int8Weight.from_parts(parts.q, parts.scale, dtype)


class PermutedInput(QuantizedWeight):
    """A packed weight whose columns are the original's in `perm` order (act-order GPTQ): the input's
    features are gathered in that order first, one index_select per call."""

    def __init__(self, inner: QuantizedWeight, perm: torch.Tensor) -> None:
        self.inner = inner
        self.perm = perm.to(torch.int64).contiguous()
        self.out_features, self.in_features = inner.out_features, inner.in_features

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(x.index_select(-1, self.perm), bias)

    def dequantize(self) -> torch.Tensor:
        return self.inner.dequantize().index_select(1, torch.argsort(self.perm))

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes + self.perm.numel() * self.perm.element_size()


def linear_parts(model: nn.Module, reader: RepackingReader, targets: list[tuple[str, nn.Module]]):
    """(name, module, parts or None) for each target linear of the model."""
    mapping = getattr(model, "packed_modules_mapping", {})
    return [(name, mod, fused_parts(reader.parts, name, mapping)) for name, mod in targets]
