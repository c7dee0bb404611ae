"""radixlm's int8 / int4 CPU kernels (layers/cpu_kernels.cpp), at every instruction-set level
this CPU has (AVX2, AVX-512, AVX512_BF16), against the float matrix their packing holds, unpacked by plain
torch ops (cpu_kernels.int4_reference / int8_reference); the switch
that turns them off (torch's kernels then run); GGUF Q8_0 blocks repacked exactly; and a whole model's
greedy tokens with the kernels against the same model on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from radixlm.layers import cpu_kernels
from radixlm.model.quantization.gguf import exact_int8_blocks
from radixlm.model.quantization.int4 import Int4Weight, Int4WeightOnly
from radixlm.model.quantization.int8 import Int8Weight

needs_kernels = pytest.mark.skipif(
    cpu_kernels.disabled_by_env() or cpu_kernels.ops() is None,
    reason="radixlm's CPU kernels are not available here (no AVX2 + FMA, no compiler, or switched off)",
)
ISAS = cpu_kernels.available_isas() if not cpu_kernels.disabled_by_env() else []


@pytest.fixture(params=list(cpu_kernels.ISA_NAMES))
def isa(request):
    """Each level in turn; the ones this CPU lacks skip (CI's CPU decides which run)."""
    if request.param not in ISAS:
        pytest.skip(f"this CPU has no {request.param} (it has: {', '.join(ISAS) or 'none'})")
    with cpu_kernels.pinned_isa(request.param):
        yield request.param


# M rows up to 8 (the register tiles: 4 rows at a time plus remainders), and one above SMALL_M (the
# dequantized sgemm path). With bf16 on an AVX512_BF16 CPU the dense path starts above SMALL_M_BF16 rows;
# `register_rows` runs each test a second time with it moved to SMALL_M, so the tiles are covered too.
ROWS = [*range(1, 9), cpu_kernels.SMALL_M + 3]


@pytest.fixture(params=["default", "register"])
def register_rows(request, monkeypatch):
    if request.param == "register":
        monkeypatch.setattr(cpu_kernels, "SMALL_M_BF16", cpu_kernels.SMALL_M)
    return request.param


def _check(got: torch.Tensor, x: torch.Tensor, ref_w: torch.Tensor, bias: torch.Tensor | None) -> None:
    ref = x.double() @ ref_w.double().T + (0 if bias is None else bias.double())
    scale = (x.double().abs() @ ref_w.double().abs().T).max().item()  # the size of the sum's terms
    if x.dtype == torch.float32:
        tol = 2e-6 * scale  # float32 accumulation in another order
    elif x.shape[0] <= cpu_kernels.dense_above(x.dtype):  # the output rounds to bf16, and bf16 inputs
        tol = 2**-8 * ref.abs().max().item() + 1e-5 * scale
    else:  # and the dequantized sgemm may round the weights to bf16 (2^-9 relative each)
        tol = 2**-8 * ref.abs().max().item() + 2**-9 * scale
    err = (got.double() - ref).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g} ({x.dtype}, M={x.shape[0]})"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# Widths: whole 64-column blocks, odd and even counts (192, 384), and a last half block (96, 160); groups of
