"""AWQ checkpoints (quant_method "awq", AutoAWQ's 4-bit GEMM layout): repacked into the int4 kernel.

An AWQ linear is three tensors (AutoAWQ `WQLinear_GEMM`, version "gemm"):

    X.qweight  int32 [in, out / 8]      eight 4-bit codes per int32 along the OUTPUT axis, in AWQ's
                                        column order: bits 4 * k hold output column 8 * j + ORDER[k],
                                        ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    X.qzeros   int32 [in / G, out / 8]  zero points, packed the same way (no v1 offset, unlike GPTQ)
    X.scales   fp16  [in / G, out]

    W[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o]

The int4 kernel's convention is W = (q - 8) * scale + zero, so the codes are kept and scale = s,
zero = (8 - z) * s: asymmetric zeros fit, the same matrix, no second rounding (repack.py). zero_point
false (symmetric AWQ) stores no qzeros and means z = 8. Versions other than "gemm" (gemv, marlin, exllama)
and bits other than 4 are refused by name; tensor parallelism too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from radixlm.messages import ModelLoadError
from radixlm.model.quantization.repack import RepackingReader, int4_parts

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which column of its pack of eight each 4-bit slot holds
VERSIONS = ("gemm",)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, cols / 8] in AWQ's order -> int32 codes [rows, cols] in column order."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    slots = (packed.unsqueeze(-1) >> shifts) & 0xF  # [rows, cols / 8, slot]
    cols = torch.empty_like(slots)
    cols[..., list(ORDER)] = slots  # slot k holds column ORDER[k]
    return cols.reshape(packed.shape[0], -1)


def check_config(hf_config) -> tuple[int, bool]:
    """(group size, zero_point); refuses what this reader cannot read, naming the field."""
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise ModelLoadError(f"awq: bits={bits} is not supported (4-bit AWQ is)")
    version = qc.get("version", "gemm")
    version = str(getattr(version, "value", version)).lower()  # transformers' enum, or its string
    if version not in VERSIONS:
        raise ModelLoadError(
            f"awq: version {version!r} is not supported (supported: {', '.join(VERSIONS)}, the GEMM layout)"
        )
    return int(qc.get("group_size", qc.get("q_group_size", 128))), bool(qc.get("zero_point", True))


class AWQReader(RepackingReader):
    """Streams an AWQ checkpoint as float weights and keeps each linear's int4 codes for the repack."""

    method = "awq"

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.group_size, self.zero_point = check_config(hf_config)
        self.needed = ("qweight", "scales", "qzeros") if self.zero_point else ("qweight", "scales")

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        waiting: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in weights:
            stem, _, kind = name.rpartition(".")
            if kind not in ("qweight", "qzeros", "scales"):
                yield name, tensor
                continue
            have = waiting.setdefault(stem, {})
            have[kind] = tensor
            if all(k in have for k in self.needed):
                waiting.pop(stem)
                try:
                    yield stem + ".weight", self._convert(stem, have)
                except ValueError as exc:
                    raise ModelLoadError(f"awq checkpoint tensor {stem}: {exc}") from None
        if waiting:
            raise ModelLoadError(f"awq checkpoint: incomplete linears {', '.join(sorted(waiting)[:6])}")

    def _convert(self, stem: str, have: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unpack_awq(have["qweight"])  # [in, out]
        in_f, out_f = q.shape
        g = in_f if self.group_size == -1 else self.group_size
        if in_f % g:
            raise ValueError(f"input width {in_f} is not a multiple of group_size {g}")
        s = have["scales"].float()  # [in / G, out]
        z = unpack_awq(have["qzeros"]).float() if "qzeros" in have else torch.full_like(s, 8.0)
        if tuple(s.shape) != (in_f // g, out_f) or tuple(z.shape) != (in_f // g, out_f):
            raise ValueError(
                f"scales {tuple(s.shape)} / qzeros do not match {in_f // g} groups of {g} x {out_f}"
            )
        parts = int4_parts(q.T, s.T, ((8.0 - z) * s).T, g)
        self.record(stem, parts, f"group size {g}: not one the int4 kernel divides")
        if parts is not None:
            return parts.dequantize()
        gi = torch.arange(in_f) // g
        return ((q.float() - z.index_select(0, gi)) * s.index_select(0, gi)).T.contiguous()
