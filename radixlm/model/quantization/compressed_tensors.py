"""compressed-tensors checkpoints (quant_method "compressed-tensors", llm-compressor's format).

config.json's quantization_config names a storage `format` (for the whole model or per config group)
and, per group, the weights' scheme (num_bits, type int / float, symmetric, strategy tensor / channel /
group / block, group_size, actorder). The formats read here, per quantized linear X:

    pack-quantized   X.weight_packed int32 [out, ceil(in * b / 32)]  b-bit codes q + 2^(b-1), element i at
                                                                     bit b * i (b = 4: eight per int32)
                     X.weight_shape [2], X.weight_scale [out, in/G] | [out, 1] | [1],
                     X.weight_zero_point (asymmetric; packed the same way along the output axis),
                     X.weight_g_idx [in] (actorder "group": the group of each input column)
    int-quantized /  X.weight int8 [out, in], X.weight_scale, X.weight_zero_point (asymmetric)
    naive-quantized
    float-quantized  X.weight float8_e4m3fn [out, in], X.weight_scale [out, 1] | [1] | blocks

    W[o, i] = (q[o, i] - zp[o, g(i)]) * scale[o, g(i)]      g(i) = g_idx[i], or i // G

What runs: int4 (symmetric or not, groups of a size the int4 kernel divides, per-channel or per-tensor
scales) and symmetric per-channel / per-tensor int8 are repacked into the int4 / int8 CPU kernels with the
checkpoint's own codes (repack.py). The rest is dequantized at load and said so: fp8 (no fp8 matmul on
CPU, as for fp8 checkpoints), act-order groups, group-wise or asymmetric int8, group sizes the int4 kernel
cannot take. Activation quantization in a scheme (W8A8, FP8_DYNAMIC) is not run: activations stay in the
model's dtype, and static input scales are dropped (the log says so). Other formats (nvfp4, mxfp4,
marlin-24, sparse), transforms and unknown schemes are refused by name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from radixlm.messages import ModelLoadError
from radixlm.model.quantization import fp8
from radixlm.model.quantization.repack import Int8Parts, RepackingReader, int4_parts

logger = logging.getLogger(__name__)

FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")
STRATEGIES = ("tensor", "channel", "group", "block")
PARTS = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")
# Activation scales of static schemes: compute here keeps activations in the model's dtype.
DROPPED = ("input_scale", "input_zero_point", "input_global_scale")
_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)


@dataclass(frozen=True)
class Scheme:
    """One config group's weight quantization and storage format."""

    fmt: str
    num_bits: int
    type: str  # "int" | "float"
    symmetric: bool
    strategy: str
    group_size: int | None
    block: list[int] | None
    actorder: str | None

    def needs(self) -> set[str]:
        """The tensors a linear of this scheme must have before it can be converted."""
        need = {"weight_packed", "weight_shape"} if self.fmt == "pack-quantized" else {"weight"}
        need.add("weight_scale")
        if not self.symmetric:
            need.add("weight_zero_point")
        if self.actorder == "group":
            need.add("weight_g_idx")
        return need


def _qc_dict(hf_config) -> dict:
    qc = getattr(hf_config, "quantization_config", None) or {}
    return qc if isinstance(qc, dict) else qc.to_dict()


