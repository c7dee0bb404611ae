"""Prepacked CPU matmuls: oneDNN's blocked weight layout, chosen per weight shape by measurement.

`F.linear` on CPU hands MKL a row-major weight that it re-blocks on every call. For the shapes a decode
step runs (a few to a few dozen tokens against a wide weight) oneDNN's linear on a weight reordered once at
load is often much faster; for the LM head it is the largest single saving in a CPU decode step (measured
on a 2-core AVX2 EPYC, fp32, 32000 x 512 head: 64-70 ms with `F.linear` against 26-31 ms packed at 32 tokens,
never slower at 512-1024 prefill tokens). For small square weights at one token it can be slightly slower,
so the choice is made per weight shape, by timing both kernels at start.

A timing taken on a noisy machine can go either way, and a choice that flips between runs would change
the low bits of every logit, so `auto` keeps its decisions in a small JSON file keyed by CPU model, torch
version, thread count, dtype and shape: the first start measures, later starts on the same machine reuse
the decision and produce the same numbers. A packed kernel must win by a clear margin to be chosen.

Up to DECODE_ROWS tokens a bf16 linear on a CPU with AVX512_BF16 runs radixlm's own kernel
(`radixlm_cpu::bf16_block_linear`, layers/cpu_kernels.cpp) on a copy of the weight in blocks of 32 output
columns laid out for vdpbf16ps: a decode step reads every weight once, beyond the caches, and oneDNN left
that read un-overlapped with its arithmetic. On the 2-core Zen 4, every weight of the model in order: the
0.5B shape's layers at 1 token 32.5 ms packed, 28.7 ms with the earlier row-streaming kernel, 24.0 ms in
blocks; the small shape's layers at 24 tokens 5.1 ms packed against 3.3 ms, even at 64 tokens. A shape
keeps the block copy when all of them fit `BLOCK_COPY_BUDGET` of the free memory; a packed shape then
drops its plain weight (it never reads it), so what it holds is the size it held before with the plain
copy the row kernel read.

A float32 linear on a CPU with AVX-512 does the same with `radixlm_cpu::f32_block_linear` (blocks of 32
columns, each input's 32 weights contiguous, two FMAs a row per 128 bytes): the 0.5B shape's layers at
1 token 62.4 ms packed against 44.1 ms in blocks, the rate of a streaming copy; never slower up to 64.

`dense` (plain `F.linear`, the kernel transformers uses) and `packed` force one kernel everywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radixlm.config import LINEAR_KERNELS

logger = logging.getLogger(__name__)
# The token counts a choice is timed at: one decode, and a batch of decodes (the common serving shape).
TIMED_TOKENS = (1, 32)
# oneDNN picks its blocking from this expected batch; 32 measured best or near-best from 1 to 1024 tokens.
PACK_BATCH_HINT = 32
# Packed is chosen only when it takes at most this fraction of the dense time, summed over TIMED_TOKENS.
REQUIRED_SPEEDUP = 0.9
_TIMING_REPEATS = 5
# Up to this many activation rows a bf16 linear takes the block kernel (see the module docstring); measured
# on the 2-core Zen 4 against oneDNN's packed kernel, every weight of a model in order: 1.2-1.9x at 1-48
# rows, even at 64.
DECODE_ROWS = 64
# The block copies the decode kernel reads may take this fraction of MemAvailable, else none is made (the KV
# pool, sized later, needs the rest).
BLOCK_COPY_BUDGET = 0.25


def packing_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why packed matmuls cannot run here, or None when they can."""
    if device.type != "cpu":
        return f"packed linears are a CPU kernel (device is {device.type})"
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch build has no oneDNN linear"
    if dtype == torch.float32:
        return None
    if dtype == torch.bfloat16:
        try:  # oneDNN refuses bf16 packing without the CPU instructions it needs
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
        except RuntimeError as e:
            return f"oneDNN cannot pack bfloat16 on this CPU ({str(e).splitlines()[0][:120]})"
        return None
    return f"no packed linear for {dtype}"


