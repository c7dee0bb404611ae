"""FP8 checkpoints (quant_method "fp8"): e4m3 weights with `weight_scale_inv`, dequantized as they stream in.

The checkpoint holds each quantized linear as two tensors:

    X.weight            float8_e4m3fn [out, in]
    X.weight_scale_inv  float32, one of
                          []  or [1]                   per tensor
                          [out] or [out, 1]            per output channel
                          [ceil(out/B0), ceil(in/B1)]  per block, weight_block_size [B0, B1] (e.g. 128 x 128)

and the float weight is W = fp8 * scale_inv (each block times its own value). This CPU build has no fp8
matmul, so the pair is turned into one float `X.weight` before any layer sees it: the layers' own weight
loaders (fused q/k/v, gate/up, tensor-parallel slices) then load it as they load any float checkpoint, and
compute runs in the model's dtype. Peak memory is the model plus the fp8 tensors not yet paired (a
weight waits for its scale; checkpoints write them side by side, so that is one or two tensors).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from radixlm.messages import ModelLoadError

SCALE_SUFFIX = ".weight_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block_size: list[int] | None
) -> torch.Tensor:
    """fp8 [out, in] times its scales -> float32 [out, in]."""
    w = weight.float()
    s = scale_inv.float()
    out_f, in_f = w.shape
    if s.numel() == 1:
        return w * s.reshape(())
    if s.dim() <= 2 and s.shape[0] == out_f and s.numel() == out_f:
        return w * s.reshape(out_f, 1)
    if block_size is None:
        raise ValueError(f"scale shape {tuple(s.shape)} needs weight_block_size in the quantization_config")
    b0, b1 = block_size
    expected = (-(-out_f // b0), -(-in_f // b1))
    if tuple(s.shape) != expected:
        raise ValueError(
            f"block scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} in {b0}x{b1} blocks"
        )
    full = s.repeat_interleave(b0, dim=0)[:out_f].repeat_interleave(b1, dim=1)[:, :in_f]
    return w * full


def block_size_of(hf_config) -> list[int] | None:
    qc = getattr(hf_config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    block = qc.get("weight_block_size")
    if block is not None and (len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)):
        raise ModelLoadError(
            f"fp8 quantization_config: weight_block_size must be two positive ints, got {block}"
        )
    return list(block) if block is not None else None


def dequantize_stream(
    weights: Iterable[tuple[str, torch.Tensor]], hf_config
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with every (fp8 weight, weight_scale_inv) pair replaced by its float weight."""
    block = block_size_of(hf_config)
    weights_waiting: dict[str, torch.Tensor] = {}
    scales_waiting: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        if name.endswith(SCALE_SUFFIX):
            stem = name[: -len(SCALE_SUFFIX)]
            if stem + ".weight" in weights_waiting:
                yield stem + ".weight", _pair(stem, weights_waiting.pop(stem + ".weight"), tensor, block)
            else:
                scales_waiting[stem] = tensor
        elif tensor.dtype in FP8_DTYPES:
            stem = name.removesuffix(".weight")
            if stem in scales_waiting:
                yield name, _pair(stem, tensor, scales_waiting.pop(stem), block)
            else:
                weights_waiting[name] = tensor
        elif name.endswith((".input_scale", ".activation_scale")):
            continue  # static activation scales: compute here is not in fp8, so they have no use
        else:
            yield name, tensor
    if weights_waiting or scales_waiting:
        lonely = sorted(weights_waiting) + sorted(s + SCALE_SUFFIX for s in scales_waiting)
        raise ModelLoadError(
            f"fp8 checkpoint: tensors without their weight / scale pair: {', '.join(lonely[:6])}"
        )


def _pair(stem: str, weight: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    try:
        return dequantize_fp8(weight, scale_inv, block)
    except ValueError as exc:
        raise ModelLoadError(f"fp8 checkpoint tensor {stem}.weight: {exc}") from None