def _scheme(name: str, group: dict, default_fmt: str | None) -> Scheme:
    fmt = group.get("format") or default_fmt
    if fmt not in FORMATS:
        raise ModelLoadError(
            f"compressed-tensors: format {fmt!r} (config group {name}) is not supported; supported formats: "
            f"{', '.join(FORMATS)}"
        )
    w = group.get("weights")
    if not w:
        raise ModelLoadError(f"compressed-tensors: config group {name} quantizes no weights (weights: null)")
    kind, bits = w.get("type", "int"), int(w.get("num_bits", 8))
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
    actorder = w.get("actorder")
    actorder = {True: "group", False: None}.get(actorder, actorder)
    ok = {
        "pack-quantized": kind == "int" and bits in (4, 8),
        "int-quantized": kind == "int" and bits == 8,
        "naive-quantized": kind == "int" and bits == 8,
        "float-quantized": kind == "float" and bits == 8,
    }[fmt]
    if not ok:
        raise ModelLoadError(
            f"compressed-tensors: {kind} {bits}-bit weights in format {fmt!r} (config group {name}) are not "
            "supported; supported: pack-quantized int4 / int8, int-quantized int8, float-quantized fp8"
        )
    if strategy not in STRATEGIES or (strategy == "block" and kind != "float"):
        raise ModelLoadError(
            f"compressed-tensors: weight strategy {strategy!r} (config group {name}) is not supported; "
            f"supported: {', '.join(STRATEGIES)} (block for fp8 only)"
        )
    if strategy == "group" and not w.get("group_size"):
        raise ModelLoadError(f"compressed-tensors: config group {name} has strategy group without group_size")
    return Scheme(
        fmt, bits, kind, bool(w.get("symmetric", True)), strategy, w.get("group_size"),
        w.get("block_structure"), actorder,
    )  # fmt: skip


def parse_config(hf_config) -> list[tuple[list[str], Scheme]]:
    """(targets, scheme) per config group; refuses what cannot be read, naming the field."""
    qc = _qc_dict(hf_config)
    for field in ("transform_config", "sparsity_config"):
        value = qc.get(field)
        if value and (field != "sparsity_config" or value.get("format") not in (None, "dense")):
            raise ModelLoadError(f"compressed-tensors: {field} is not supported (got {value})")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ModelLoadError("compressed-tensors: quantization_config has no config_groups")
    out = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ModelLoadError(
                f"compressed-tensors: config group {name} is a preset name list ({group}); expected a scheme"
            )
        out.append((list(group.get("targets") or ["Linear"]), _scheme(name, group, qc.get("format"))))
    return out


def _matches(target: str, stem: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], stem) is not None
    return stem == target or stem.endswith("." + target)


def scheme_for(groups: list[tuple[list[str], Scheme]], stem: str) -> Scheme:
    """A module's scheme: a group naming it (by name or re: pattern) first, else one targeting a class
    (`Linear`: every quantized tensor group here belongs to a linear)."""
    for targets, scheme in groups:
        if any(_matches(t, stem) for t in targets if t != "Linear"):
            return scheme
    for targets, scheme in groups:
        if "Linear" in targets:
            return scheme
    if len(groups) == 1:
        return groups[0][1]
    raise ModelLoadError(f"compressed-tensors: no config group targets quantized module {stem}")