# The ISA level each dtype's block kernel needs (bf16: vdpbf16ps; float32: AVX-512 FMA).
_DECODE_ISA = {torch.bfloat16: "avx512_bf16", torch.float32: "avx512"}


def decode_kernel_unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the streaming block kernel cannot run here, or None when it can."""
    if device.type != "cpu" or dtype not in _DECODE_ISA:
        return f"the decode kernel is for bfloat16 or float32 on a CPU (here {dtype} on {device.type})"
    from radixlm.layers import cpu_kernels

    if cpu_kernels.ops() is None:
        return "radixlm's CPU kernels are not available (see the log)"
    level = cpu_kernels.isa()
    need = _DECODE_ISA[dtype]
    if cpu_kernels.ISA_NAMES.index(level) < cpu_kernels.ISA_NAMES.index(need):
        return f"the CPU kernels run at {level}, the {dtype} decode kernel needs {need}"
    return None


class PackedWeight:
    """A [out, in] weight in the layouts the CPU kernels read, called like F.linear(x, weight, bias):
    oneDNN's prepacked layout (`packed`, unless pack=False), F.linear on `plain` when not packed, and with
    decode=True the bf16 block copy for radixlm's kernel at up to DECODE_ROWS rows."""

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        pack: bool = True,
        plain: torch.Tensor | None = None,
        decode: bool = False,
    ) -> None:
        self.out_features, self.in_features = weight.shape
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
            if pack
            else None
        )
        if plain is None and not pack:
            raise ValueError("a PackedWeight needs a packed or a plain weight")
        self.plain = plain
        self.blocks: torch.Tensor | None = None
        self._decode = None
        if decode:
            from radixlm.layers import cpu_kernels

            if weight.dtype not in _DECODE_ISA or cpu_kernels.ops() is None:
                raise ValueError(
                    f"the decode kernel reads a bf16 or float32 weight with radixlm's CPU kernels ({weight.dtype})"
                )
            if weight.dtype == torch.bfloat16:
                self.blocks = cpu_kernels.pack_bf16_blocks(weight.detach())
                self._decode = cpu_kernels.ops().bf16_block_linear
            else:
                self.blocks = cpu_kernels.pack_f32_blocks(weight.detach())
                self._decode = cpu_kernels.ops().f32_block_linear

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed and block copies (the plain weight, when kept, is the module's own)."""
        packed = (
            0 if self.packed is None else self.out_features * self.in_features * self.packed.element_size()
        )
        blocks = 0 if self.blocks is None else self.blocks.numel() * self.blocks.element_size()
        return packed + blocks

    def kernels(self) -> str:
        parts = (["decode kernel"] if self._decode is not None else []) + (
            ["packed"] if self.packed is not None else ["dense"]
        )
        return " + ".join(parts)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if self._decode is not None and x2.shape[0] <= DECODE_ROWS and x2.dtype == self.blocks.dtype:
            y = self._decode(x2, self.blocks, self.out_features, self.in_features, bias)
        elif self.packed is None:
            y = F.linear(x2, self.plain, bias)
        elif torch.compiler.is_compiling():  # inductor cannot lower oneDNN's op on a prepacked weight itself
            y = packed_linear(x2, self.packed, bias, self.out_features)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.packed, bias, "none", [], "")
        return y.view(*lead, self.out_features)


@torch.library.custom_op("radixlm::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """oneDNN's linear on a prepacked weight, opaque to torch.compile (model/compiled_forward.py)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@dataclass(frozen=True)
class ShapeChoice:
    packed: bool
    dense_ms: tuple[float, ...]
    packed_ms: tuple[float, ...]
    source: str  # "measured", "cached" or "forced"


def _time_ms(fn, x: torch.Tensor) -> float:
    """Best of a few calls: the minimum is what a quiet machine would show; noise only adds."""
    fn(x)
    best = float("inf")
    for _ in range(_TIMING_REPEATS):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure_shape(weight: torch.Tensor, bias: torch.Tensor | None) -> ShapeChoice:
    """Time F.linear against the packed kernel on this weight at TIMED_TOKENS, alternating the two."""
    packed = PackedWeight(weight)
    dense_ms, packed_ms = [], []
    with torch.inference_mode():
        for tokens in TIMED_TOKENS:
            x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype)
            dense_ms.append(_time_ms(lambda a: F.linear(a, weight, bias), x))
            packed_ms.append(_time_ms(lambda a: packed(a, bias), x))
    wins = sum(packed_ms) <= REQUIRED_SPEEDUP * sum(dense_ms)
    return ShapeChoice(wins, tuple(dense_ms), tuple(packed_ms), "measured")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def default_decision_file() -> Path:
    root = os.environ.get("RADIXLM_CACHE_DIR") or str(Path.home() / ".cache" / "radixlm")
    return Path(root) / "linear-kernels.json"


