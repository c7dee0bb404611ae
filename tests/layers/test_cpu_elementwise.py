"""cpu_elementwise.cpp: rotary bitwise the torch form in every dtype; RMSNorm within two ulps of
transformers' LlamaRMSNorm in bf16 / fp16, rarely off at all; and where the layers use each."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from radixlm.layers import cpu_kernels
from radixlm.layers.norm import RMSNorm
from radixlm.layers.rotary import apply_rotary, rotate_qk

needs_kernels = pytest.mark.skipif(
    cpu_kernels.ops() is None, reason="radixlm's CPU kernels are not built here"
)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
# (heads, head_dim, rotary_dim): full rotary (halves of 32, 64), partial (Phi-style 16 of 64), halves that
# are not a multiple of 8 (the scalar tail), one KV head.
@pytest.mark.parametrize("shape", [(14, 64, 64), (2, 128, 128), (4, 64, 16), (3, 40, 20), (1, 128, 36)])
def test_rotary_is_bitwise_the_torch_form(dtype, shape) -> None:
    H, D, rot = shape
    g = torch.Generator().manual_seed(H * D + rot)
    T = 37
    qkv = torch.randn(T, 2 * H * D + 3, generator=g).to(dtype)  # q and k are strided views, as split gives
    q, k = qkv[:, : H * D], qkv[:, H * D : 2 * H * D]
    cos = (torch.randn(T, rot // 2, generator=g) * 3).to(dtype)
    sin = (torch.randn(T, rot // 2, generator=g) * 3).to(dtype)
    got_q, got_k = cpu_kernels.ops().rotary_qk(q, k, cos, sin, D, rot)
    assert torch.equal(got_q, apply_rotary(q, cos, sin, D, rot))
    assert torch.equal(got_k, apply_rotary(k, cos, sin, D, rot))


@needs_kernels
def test_rotate_qk_takes_the_kernel_and_agrees_without_it(monkeypatch) -> None:
    q, k = torch.randn(3, 4 * 64).bfloat16(), torch.randn(3, 64).bfloat16()
    cos, sin = torch.randn(3, 32).bfloat16(), torch.randn(3, 32).bfloat16()
    calls = []
    real = cpu_kernels.ops().rotary_qk
    monkeypatch.setattr(
        cpu_kernels, "ops", lambda: type("Ops", (), {"rotary_qk": lambda *a: calls.append(1) or real(*a)})
    )
    fused = rotate_qk(q, k, cos, sin, 64, 64)
    assert calls == [1]
    monkeypatch.setattr(cpu_kernels, "ELEMENTWISE", False)
    plain = rotate_qk(q, k, cos, sin, 64, 64)
    assert calls == [1] and all(torch.equal(a, b) for a, b in zip(fused, plain))


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place of a's dtype (same-sign values: the bit patterns' difference)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [64, 896, 37])
def test_fused_rmsnorm_is_within_an_ulp_of_transformers(dtype, width) -> None:
    """Only the sum of squares adds in another order (a float32 ulp of the variance at most): where that
    moves T(h) by an ulp, the weight's product can land up to two ulps of the dtype away from
    LlamaRMSNorm's output, and that happens rarely (measured: 6 of 268,800 bf16 values at width 896)."""
    g = torch.Generator().manual_seed(width)
    hf = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    hf.weight.data.copy_((torch.rand(width, generator=g) + 0.5).to(dtype))
    x, r = torch.randn(300, width, generator=g).to(dtype), torch.randn(300, width, generator=g).to(dtype)
    ops = cpu_kernels.ops()
    out = ops.rms_norm(x, hf.weight, 1e-5)
    out_res, total = ops.add_rms_norm(x, r, hf.weight, 1e-5)
    assert torch.equal(total, x + r)  # the residual sum is exact: one rounding, as torch's add
    for got, ref in ((out, hf(x)), (out_res, hf(x + r))):
        ulps = _ulps(got, ref)
        assert ulps.max().item() <= 2
        assert (ulps > 0).float().mean().item() < 1e-3


@needs_kernels
def test_rmsnorm_layer_fuses_bf16_only(monkeypatch) -> None:
    """RMSNorm calls the kernel for bf16 (returning the residual sum too) and keeps float32 on torch's ops."""
    calls = []
    real = cpu_kernels.ops()
    fake = type(
        "Ops",
        (),
        {
            "rms_norm": lambda *a: calls.append("rms_norm") or real.rms_norm(*a),
            "add_rms_norm": lambda *a: calls.append("add_rms_norm") or real.add_rms_norm(*a),
        },
    )
    monkeypatch.setattr(cpu_kernels, "ops", lambda: fake)
    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(64, eps=1e-6, params_dtype=dtype)
        x, r = torch.randn(2, 64).to(dtype), torch.randn(2, 64).to(dtype)
        out, total = norm(x, r)
        assert torch.equal(total, x + r) and out.shape == x.shape
        assert norm(x).shape == x.shape
    assert calls == ["add_rms_norm", "rms_norm"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter", [1408, 37, 8])
def test_silu_and_mul_is_within_an_ulp_of_the_torch_form(dtype, inter) -> None:
    """Only exp differs from torch's (about a float32 ulp), so an output may move by one ulp of the dtype
    where that crosses a rounding boundary (measured: none of 2.7M bf16 / fp16 values at 973 x 1408);
    large negative gates included, where exp(-g) leaves float32's range."""
    g = torch.Generator().manual_seed(inter)
    x = (torch.randn(301, 2 * inter, generator=g) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, -60.0, 0.0, 11.0], dtype=dtype)  # exp(100) is inf in float32
    got = cpu_kernels.ops().silu_and_mul(x)
    ref = torch.nn.functional.silu(x[:, :inter]) * x[:, inter:]
    ulps = _ulps(got, ref)
    assert got.shape == ref.shape and ulps.max().item() <= 1
    assert (ulps > 0).float().mean().item() < 1e-3


@needs_kernels
def test_silu_and_mul_layer_fuses_bf16_only(monkeypatch) -> None:
    from radixlm.layers.activation import SiluAndMul

    calls = []
    real = cpu_kernels.ops()
    fake = type("Ops", (), {"silu_and_mul": lambda *a: calls.append(1) or real.silu_and_mul(*a)})
    monkeypatch.setattr(cpu_kernels, "ops", lambda: fake)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 5, 32).to(dtype)
        out = SiluAndMul()(x)
        assert out.shape == (3, 5, 16)
        assert torch.equal(out, torch.nn.functional.silu(x[..., :16]) * x[..., 16:])
    assert calls == [1]
    with pytest.raises(RuntimeError, match="bf16 or fp16 only"):
        real.silu_and_mul(torch.randn(2, 8))
    with pytest.raises(RuntimeError, match="2 \\* I"):
        real.silu_and_mul(torch.randn(2, 7).bfloat16())
