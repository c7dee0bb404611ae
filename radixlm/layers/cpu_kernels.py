"""radixlm's own x86 CPU kernels, built on first use: weight-only int8 / int4 linears, a streaming bf16
linear for decode (packed_linear.py), the decode attention that reads the KV pool in place
(cpu_kernels.cpp; attention_backends/torch_backend.py), flash attention for prompt spans and shared-prefix
decodes over the pool in place (cpu_flash_attention.cpp), and RMSNorm and rotary in one call each
(cpu_elementwise.cpp; norm.py, rotary.py). All include cpu_simd.h.

They need AVX2 + FMA and use AVX-512 (int8) and AVX512_BF16 (int4 with bf16 activations) where the CPU has
them: the C++ picks the best level at run time; `RADIXLM_CPU_KERNEL_ISA=avx2|avx512|avx512_bf16` (or
`pinned_isa` in tests) caps it.

`ops()` gives the loaded op namespace (`torch.ops.radixlm_cpu`) or None, and the reason is logged once:
- `RADIXLM_CPU_KERNELS=0` (or off / false / no): forced off, e.g. to test the fallback;
- not an x86-64 CPU with AVX2 + FMA (torch's own CPU capability check says so), or torch built without
  OpenMP's at::parallel_for;
- no C++ compiler, no ninja, or the build failed.
Without them int8.py / int4.py use torch's kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`)
and the torch attention backend gathers each history for SDPA.

The build (torch.utils.cpp_extension.load, three source files, ~60 s on 2 cores) happens once per machine and
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

import contextlib
import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ENV_SWITCH = "RADIXLM_CPU_KERNELS"
ENV_ISA = "RADIXLM_CPU_KERNEL_ISA"
ISA_NAMES = ("avx2", "avx512", "avx512_bf16")  # the C++ levels 0, 1, 2
SOURCES = [
    Path(__file__).with_name(name)
    for name in ("cpu_kernels.cpp", "cpu_elementwise.cpp", "cpu_flash_attention.cpp")
]
# At or below this many activation rows the register kernels run; above it the weight is dequantized a
# block of rows at a time into at::mm (float32 sgemm). Measured on the AVX2 EPYC, 1 thread, 24 linears of
# the 0.5B shape, ms (kernel / dequantized sgemm / torch's kernel): int4 M=32 183 / 237 / 240,
# M=64 408 / 404 / 426, M=128 825 / 709 / 748; int8 M=64 354 / 552 / 556, M=128 739 / 673 / 1041.
SMALL_M = 64
# With bf16 activations on a CPU with AVX512_BF16 / AMX, the dense path's matmul runs in bf16 and wins much
# earlier. 2-core Xeon (AMX), 2 threads, ms per call for the 9728x896 gate/up weight, register kernel /
# dequantized bf16 matmul / bf16 F.linear: int4 M=4 1.00 / 1.69 / 0.82, M=8 1.94 / 1.75 / 0.86,
# M=16 3.76 / 1.84 / 0.86; int8 M=8 1.45 / 1.61, M=16 3.55 / 1.70.
SMALL_M_BF16 = 6
_isa_now: list[int] = []  # the level in use, cached here so that each linear call need not ask the C++


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
    """torch.ops.radixlm_cpu (int8_linear, int4_linear, bf16_block_linear, decode_attention, isa_level, the
    elementwise ops), or None (the reason
    logged once)."""
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

        clear_stale_build_lock(EXTENSION_NAME)
        t0 = time.perf_counter()
        load(
            name=EXTENSION_NAME,
            sources=[str(p) for p in SOURCES],
            # fp-contract=off: no product and sum fused into one rounding where the C++ mirrors torch's
            # separate ops (cpu_elementwise.cpp); the kernels' own FMAs are explicit intrinsics.
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        took = time.perf_counter() - t0
    except Exception as e:  # no compiler, no ninja, a failed build: the fallback is torch's kernels
        _log_once(f"radixlm's CPU int8 / int4 kernels did not build ({type(e).__name__}: {str(e)[-300:]})")
        return None
    _register_fake()
    ops = torch.ops.radixlm_cpu
    cap = os.environ.get(ENV_ISA, "").strip().lower()
    if cap:
        if cap not in ISA_NAMES:
            raise ValueError(f"{ENV_ISA}={cap!r}: expected one of {', '.join(ISA_NAMES)}")
        ops.isa_level(ISA_NAMES.index(cap))
    _isa_now[:] = [ops.isa_level(-1)]
    logger.info(
        "radixlm CPU int8 / int4 kernels ready (%.1f s, cached after the first build), %s",
        took,
        ISA_NAMES[_isa_now[0]],
    )
    return ops


EXTENSION_NAME = "radixlm_cpu_kernels"
# A build takes under a minute on 2 cores; a lock this old was left by a build that was killed.
STALE_LOCK_S = 15 * 60


def clear_stale_build_lock(name: str) -> None:
    """A first build killed midway (Ctrl-C, a killed test run) leaves torch's lock file in the build folder,
    and every later load() waits on it forever, silently (seen here: a test run hung at its first kernel
    use). A lock older than STALE_LOCK_S is removed, with a warning."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):  # no lock (the usual case), or torch moved its private helper
        return
    if age > STALE_LOCK_S:
        logger.warning("removing %s, left %.0f min ago by a build that did not finish", lock, age / 60)
        lock.unlink(missing_ok=True)


# Set to False by tests that compare the torch backend's own decode path with the kernel.
DECODE_ATTENTION = True


def decode_attention_ok() -> bool:
    """Whether the torch attention backend may use the in-place decode attention kernel here."""
    return DECODE_ATTENTION and ops() is not None


# Set to False by tests and benchmarks that compare the prompt-span kernel with SDPA.
SPAN_ATTENTION = True