class DecisionCache:
    """Per-machine kernel decisions in a JSON file; unreadable or missing files just mean 'measure'."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        self.dirty = False
        if path is not None and path.exists():
            try:
                data = json.loads(path.read_text())
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError) as e:
                logger.warning("ignoring the linear-kernel decisions in %s: %s", path, e)

    @staticmethod
    def key(weight: torch.Tensor, has_bias: bool) -> str:
        out_f, in_f = weight.shape
        dtype = str(weight.dtype).removeprefix("torch.")
        return (
            f"{_cpu_model()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
            f"{dtype} {out_f}x{in_f}{' +bias' if has_bias else ''}"
        )

    def get(self, key: str) -> ShapeChoice | None:
        e = self.entries.get(key)
        if not isinstance(e, dict) or not isinstance(e.get("packed"), bool):
            return None
        return ShapeChoice(e["packed"], tuple(e.get("dense_ms", ())), tuple(e.get("packed_ms", ())), "cached")

    def put(self, key: str, choice: ShapeChoice) -> None:
        self.entries[key] = {
            "packed": choice.packed,
            "dense_ms": [round(t, 4) for t in choice.dense_ms],
            "packed_ms": [round(t, 4) for t in choice.packed_ms],
        }
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:  # write aside and rename, so a concurrent reader never sees half a file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".linear-kernels.")
            with os.fdopen(fd, "w") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as e:
            logger.warning("could not save linear-kernel decisions to %s: %s", self.path, e)


@dataclass
class PackReport:
    kernel: str  # what was asked for
    reason: str  # why packing is off, when it is
    packed_modules: int = 0
    dense_modules: int = 0
    choices: dict[str, ShapeChoice] | None = None
    # linears that run the block decode kernel (bf16 or float32) at up to DECODE_ROWS rows
    decode_modules: int = 0
    decode_note: str = ""  # why the decode kernel is off, or what its block copies cost

    def summary(self) -> str:
        decode = (
            f"; block decode kernel at <= {DECODE_ROWS} rows on {self.decode_modules} linears"
            + (f" ({self.decode_note})" if self.decode_note else "")
            if self.decode_modules
            else f"; no decode kernel ({self.decode_note})"
            if self.decode_note
            else ""
        )
        if self.reason:
            return f"linear kernel {self.kernel}: dense F.linear everywhere ({self.reason}){decode}"
        shapes = ", ".join(
            f"{k.rsplit('| ', 1)[-1]}: {'packed' if c.packed else 'dense'} ({c.source}"
            + (f", dense {sum(c.dense_ms):.3f} ms vs packed {sum(c.packed_ms):.3f} ms" if c.dense_ms else "")
            + ")"
            for k, c in (self.choices or {}).items()
        )
        return (
            f"linear kernel {self.kernel}: {self.packed_modules} linears packed, {self.dense_modules} dense; "
            f"{shapes}{decode}"
        )


def _packed_forward(packed: PackedWeight, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return packed(x, module.bias)


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose matmul can be packed: our linears, our LM head (which may be the tied embedding: it
    asks `packed` in compute_logits) and torch's nn.Linear (the Transformers backend's layers)."""
    from radixlm.layers.embedding import VocabParallelEmbedding
    from radixlm.layers.linear import LinearBase

    head = getattr(model, "lm_head", None)
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, VocabParallelEmbedding):
            usable = mod is head  # an embedding that is not the head never multiplies
        else:
            usable = isinstance(mod, LinearBase) or type(mod) is nn.Linear
        w = getattr(mod, "weight", None)
        usable = usable and getattr(mod, "quant", None) is None  # a quantized matmul is not repacked
        if usable and isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype.is_floating_point:
            found.append((name, mod))
    return found