# 32 (two per block), 64 and 128.
@pytest.mark.parametrize("n,k,group", [(7, 96, 32), (33, 192, 64), (5, 384, 128), (130, 160, 32)])
def test_int4_kernel_matches_the_packed_matrix(n, k, group, dtype, isa, register_rows) -> None:
    g = torch.Generator().manual_seed(n * k + group)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    zero = torch.randn(n, k // group, generator=g) * 0.1
    q = Int4Weight.from_parts(codes, scale, zero, group, dtype)
    assert q._ops is not None and q.packed.shape == (n, k // 2)
    # The reference from the codes themselves, not from the packing: a nibble-order mistake would show.
    expected = (codes.float() - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=1e-6)
    bias = torch.randn(n, generator=g).to(dtype)
    for m in ROWS:
        x = torch.randn(m, k, generator=g).to(dtype)
        _check(q(x, bias if m % 2 else None), x, expected, bias if m % 2 else None)
    x3 = torch.randn(2, 3, k, generator=g).to(dtype)  # leading dims kept
    assert q(x3).shape == (2, 3, n) and q(x3).dtype == dtype


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(9, 100), (33, 33), (64, 200)])
def test_int8_per_channel_kernel_matches_the_packed_matrix(n, k, dtype, isa, register_rows) -> None:
    """Any input width: 100 and 200 leave tails of 4 and 8 columns after the 16-wide steps (AVX-512: 4 and
    8 after the 32-wide ones), 33 one more."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    q = Int8Weight(w.to(dtype))
    assert q._ops is not None and q.scales.dtype == torch.float32
    expected = q.qweight.float() * q.scales[:, None]
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=0)
    assert (q.dequantize() - w.to(dtype).float()).abs().max() <= q.scales.max() / 2 + 1e-6
    bias = torch.randn(n, generator=g).to(dtype)
    for m in ROWS:
        x = torch.randn(m, k, generator=g).to(dtype)
        _check(q(x, bias), x, expected, bias)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_q8_0_blocks_repack_exactly_into_grouped_int8(dtype, isa, register_rows) -> None:
    """A Q8_0 weight as the GGUF loader hands it (q * d per block of 32, d in fp16): found again exactly,
    one scale per block; a weight that is not Q8_0 is not taken for one."""
    g = torch.Generator().manual_seed(8)
    n, k = 11, 96
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=g)
    q[..., 0] = 127 * torch.where(torch.rand(n, k // 32, generator=g) < 0.5, 1, -1)  # llama.cpp: amax -> 127
    d = (torch.rand(n, k // 32, 1, generator=g) * 0.01).half().float()
    w = (q * d).view(n, k)
    packed = exact_int8_blocks(w, dtype)
    assert packed is not None and packed.group_size == 32 and packed.scales.shape == (n, k // 32)
    torch.testing.assert_close(packed.dequantize(), w, rtol=0, atol=0)
    for m in (1, 3, 8, cpu_kernels.SMALL_M + 1):
        x = torch.randn(m, k, generator=g).to(dtype)
        _check(packed(x), x, w, None)
    assert exact_int8_blocks(torch.randn(n, k, generator=g), dtype) is None


def test_switched_off_uses_torchs_kernels(monkeypatch) -> None:
    """RADIXLM_CPU_KERNELS=0: packed for torch's kernels (their layout, scales in the activation dtype),
    still the same matrix; int8 with a scale per group (radixlm's kernel only) is refused, so GGUF Q8_0
    falls back to per-channel int8."""
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert cpu_kernels.ops() is None
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 128, generator=g)  # torch's int4 packing takes rows in multiples of 16
    x = torch.randn(3, 128, generator=g)
    q4 = Int4Weight(w, 64)
    assert q4._ops is None and hasattr(q4, "scales_and_zeros")
    torch.testing.assert_close(q4(x), x @ q4.dequantize().T, rtol=1e-4, atol=1e-4)
    q8 = Int8Weight(w)
    assert q8._ops is None
    torch.testing.assert_close(q8(x), x @ q8.dequantize().T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="per group"):
        Int8Weight.from_parts(q8.qweight, torch.ones(32, 4), torch.float32)
    # torch's int4 packing takes output rows by 16: such a weight is refused up front (it stays dense),
    # not failed inside torch; radixlm's kernel takes any row count.
    why = Int4WeightOnly().unsupported(torch.randn(24, 128))
    assert why is not None and "multiple of 16" in why
    assert Int4WeightOnly().unsupported(torch.randn(32, 128)) is None
    assert exact_int8_blocks(q8.dequantize(), torch.float32) is None


@needs_kernels
# Behind `slow` (CI time): tests/model/test_quantization.py's whole-model tests run the kernels in the
# default run.
@pytest.mark.slow  # about 30 s each; `python -m pytest -m slow tests/layers/test_cpu_kernels.py`
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_greedy_tokens_with_the_kernels_equal_the_dequantized_model(method) -> None:
    """fp32, native: the engine on radixlm's kernels, then the same engine with every packing replaced by
    its dequantized float matrix (F.linear): the same greedy tokens. The 80-token prompt's prefill runs
    the dequantized-sgemm path (above SMALL_M rows), the decode steps the register kernels."""
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore
    from radixlm.testing import cached_model_folder
    from tests.parity_utils import drive_core, random_prompts

    core = EngineCore(
        EngineConfig(
            model_path=str(cached_model_folder("qwen2", "tiny")),
            dtype="float32",
            inline_core=True,
            quantization=method,
        )
    )
    packed = [m for m in core.runner.model.modules() if getattr(m, "quant", None) is not None]
    assert packed and all(m.quant._ops is not None for m in packed)
    prompts = random_prompts(core.runner.vocab_size, [5, cpu_kernels.SMALL_M + 16], seed=11)
    params = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
    ours = drive_core(core, prompts, params)["ids"]

    class Dense:
        def __init__(self, q) -> None:
            self.weight = q.dequantize()

        def __call__(self, x, bias=None):
            return torch.nn.functional.linear(x, self.weight, bias)

    for m in packed:
        m.quant = Dense(m.quant)
    core.flush_cache()
    assert drive_core(core, prompts, params)["ids"] == ours


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (B, H, Hkv, D, Lmax): grouped query heads (7 and 4 per KV head), one per KV head, head dims 64 / 128,
# histories shorter than 8 (the scalar softmax tail) and longer.
@pytest.mark.parametrize("shape", [(1, 14, 2, 64, 40), (3, 8, 8, 64, 5), (5, 4, 1, 128, 19)])
def test_decode_attention_reads_the_pool_in_place(dtype, shape) -> None:
    """The in-place decode kernel against SDPA on the gathered, masked histories: slots scattered through
    the pool, each request with its own length, entries past a request's length pointing anywhere."""
    import torch.nn.functional as F

    B, H, Hkv, D, Lmax = shape
    g = torch.Generator().manual_seed(B * H + D)
    n_slots = B * Lmax + 7
    k_buf = torch.randn(n_slots, Hkv, D, generator=g).to(dtype)
    v_buf = torch.randn(n_slots, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    seq = torch.randint(1, Lmax + 1, (B,), generator=g)
    seq[0] = Lmax
    kv_idx = torch.randperm(n_slots, generator=g)[: B * Lmax].view(B, Lmax)
    got = cpu_kernels.ops().decode_attention(q, k_buf, v_buf, kv_idx, seq, D**-0.5)
    assert got.shape == (B, H, D) and got.dtype == dtype
    mask = (torch.arange(Lmax)[None] < seq[:, None])[:, None, None, :]
    k = k_buf[kv_idx].double().permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    v = v_buf[kv_idx].double().permute(0, 2, 1, 3)
    ref = F.scaled_dot_product_attention(q.double().view(B, Hkv, H // Hkv, D), k, v, attn_mask=mask, scale=D**-0.5)
    tol = 2e-6 if dtype == torch.float32 else 2**-7  # float32 sums; else the output's rounding
    assert (got.double() - ref.reshape(B, H, D)).abs().max().item() <= tol


@needs_kernels
def test_torch_backend_decodes_match_with_and_without_the_kernel(monkeypatch) -> None:
    """fp32, native: the engine's greedy tokens with the in-place decode kernel and with the gather + SDPA
    path (cpu_kernels.DECODE_ATTENTION off) are the same, over requests of different lengths."""
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore
    from radixlm.testing import cached_model_folder
    from tests.parity_utils import drive_core, random_prompts

    core = EngineCore(
        EngineConfig(model_path=str(cached_model_folder("qwen2", "tiny")), dtype="float32", inline_core=True)
    )
    prompts = random_prompts(core.runner.vocab_size, [3, 9, 17, 30], seed=5)
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    asked: list[bool] = []  # the backend's answers: the kernel did run
    ok = cpu_kernels.decode_attention_ok
    monkeypatch.setattr(cpu_kernels, "decode_attention_ok", lambda: asked.append(ok()) or asked[-1])
    with_kernel = drive_core(core, prompts, params)
    assert asked and all(asked)
    monkeypatch.setattr(cpu_kernels, "DECODE_ATTENTION", False)
    core.flush_cache()
    assert drive_core(core, prompts, params)["ids"] == with_kernel["ids"]


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch) -> None:
    """A killed first build leaves torch's lock behind and every later load would wait on it forever."""
    import os
    import time

    from torch.utils.cpp_extension import _get_build_directory

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "radixlm_test_ext" / "lock"
    assert _get_build_directory("radixlm_test_ext", verbose=False) == str(lock.parent)
    lock.touch()
    cpu_kernels.clear_stale_build_lock("radixlm_test_ext")
    assert lock.exists()  # a build may be running
    old = time.time() - cpu_kernels.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    cpu_kernels.clear_stale_build_lock("radixlm_test_ext")
    assert not lock.exists()
    cpu_kernels.clear_stale_build_lock("radixlm_test_ext")  # no lock: nothing to do