def span_attention_ok(dtype: torch.dtype) -> bool:
    """Whether the torch attention backend may attend prompt spans and shared-prefix decodes of a `dtype`
    pool with cpu_flash_attention.cpp's kernels: built, switched on, and the CPU (or the pinned level) has
    what their products are made of: AVX512_BF16 for bf16, AVX-512 for float32."""
    need = {torch.bfloat16: "avx512_bf16", torch.float32: "avx512"}.get(dtype)
    return (
        need is not None
        and SPAN_ATTENTION
        and ops() is not None
        and bool(_isa_now)
        and _isa_now[0] >= ISA_NAMES.index(need)
    )


# Set to False by tests and benchmarks that compare RMSNorm / rotary's torch forms with the C++ ones.
ELEMENTWISE = True


def elementwise_ok() -> bool:
    """Whether norm.py / rotary.py may call cpu_elementwise.cpp's RMSNorm and rotary here. Asked ~75 times
    a decode step, so the answer of ops() is kept from the first call (reading the environment each time
    cost ~1 ms of a 40 ms step); RADIXLM_CPU_KERNELS set later does not reach these two."""
    return ELEMENTWISE and _elementwise_built()


@functools.lru_cache(maxsize=1)
def _elementwise_built() -> bool:
    return ops() is not None


def dense_above(dtype: torch.dtype) -> int:
    """Above this many activation rows the kernels dequantize into a float matmul (see SMALL_M)."""
    if dtype == torch.bfloat16 and _isa_now and _isa_now[0] >= ISA_NAMES.index("avx512_bf16"):
        return SMALL_M_BF16
    return SMALL_M


def isa() -> str | None:
    """The instruction-set level the kernels use now, or None without them."""
    loaded = ops()
    return None if loaded is None else ISA_NAMES[loaded.isa_level(-1)]


def available_isas() -> list[str]:
    """Every level this CPU can run (lowest first), whatever the cap; [] without the kernels."""
    loaded = ops()
    if loaded is None:
        return []
    now = loaded.isa_level(-1)
    best = loaded.isa_level(len(ISA_NAMES) - 1)
    _isa_now[:] = [loaded.isa_level(now)]
    return list(ISA_NAMES[: best + 1])


@contextlib.contextmanager
def pinned_isa(name: str):
    """Run the kernels at level `name` (at most what the CPU has) inside the block; tests use it to cover
    the AVX2 code on an AVX-512 machine."""
    loaded = ops()
    assert loaded is not None, "the kernels are not available here"
    before = loaded.isa_level(-1)
    _isa_now[:] = [loaded.isa_level(ISA_NAMES.index(name))]
    try:
        yield
    finally:
        _isa_now[:] = [loaded.isa_level(before)]


def _register_fake() -> None:
    """Shapes for torch.compile: y is [M, N] in the activations' dtype."""

    @torch.library.register_fake("radixlm_cpu::int4_linear")
    def _int4(x, packed, sm, group, bias, dense_above):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("radixlm_cpu::int8_linear")
    def _int8(x, q, scales, group, bias, dense_above):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake("radixlm_cpu::bf16_block_linear")
    def _bf16_blocks(x, blocks, n, k, bias):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("radixlm_cpu::f32_block_linear")
    def _f32_blocks(x, blocks, n, k, bias):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("radixlm_cpu::decode_attention")
    def _decode_attention(q, k_buf, v_buf, kv_idx, seq_lens, scale):
        return q.new_empty(q.shape[0], q.shape[1], v_buf.shape[2])

    @torch.library.register_fake("radixlm_cpu::span_attention")
    def _span_attention(q, k_buf, v_buf, kv_idx, prefix, scale):
        return q.new_empty(q.shape[0], q.shape[1], v_buf.shape[2])

    @torch.library.register_fake("radixlm_cpu::shared_decode_attention")
    def _shared_decode_attention(q, k_buf, v_buf, token_idx, kv_idx, prefix_lens, own_lens, scale):
        return q.new_empty(token_idx.numel(), q.shape[1], v_buf.shape[2])

    @torch.library.register_fake("radixlm_cpu::rms_norm")
    def _rms_norm(x, weight, eps):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("radixlm_cpu::add_rms_norm")
    def _add_rms_norm(x, residual, weight, eps):
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2))

    @torch.library.register_fake("radixlm_cpu::silu_and_mul")
    def _silu_and_mul(x):
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)

    @torch.library.register_fake("radixlm_cpu::rotary_qk")
    def _rotary_qk(q, k, cos, sin, head_dim, rotary_dim):
        return q.new_empty(q.shape), k.new_empty(k.shape)


# ---- the packings and their references (plain torch: independent of the C++) -------------------------


BLOCK_COLS = 32  # output columns per weight block of bf16_block_linear (kVnniCols in cpu_kernels.cpp)


def pack_bf16_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> [ceil(N / 32), ceil(K / 2), 32, 2] for radixlm_cpu::bf16_block_linear: blocks of 32
    output columns, each column's inputs in pairs (the operand layout of vdpbf16ps), zeros past N and K."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // BLOCK_COLS) * BLOCK_COLS, k + k % 2, dtype=torch.bfloat16)
    padded[:n, :k] = weight
    return padded.view(-1, BLOCK_COLS, padded.shape[1] // 2, 2).permute(0, 2, 1, 3).contiguous()


def pack_f32_blocks(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / 32), K, 32] for radixlm_cpu::f32_block_linear: blocks of 32 output
    columns, each input's 32 weights contiguous, zeros past N."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // BLOCK_COLS) * BLOCK_COLS, k, dtype=torch.float32)
    padded[:n] = weight
    return padded.view(-1, BLOCK_COLS, k).transpose(1, 2).contiguous()


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