def _install(mod: nn.Module, weight: PackedWeight, keep_weight: bool) -> None:
    """Route the module's matmul through `weight`; drop the dense copy unless kept (another module reads
    it, or F.linear does)."""
    from radixlm.layers.embedding import VocabParallelEmbedding

    mod.packed = weight
    if type(mod) is nn.Linear:
        mod.forward = partial(_packed_forward, weight, mod)
    # An embedding still looks rows up in its dense weight; a tied head's weight is the embedding's.
    if not keep_weight and not isinstance(mod, VocabParallelEmbedding):
        mod.weight = None


def prepack_linears(
    model: nn.Module,
    kernel: str,
    device: torch.device,
    dtype: torch.dtype,
    decision_file: Path | None = None,
    free_bytes: int | None = None,
) -> PackReport:
    """Pack the model's linear weights where the kernel choice says so, and give bf16 linears the decode
    kernel where it runs (`free_bytes`: memory free now, which bounds the decode kernel's block copies;
    None makes none). Call after the weights loaded."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {kernel!r}")
    if kernel == "dense":
        return PackReport(kernel, "asked for dense")
    why_not = packing_unsupported(device, dtype)
    if why_not is not None:
        if kernel == "packed":
            raise ValueError(f"linear_kernel packed: {why_not}")
        return PackReport(kernel, why_not)

    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    cache = DecisionCache(decision_file if kernel == "auto" else None)
    report = PackReport(kernel, "", choices={})
    plan = []  # (module, packed?, shared?)
    for _, mod in _candidates(model):
        w = mod.weight
        bias = getattr(mod, "bias", None)
        key = DecisionCache.key(w, bias is not None)
        choice = report.choices.get(key) or _choose(kernel, cache, key, w, bias)
        report.choices[key] = choice
        plan.append((mod, choice.packed, owners.get(w.data_ptr(), 0) > 1))
    cache.save()
    decode_why = decode_kernel_unsupported(device, dtype) if kernel == "auto" else f"linear_kernel {kernel}"
    copies_fit, report.decode_note = (
        _block_copy_budget(plan, free_bytes) if decode_why is None else (False, decode_why)
    )
    decode = decode_why is None and copies_fit
    with torch.inference_mode():
        for mod, packed, shared in plan:
            w = mod.weight
            report.decode_modules += decode
            if packed:
                _install(mod, PackedWeight(w, decode=decode), keep_weight=shared)
                report.packed_modules += 1
            else:
                if decode:
                    _install(
                        mod, PackedWeight(w, pack=False, plain=w.detach(), decode=True), keep_weight=True
                    )
                report.dense_modules += 1
    return report


def _block_copy_budget(plan: list[tuple[nn.Module, bool, bool]], free_bytes: int | None) -> tuple[bool, str]:
    """Whether the linears may have the decode kernel's block copies, and what they cost."""
    extra = sum(m.weight.numel() * m.weight.element_size() for m, _, _ in plan)
    mib = extra / 2**20
    if free_bytes is None or extra > BLOCK_COPY_BUDGET * free_bytes:
        free = "unknown" if free_bytes is None else f"{free_bytes / 2**20:.0f} MiB"
        return False, (
            f"no block copies: {mib:.0f} MiB would exceed {BLOCK_COPY_BUDGET:.0%} of the free memory ({free}); "
            "the linears run oneDNN or F.linear at every row count"
        )
    return True, f"block copies: {mib:.0f} MiB"


def _choose(
    kernel: str, cache: DecisionCache, key: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> ShapeChoice:
    if kernel == "packed":
        return ShapeChoice(True, (), (), "forced")
    cached = cache.get(key)
    if cached is not None:
        return cached
    choice = measure_shape(weight, bias)
    cache.put(key, choice)
    return choice
