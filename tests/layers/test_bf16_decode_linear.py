"""The bf16 decode linear (radixlm_cpu::bf16_block_linear in layers/cpu_kernels.cpp, on the weight blocks
cpu_kernels.pack_bf16_blocks lays out) against a float64 reference on the same bf16 inputs, its batch
invariance, its refusals, and how packed_linear routes a bf16 linear to it (up to DECODE_ROWS rows) or to
oneDNN / F.linear (above), with the block copies bounded by the free memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixlm.layers import cpu_kernels, packed_linear
from radixlm.layers.embedding import VocabParallelEmbedding
from radixlm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from radixlm.layers.packed_linear import DECODE_ROWS, PackedWeight, decode_kernel_unsupported, prepack_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    decode_kernel_unsupported(CPU, torch.bfloat16) is not None,
    reason=f"no bf16 decode kernel here: {decode_kernel_unsupported(CPU, torch.bfloat16)}",
)


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def _block_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return cpu_kernels.ops().bf16_block_linear(x, cpu_kernels.pack_bf16_blocks(w), *w.shape, bias)


def test_blocks_hold_each_column_pair_where_the_kernel_reads_it() -> None:
    w = torch.arange(70 * 9, dtype=torch.float32).view(70, 9).to(torch.bfloat16)  # exact in bf16
    blocks = cpu_kernels.pack_bf16_blocks(w)
    assert blocks.shape == (3, 5, 32, 2) and blocks.dtype == torch.bfloat16
    for n, k in ((0, 0), (31, 8), (32, 1), (69, 7), (40, 4)):
        assert blocks[n // 32, k // 2, n % 32, k % 2] == w[n, k]
    assert not blocks[2, :, 6:].any() and not blocks[:, 4, :, 1].any()  # zeros past N = 70 and K = 9


# Column counts around the 32-column blocks and their 16-column halves (masked tails), odd K; row counts
# over the kernel's row tiles (up to 12 rows a pass, split evenly) and up to DECODE_ROWS.
@pytest.mark.parametrize("n, k", [(1, 1), (5, 31), (16, 2), (33, 64), (17, 101), (70, 896), (96, 130)])
@pytest.mark.parametrize("m", [1, 2, 3, 11, 12, 13, 25, DECODE_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_block_linear_matches_a_float64_reference(n: int, k: int, m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(1000 * n + k + m)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    y = _block_linear(x, w, b)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = _reference(x, w, b)
    # bf16 x bf16 products are exact in float32; the float32 sums round (a few ulps of the row's magnitude),
    # then the result rounds to bf16 (half an ulp: 2^-8 relative).
    magnitude = x.double().abs() @ w.double().abs().t()
    bound = 2.0**-8 * ref.abs() + 1e-5 * magnitude + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), (
        f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    )


def test_each_row_gets_the_same_bits_at_any_batch_size() -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(300, 896, generator=g).to(torch.bfloat16)
    x = torch.randn(40, 896, generator=g).to(torch.bfloat16)
    blocks = cpu_kernels.pack_bf16_blocks(w)
    ops = cpu_kernels.ops()
    alone = torch.cat(
        [ops.bf16_block_linear(x[i : i + 1].contiguous(), blocks, 300, 896, None) for i in range(40)]
    )
    for m in (2, 5, 12, 13, 24, 25, 40):
        assert torch.equal(ops.bf16_block_linear(x[:m].contiguous(), blocks, 300, 896, None), alone[:m]), m
        assert torch.equal(
            ops.bf16_block_linear(x[40 - m :].contiguous(), blocks, 300, 896, None), alone[40 - m :]
        ), m


def test_block_linear_refuses_what_it_cannot_read() -> None:
    ops = cpu_kernels.ops()
    blocks = cpu_kernels.pack_bf16_blocks(torch.randn(8, 16).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="bf16 activations"):
        ops.bf16_block_linear(torch.randn(2, 16), blocks, 8, 16, None)
    with pytest.raises(RuntimeError, match="weight blocks must be contiguous bf16"):
        ops.bf16_block_linear(torch.randn(2, 16).to(torch.bfloat16), blocks.float(), 8, 16, None)
    with pytest.raises(RuntimeError, match=r"expected \[M, 16\]"):
        ops.bf16_block_linear(torch.randn(2, 15).to(torch.bfloat16), blocks, 8, 16, None)
    with pytest.raises(RuntimeError, match="do not hold N = 40, K = 16"):
        ops.bf16_block_linear(torch.randn(2, 16).to(torch.bfloat16), blocks, 40, 16, None)
    with pytest.raises(RuntimeError, match="do not hold N = 8, K = 12"):
        ops.bf16_block_linear(torch.randn(2, 12).to(torch.bfloat16), blocks, 8, 12, None)
    with pytest.raises(RuntimeError, match="bias has 3 elements"):
        ops.bf16_block_linear(torch.randn(2, 16).to(torch.bfloat16), blocks, 8, 16, torch.zeros(3))


def test_packed_weight_takes_the_decode_kernel_up_to_decode_rows_and_onednn_above() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    both = PackedWeight(w, decode=True)
    packed_only = PackedWeight(w)
    assert both.kernels() == "decode kernel + packed" and packed_only.kernels() == "packed"
    assert both.packed_bytes == 2 * packed_only.packed_bytes  # the block copy beside oneDNN's
    for m in (1, 3, DECODE_ROWS, DECODE_ROWS + 1, 100):
        x = torch.randn(m, 64, generator=g).to(torch.bfloat16)
        expected = _block_linear(x, w, b) if m <= DECODE_ROWS else packed_only(x, b)
        assert torch.equal(both(x, b), expected), m
    dense = PackedWeight(
        w, pack=False, plain=w, decode=True
    )  # a shape left dense: F.linear above DECODE_ROWS
    x = torch.randn(DECODE_ROWS + 6, 64, generator=g).to(torch.bfloat16)
    assert dense.packed is None and torch.equal(dense(x, b), torch.nn.functional.linear(x, w, b))
    with pytest.raises(ValueError, match="bf16 or float32 weight"):
        PackedWeight(w.half(), pack=False, plain=w.half(), decode=True)


class _Tiny(nn.Module):
    """Our linears, a Transformers-style nn.Linear and a head tied to the embedding, in bf16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = VocabParallelEmbedding(50, 16)
        self.lm_head = self.embed
        self.up = MergedColumnParallelLinear(16, [32, 32])
        self.down = RowParallelLinear(64, 16)
        self.hf_linear = nn.Linear(16, 16, bias=True)
        for p in self.parameters():
            p.data.normal_()
        self.to(torch.bfloat16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.hf_linear(h + self.down(self.up(h)))
        return self.lm_head.compute_logits(h)


def _force_packed(monkeypatch) -> None:
    """auto, with every shape measured as packed (the timing itself is not what these tests check)."""
    choice = packed_linear.ShapeChoice(True, (1.0,), (0.5,), "measured")
    monkeypatch.setattr(packed_linear, "measure_shape", lambda weight, bias: choice)


def test_auto_makes_block_copies_that_fit_and_logits_follow_the_kernels(monkeypatch) -> None:
    _force_packed(monkeypatch)
    model = _Tiny()
    one, many = torch.tensor([3]), torch.arange(DECODE_ROWS + 2) % 50
    weights = {n: m.weight.detach().clone() for n, m in (("up", model.up), ("down", model.down))}
    report = prepack_linears(model, "auto", CPU, torch.bfloat16, None, free_bytes=1 << 30)
    assert report.packed_modules == 4 and report.decode_modules == 4, report.summary()
    assert (
        f"block decode kernel at <= {DECODE_ROWS} rows on 4 linears (block copies: 0 MiB)" in report.summary()
    )
    assert model.up.weight is None  # packed and in blocks: the plain weight is read by nothing
    assert model.up.packed.kernels() == "decode kernel + packed"
    h = model.embed(one)
    assert torch.equal(model.up(h), _block_linear(h, weights["up"]))
    assert model(one).shape == (1, 50) and model(many).shape == (DECODE_ROWS + 2, 50)


def test_auto_makes_no_block_copy_beyond_the_budget(monkeypatch) -> None:
    _force_packed(monkeypatch)
    model = _Tiny()
    report = prepack_linears(model, "auto", CPU, torch.bfloat16, None, free_bytes=0)
    assert "no block copies" in report.summary() and report.decode_modules == 0
    assert model.up.weight is None and model.up.packed.kernels() == "packed"  # the dense copy is gone
    assert model.embed.packed.kernels() == "packed" and model.embed.weight is not None  # lookups read it


def test_dense_and_forced_packed_never_take_the_decode_kernel() -> None:
    for kernel in ("dense", "packed"):
        model = _Tiny()
        report = prepack_linears(model, kernel, CPU, torch.bfloat16, None, free_bytes=1 << 30)
        assert report.decode_modules == 0
        assert model.up.packed is None or model.up.packed.kernels() == "packed"
