"""radixlm_cpu::f32_block_linear: the float32 decode linear on weight blocks (AVX-512), and the
PackedWeight routing that sends float32 decode rows to it."""

from __future__ import annotations

import pytest
import torch

from radixlm.layers import cpu_kernels
from radixlm.layers.packed_linear import DECODE_ROWS, PackedWeight, decode_kernel_unsupported

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    decode_kernel_unsupported(CPU, torch.float32) is not None,
    reason=f"no float32 decode kernel here: {decode_kernel_unsupported(CPU, torch.float32)}",
)


def _block_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    return cpu_kernels.ops().f32_block_linear(x, cpu_kernels.pack_f32_blocks(w), n, k, b)


def test_blocks_hold_each_input_s_32_weights_contiguous() -> None:
    w = torch.arange(70 * 9, dtype=torch.float32).view(70, 9)
    blocks = cpu_kernels.pack_f32_blocks(w)
    assert blocks.shape == (3, 9, 32)
    assert blocks[1, 4, 5].item() == w[37, 4].item()
    assert (blocks[2, :, 6:] == 0).all()  # columns past N are zeros


@pytest.mark.parametrize(
    ("n", "k", "m", "bias"), [(96, 64, 1, True), (70, 33, 5, False), (1152, 896, 13, True), (40, 7, 64, True)]
)
def test_block_linear_matches_a_float64_reference(n: int, k: int, m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n + k + m)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    got = _block_linear(x, w, b)
    assert got.shape == (m, n) and got.dtype == torch.float32
    # float32 sums in order over k: a few ulps of the products' magnitude
    assert (got.double() - ref).abs().max().item() <= 1e-5 * (k**0.5) * ref.abs().max().item()


def test_each_row_gets_the_same_bits_at_any_batch_size() -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    x = torch.randn(DECODE_ROWS, 96, generator=g)
    full = _block_linear(x, w, b)
    for m in (1, 2, 7, 12, 13, 25, DECODE_ROWS - 1):
        assert torch.equal(_block_linear(x[:m], w, b), full[:m]), m
    assert torch.equal(_block_linear(x[5:6], w, b), full[5:6])


def test_block_linear_refuses_what_it_cannot_read() -> None:
    w = torch.randn(64, 32)
    blocks = cpu_kernels.pack_f32_blocks(w)
    ops = cpu_kernels.ops()
    with pytest.raises(RuntimeError, match="float32 activations"):
        ops.f32_block_linear(torch.randn(2, 32).to(torch.bfloat16), blocks, 64, 32, None)
    with pytest.raises(RuntimeError, match="do not hold"):
        ops.f32_block_linear(torch.randn(2, 31), blocks, 64, 31, None)
    with pytest.raises(RuntimeError, match="weight blocks must be"):
        ops.f32_block_linear(torch.randn(2, 32), blocks.to(torch.bfloat16), 64, 32, None)


def test_packed_weight_sends_float32_decode_rows_to_the_block_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    both, packed_only = PackedWeight(w, decode=True), PackedWeight(w)
    assert both.kernels() == "decode kernel + packed" and both.blocks.dtype == torch.float32
    for m in (1, 3, DECODE_ROWS, DECODE_ROWS + 1, 100):
        x = torch.randn(m, 64, generator=g)
        expected = _block_linear(x, w, b) if m <= DECODE_ROWS else packed_only(x, b)
        assert torch.equal(both(x, b), expected), m
