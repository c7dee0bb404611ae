"""radixlm's own AVX2 + FMA CPU kernels for weight-only int8 / int4 (cpu_kernels.cpp), built on first use.

`ops()` gives the loaded op namespace (`torch.ops.radixlm_cpu`) or None, and the reason is logged once:
- `RADIXLM_CPU_KERNELS=0` (or off / false / no): forced off, e.g. to test the fallback;
- not an x86-64 CPU with AVX2 + FMA (torch's own CPU capability check says so), or torch built without
  OpenMP's at::parallel_for;
- no C++ compiler, no ninja, or the build failed.
Without them int8.py / int4.py use torch's kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`).

The build (torch.utils.cpp_extension.load, one source file, ~40 s on 2 cores) happens once per machine and
torch version: it is cached under torch's extensions folder ($TORCH_EXTENSIONS_DIR, default
~/.cache/torch_extensions), and a changed source rebuilds it. Concurrent first uses wait on torch's own
lock in that folder.

This module also owns the two packings (what the C++ reads) and their float references, written here
with plain torch ops so that a test comparing the kernel with `dequantize()` checks the C++ unpacking
against an independent one:

    int8   q [N, K] int8, scales [N, K / group] float32            W = q * scale
    int4   packed [N, K / 2] uint8, sm [N, K / group, 2] float32   W = code * scale + min,  code in 0..15
           byte i of every 8-byte chunk c: code[16c + i] | code[16c + 8 + i] << 4
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "RADIXLM_CPU_KERNELS"
SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# At or below this many activation rows the register kernels run; above it the weight is dequantized a
# block of rows at a time into at::mm (float32 sgemm). Measured on the AVX2 EPYC, 1 thread, 24 linears of
# the 0.5B shape, ms (kernel / dequantized sgemm / torch's kernel): int4 M=32 183 / 237 / 240,
# M=64 408 / 404 / 426, M=128 825 / 709 / 748; int8 M=64 354 / 552 / 556, M=128 739 / 673 / 1041.
SMALL_M = 64


def disabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in ("0", "off", "false", "no")


def unsupported_cpu() -> str | None:
    """Why this CPU cannot run the kernels, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    # torch's AVX2 level requires AVX2 and FMA (ATen's cpuinfo check); AVX512 machines have both.
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"torch reports CPU capability {capability!r}, the kernels need AVX2 + FMA"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "torch is not built with OpenMP (the kernels use its at::parallel_for)"
    return None


def ops():
    """torch.ops.radixlm_cpu with int8_linear / int4_linear, or None (the reason logged once)."""
    if disabled_by_env():
        _log_once(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}: radixlm's CPU int8 / int4 kernels are off")
        return None
    return _load()


@functools.cache
def _log_once(message: str) -> None:
    logger.info("%s; using torch's int8 / int4 kernels", message)


@functools.lru_cache(maxsize=1)
def _load():
    why = unsupported_cpu()
    if why is not None:
        _log_once(why)
        return None
    try:
        from torch.utils.cpp_extension import load

        t0 = time.perf_counter()
        load(
            name="radixlm_cpu_kernels",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp", "-DNDEBUG"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        took = time.perf_counter() - t0
    except Exception as e:  # no compiler, no ninja, a failed build: the fallback is torch's kernels
        _log_once(f"radixlm's CPU int8 / int4 kernels did not build ({type(e).__name__}: {str(e)[-300:]})")
        return None
    _register_fake()
    logger.info("radixlm CPU int8 / int4 kernels ready (%.1f s, cached after the first build)", took)
    return torch.ops.radixlm_cpu


def _register_fake() -> None:
    """Shapes for torch.compile: y is [M, N] in the activations' dtype."""

    @torch.library.register_fake("radixlm_cpu::int4_linear")
    def _int4(x, packed, sm, group, bias, dense_above):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("radixlm_cpu::int8_linear")
    def _int8(x, q, scales, group, bias, dense_above):
        return x.new_empty(x.shape[0], q.shape[0])


# ---- the packings and their references (plain torch: independent of the C++) -------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 (K a multiple of 16) -> packed [N, K / 2] uint8 in the kernel's order."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // 16, 2, 8)  # per 16 columns: low half, high half
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: codes [N, K] uint8."""
    n, half = packed.shape
    p = packed.view(n, half // 8, 8)
    return torch.stack([p & 0xF, p >> 4], dim=2).reshape(n, half * 2)


def int4_reference(packed: torch.Tensor, sm: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 [N, K] matrix an int4 packing holds: code * scale + min."""
    codes = unpack_int4(packed).float()
    scale = sm[..., 0].repeat_interleave(group, dim=1)
    low = sm[..., 1].repeat_interleave(group, dim=1)
    return codes * scale + low


def int8_reference(q: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """The float32 [N, K] matrix an int8 packing holds: q * scale of its group."""
    return q.float() * scales.float().repeat_interleave(group, dim=1)
