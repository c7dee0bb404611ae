"""Prepacked CPU linears: same numbers as F.linear (to fp32 rounding), the choice per shape, its cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from radixlm.layers import packed_linear
from radixlm.layers.embedding import VocabParallelEmbedding
from radixlm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from radixlm.layers.packed_linear import DecisionCache, PackedWeight, packing_unsupported, prepack_linears

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    packing_unsupported(CPU, torch.float32) is not None, reason="no oneDNN linear in this torch build"
)


@pytest.mark.parametrize("tokens", [1, 7, 33, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_weight_matches_f_linear(tokens: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(tokens)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(tokens, 40, generator=g)
    torch.testing.assert_close(PackedWeight(w)(x, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_packed_weight_takes_any_leading_dims_and_strided_input() -> None:
    w = torch.randn(24, 16)
    x = torch.randn(3, 5, 32)[..., ::2]  # not contiguous
    out = PackedWeight(w)(x)
    assert out.shape == (3, 5, 24)
    torch.testing.assert_close(out, F.linear(x, w), rtol=1e-5, atol=1e-5)


class _Tiny(nn.Module):
    """Our linears, a torch nn.Linear (as the Transformers backend has) and a head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = VocabParallelEmbedding(50, 16)
        self.lm_head = self.embed
        self.up = MergedColumnParallelLinear(16, [32, 32])
        self.down = RowParallelLinear(64, 16)
        self.hf_linear = nn.Linear(16, 16, bias=True)
        self.other_embed = VocabParallelEmbedding(50, 16)  # not the head: never multiplies
        for p in self.parameters():
            p.data.normal_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.hf_linear(h + self.down(self.up(h)))
        return self.lm_head.compute_logits(h)


def test_forced_packed_gives_the_same_logits_and_drops_dense_copies() -> None:
    model = _Tiny()
    ids = torch.tensor([1, 5, 7, 49])
    ref = model(ids)
    up_weight = model.up.weight.clone()
    report = prepack_linears(model, "packed", CPU, torch.float32)
    assert report.packed_modules == 4 and report.dense_modules == 0, report.summary()
    assert model.up.packed is not None and model.up.weight is None  # the dense copy is gone
    assert model.down.weight is None and model.hf_linear.weight is None
    assert model.embed.weight is not None  # lookups still need it (and the tied head shares it)
    assert model.other_embed.packed is None
    torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(model.up.packed(torch.eye(16)), up_weight.t(), rtol=1e-6, atol=1e-6)


def test_dense_packs_nothing() -> None:
    model = _Tiny()
    report = prepack_linears(model, "dense", CPU, torch.float32)
    assert report.packed_modules == 0 and report.reason
    assert model.up.packed is None and model.up.weight is not None


def test_auto_measures_once_per_shape_then_reuses_the_decision_file(tmp_path, monkeypatch) -> None:
    calls = []
    real = packed_linear.measure_shape

    def counting(weight, bias):
        calls.append(tuple(weight.shape))
        return real(weight, bias)

    monkeypatch.setattr(packed_linear, "measure_shape", counting)
    path = tmp_path / "kernels.json"
    first = prepack_linears(_Tiny(), "auto", CPU, torch.float32, path)
    # four candidate modules; (16, 16) bias-free and with bias are different keys
    assert sorted(calls) == sorted([(50, 16), (64, 16), (16, 64), (16, 16)])
    saved = json.loads(path.read_text())
    assert len(saved) == 4 and all(isinstance(e["packed"], bool) for e in saved.values())
    calls.clear()
    second = prepack_linears(_Tiny(), "auto", CPU, torch.float32, path)
    assert calls == []  # every decision came from the file
    assert {k: c.packed for k, c in second.choices.items()} == {k: c.packed for k, c in first.choices.items()}
    assert all(c.source == "cached" for c in second.choices.values())


def test_a_decision_file_forces_the_choice(tmp_path) -> None:
    model = _Tiny()
    key = DecisionCache.key(model.up.weight, has_bias=False)
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({key: {"packed": True}}))
    prepack_linears(model, "auto", CPU, torch.float32, path)
    assert model.up.packed is not None
    model = _Tiny()
    path.write_text(json.dumps({key: {"packed": False}}))
    prepack_linears(model, "auto", CPU, torch.float32, path)
    assert model.up.packed is None and model.up.weight is not None


def test_a_corrupt_decision_file_is_measured_over(tmp_path, caplog) -> None:
    path = tmp_path / "kernels.json"
    path.write_text("{not json")
    # at_level: an Engine built by an earlier test may have set radixlm's log level above warnings.
    with caplog.at_level(logging.WARNING, logger="radixlm.layers.packed_linear"):
        report = prepack_linears(_Tiny(), "auto", CPU, torch.float32, path)
    assert "ignoring the linear-kernel decisions" in caplog.text
    assert all(c.source == "measured" for c in report.choices.values())
    assert len(json.loads(path.read_text())) == 4


def test_where_packing_cannot_run() -> None:
    meta = torch.device("meta")
    assert "CPU kernel" in packing_unsupported(meta, torch.float32)
    assert "float16" in packing_unsupported(CPU, torch.float16)
    report = prepack_linears(_Tiny(), "auto", meta, torch.float32)
    assert report.packed_modules == 0 and "CPU kernel" in report.summary()
    with pytest.raises(ValueError, match="linear_kernel packed"):
        prepack_linears(_Tiny(), "packed", meta, torch.float32)
    with pytest.raises(ValueError, match="linear_kernel must be one of"):
        prepack_linears(_Tiny(), "fast", CPU, torch.float32)