def unpack(packed: torch.Tensor, bits: int, cols: int, dim: int = 1) -> torch.Tensor:
    """Dense int32 packing -> signed codes (int32), `cols` long along `dim` (bits 4 or 8)."""
    x = packed if dim == 1 else packed.T
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    vals = (x.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    vals = vals.reshape(x.shape[0], -1)[:, :cols] - (1 << (bits - 1))
    return vals if dim == 1 else vals.T.contiguous()


def _expand(t: torch.Tensor, out_f: int, in_f: int, group_of: torch.Tensor) -> torch.Tensor:
    """Per-tensor [1], per-channel [out, 1] or per-group [out, groups] -> [out, in] (column i's group
    given by group_of[i])."""
    t = t.float()
    if t.numel() == 1:
        return t.reshape(1, 1).expand(out_f, in_f)
    t = t.reshape(out_f, -1)
    return t.expand(out_f, in_f) if t.shape[1] == 1 else t.index_select(1, group_of)


class CompressedTensorsReader(RepackingReader):
    """Streams a compressed-tensors checkpoint as float weights, keeping the codes that the kernels take."""

    method = "compressed-tensors"

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.groups = parse_config(hf_config)
        self.dropped: set[str] = set()  # static activation scales seen (and not used)
        schemes = sorted({f"{s.fmt} {s.type}{s.num_bits} {s.strategy}" for _, s in self.groups})
        logger.info("compressed-tensors checkpoint: %s", "; ".join(schemes))
        groups = _qc_dict(hf_config)["config_groups"].values()
        if any(g.get("input_activations") for g in groups):
            logger.info(
                "compressed-tensors: activation quantization is not run; activations stay in the model dtype"
            )

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        waiting: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            stem, _, kind = name.rpartition(".")
            if kind in DROPPED:
                self.dropped.add(kind)
                continue
            if kind not in PARTS and not (kind == "weight" and tensor.dtype in _CODE_DTYPES):
                yield name, tensor
                continue
            have = waiting.setdefault(stem, {})
            have[kind] = tensor
            scheme = scheme_for(self.groups, stem)
            if scheme.needs() <= set(have):
                waiting.pop(stem)
                try:
                    weight = self._convert(stem, have, scheme)
                except ValueError as exc:
                    raise ModelLoadError(f"compressed-tensors checkpoint tensor {stem}: {exc}") from None
                yield stem + ".weight", weight
        if waiting:
            raise ModelLoadError(
                "compressed-tensors checkpoint: incomplete quantized linears "
                + ", ".join(f"{s} (has {', '.join(sorted(h))})" for s, h in sorted(waiting.items())[:4])
            )

    def _convert(self, stem: str, have: dict[str, torch.Tensor], s: Scheme) -> torch.Tensor:
        scale = have["weight_scale"]
        if s.type == "float":
            self.record(stem, None, "fp8 weights: no fp8 matmul on CPU")
            return fp8.dequantize_fp8(have["weight"], scale, s.block if s.strategy == "block" else None)
        if s.fmt == "pack-quantized":
            out_f, in_f = (int(v) for v in have["weight_shape"].tolist())
            q = unpack(have["weight_packed"], s.num_bits, in_f)
        else:
            q = have["weight"].to(torch.int32)
            out_f, in_f = q.shape
        if tuple(q.shape) != (out_f, in_f):
            raise ValueError(f"codes of shape {tuple(q.shape)} for a weight of shape {(out_f, in_f)}")
        zp = have.get("weight_zero_point")
        if zp is not None and s.fmt == "pack-quantized" and s.strategy in ("group", "channel"):
            zp = unpack(zp, s.num_bits, out_f, dim=0)
        group = {"tensor": in_f, "channel": in_f, "group": s.group_size}[s.strategy]
        if in_f % group:
            raise ValueError(f"input width {in_f} is not a multiple of group_size {group}")
        g_idx = have.get("weight_g_idx")
        in_order = torch.arange(in_f) // group
        group_of = in_order if g_idx is None else g_idx.to(torch.int64)
        scale_full = _expand(scale, out_f, in_f, group_of)
        zp_full = torch.zeros(()) if zp is None else _expand(zp, out_f, in_f, group_of)
        dense = (q.float() - zp_full) * scale_full
        if g_idx is not None and not torch.equal(group_of, in_order):
            self.record(stem, None, "act-order groups (g_idx)")
            return dense
        # Per-group scale / zero in [out, in / group] form, for the kernels.
        sg, zg = scale_full[:, ::group], (zp_full.expand(out_f, in_f) if zp is not None else None)
        if s.num_bits == 4:
            zero = torch.zeros_like(sg) if zg is None else -zg[:, ::group] * sg
            parts = int4_parts(q + 8, sg, zero, group)
            self.record(stem, parts, f"int4 group size {group}: not one the int4 kernel divides")
            return parts.dequantize() if parts is not None else dense
        if s.symmetric and s.strategy in ("tensor", "channel"):
            parts8 = Int8Parts(q.to(torch.int8), sg[:, 0].contiguous())
            self.record(stem, parts8)
            return parts8.dequantize()
        self.record(stem, None, "int8 with groups or zero points: the int8 kernel is per-channel symmetric")
        return dense
