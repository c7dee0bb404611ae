"""--kv-cache-dtype: which element type the KV pool stores, and the fp8 scales that go with it.

bf16 / fp16 store K/V as they are (cast). fp8_e4m3 / fp8_e5m2 store them as float8 with one scale per
layer for K and one for V (per tensor, as SGLang and vLLM do):

    stored = clamp(x / scale, -max, max).to(float8)        read = stored.to(q.dtype) * scale

(the read is the attention backend's: layers/attention_backends/torch_backend.py, `_kv_rows`).

The scale is 1.0 unless the checkpoint gives one (llm-compressor / ModelOpt write `self_attn.k_scale`,
`self_attn.v_scale`, or `k_proj.output_scale` / `v_proj.output_scale`, older ones a shared `kv_scale`);
`KVScaleReader` takes those tensors out of the weight stream so the layers never see them. The clamp is
there because a cast past the format's range is inf for e5m2 (e4m3 saturates in current torch, but that
is not a documented guarantee).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

FP8_KV = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
_FLOAT_KV = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_kv_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the pool stores for an EngineConfig.kv_cache_dtype value ('auto': the model's)."""
    if name == "auto":
        return model_dtype
    if name in FP8_KV:
        return FP8_KV[name]
    if name in _FLOAT_KV:
        return _FLOAT_KV[name]
    choices = ", ".join(("auto", *_FLOAT_KV, *FP8_KV))
    raise ValueError(f"kv_cache_dtype (--kv-cache-dtype) must be one of {choices}, got {name!r}")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_KV.values()


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x (any float dtype) -> the pool's dtype; fp8 divided by its scale and clamped to the format's range."""
    if not is_fp8(dtype):
        return x.to(dtype)
    top = torch.finfo(dtype).max
    y = x.float() if scale == 1.0 else x.float() / scale
    return y.clamp_(-top, top).to(dtype)


# Checkpoint names of per-layer KV scales: (pattern, which of K / V it sets).
_SCALE_NAMES = (
    (re.compile(r"layers\.(\d+)\..*\bk_scale$"), "k"),
    (re.compile(r"layers\.(\d+)\..*\bv_scale$"), "v"),
    (re.compile(r"layers\.(\d+)\..*\bk_proj\.output_scale$"), "k"),
    (re.compile(r"layers\.(\d+)\..*\bv_proj\.output_scale$"), "v"),
    (re.compile(r"layers\.(\d+)\..*\bkv_scale$"), "kv"),
)


class KVScaleReader:
    """Takes per-layer K/V scale tensors out of a checkpoint's stream (the rest passes through) and keeps
    them: `scales(num_layers)` gives the pool its (k, v) per layer, 1.0 where the checkpoint has none."""

    def __init__(self) -> None:
        self.k: dict[int, float] = {}
        self.v: dict[int, float] = {}

    def __call__(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            hit = next(((m, which) for pat, which in _SCALE_NAMES if (m := pat.search(name))), None)
            if hit is None:
                yield name, tensor
                continue
            match, which = hit
            if tensor.numel() != 1:
                raise ValueError(
                    f"checkpoint tensor {name}: a KV cache scale must be one value per layer (per tensor), "
                    f"got shape {tuple(tensor.shape)}"
                )
            layer, value = int(match.group(1)), float(tensor.float().reshape(()))
            if "k" in which:
                self.k[layer] = value
            if "v" in which:
                self.v[layer] = value

    def scales(self, num_layers: int, kv_dtype: torch.dtype) -> tuple[list[float], list[float]]:
        if (self.k or self.v) and not is_fp8(kv_dtype):
            logger.info("checkpoint KV scales unused: the KV cache is %s, not fp8", kv_dtype)
            return [1.0] * num_layers, [1.0] * num_layers
        if self.k or self.v:
            logger.info("fp8 KV cache: scales from the checkpoint for %d layers", len(self.k | self.v))
        return [self.k.get(i, 1.0) for i in range(num_layers)], [
            self.v.get(i, 1.0) for i in range(num_layers)
        ]
