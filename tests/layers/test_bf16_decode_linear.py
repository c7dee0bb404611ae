"""The bf16 decode linear (radixlm_cpu::bf16_linear in layers/cpu_kernels.cpp) against a float64 reference
on the same bf16 inputs, its batch invariance, its refusals, and how packed_linear routes a bf16 linear to
it (up to DECODE_ROWS rows) or to oneDNN (above), with the plain copies bounded by the free memory."""

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


# Column counts around the kernel's steps (64 per loop turn, then 32-column masked tails); row counts over
# its activation tiles (4 at a time, up to 8 per weight pass) and beyond.
@pytest.mark.parametrize(
    "n, k", [(1, 1), (5, 31), (7, 32), (9, 63), (33, 64), (17, 100), (3, 129), (70, 896)]
)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 17])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_linear_matches_a_float64_reference(n: int, k: int, m: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(1000 * n + k + m)
    w = torch.randn(n, k, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    y = cpu_kernels.ops().bf16_linear(x, w, b)
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
    x = torch.randn(8, 896, generator=g).to(torch.bfloat16)
    ops = cpu_kernels.ops()
    alone = torch.cat([ops.bf16_linear(x[i : i + 1].contiguous(), w, None) for i in range(8)])
    for m in range(1, 9):
        assert torch.equal(ops.bf16_linear(x[:m].contiguous(), w, None), alone[:m])


def test_bf16_linear_refuses_what_it_cannot_read() -> None:
    ops = cpu_kernels.ops()
    w = torch.randn(8, 16).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bf16 activations and weight"):
        ops.bf16_linear(torch.randn(2, 16), w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.bf16_linear(
            torch.randn(2, 16).to(torch.bfloat16), torch.randn(16, 8).to(torch.bfloat16).t(), None
        )
    with pytest.raises(RuntimeError, match=r"expected \[M, 16\]"):
        ops.bf16_linear(torch.randn(2, 15).to(torch.bfloat16), w, None)


def test_packed_weight_takes_the_decode_kernel_up_to_decode_rows_and_onednn_above() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    both = PackedWeight(w, plain=w)
    packed_only = PackedWeight(w)
    assert both.kernels() == "decode kernel + packed" and packed_only.kernels() == "packed"
    for m in (1, DECODE_ROWS, DECODE_ROWS + 1, 40):
        x = torch.randn(m, 64, generator=g).to(torch.bfloat16)
        expected = cpu_kernels.ops().bf16_linear(x, w, b) if m <= DECODE_ROWS else packed_only(x, b)
        assert torch.equal(both(x, b), expected), m
    dense = PackedWeight(w, pack=False, plain=w)  # a shape left dense: F.linear above DECODE_ROWS
    x = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    assert dense.packed is None and torch.equal(dense(x, b), torch.nn.functional.linear(x, w, b))


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


def test_auto_keeps_plain_copies_that_fit_and_logits_follow_the_kernels(monkeypatch) -> None:
    _force_packed(monkeypatch)
    model = _Tiny()
    one, four = torch.tensor([3]), torch.tensor([1, 5, 7, 49])
    weights = {n: m.weight.detach().clone() for n, m in (("up", model.up), ("down", model.down))}
    report = prepack_linears(model, "auto", CPU, torch.bfloat16, None, free_bytes=1 << 30)
    assert report.packed_modules == 4 and report.decode_modules == 4, report.summary()
    assert "bf16 decode kernel at <= 3 rows on 4 linears" in report.summary()
    assert torch.equal(model.up.weight, weights["up"])  # kept: the decode kernel reads it
    assert model.up.packed.kernels() == "decode kernel + packed"
    h = model.embed(one)
    ops = cpu_kernels.ops()
    assert torch.equal(model.up(h), ops.bf16_linear(h, weights["up"], None))
    assert model(one).shape == (1, 50) and model(four).shape == (4, 50)


def test_auto_keeps_no_plain_copy_beyond_the_budget_but_still_decodes_what_costs_nothing(monkeypatch) -> None:
    _force_packed(monkeypatch)
    model = _Tiny()
    report = prepack_linears(model, "auto", CPU, torch.bfloat16, None, free_bytes=0)
    assert "keep no plain copy" in report.summary()
    assert model.up.weight is None and model.up.packed.kernels() == "packed"  # the dense copy is gone
    # the tied head's weight is the embedding's, kept anyway: it decodes at no cost
    assert model.embed.packed.kernels() == "decode kernel + packed" and report.decode_modules == 1


def test_dense_and_forced_packed_never_take_the_decode_kernel() -> None:
    for kernel in ("dense", "packed"):
        model = _Tiny()
        report = prepack_linears(model, kernel, CPU, torch.bfloat16, None, free_bytes=1 << 30)
        assert report.decode_modules == 0
        assert model.up.packed is None or model.up.packed.kernels() == "packed"
