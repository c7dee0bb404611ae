"""Weight-only int8 / int4: each kernel against its dequantized float reference, the method choice against
the checkpoint's quantization_config, and whole models under both implementations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.model.quantization import METHODS, quantize_model, resolve_method
from radixlm.model.quantization.int4 import Int4Weight
from radixlm.model.quantization.int8 import Int8Weight
from radixlm.testing import cached_model_folder
from tests.parity_utils import drive_core, random_prompts

SHAPES = [(96, 64), (256, 576), (48, 128)]  # 576 = 9 x 64: int4 falls back to 64-wide groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_int8_kernel_matches_its_dequantized_reference(out_f, in_f, tokens, dtype) -> None:
    g = torch.Generator().manual_seed(out_f + in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype)
    q = Int8Weight(w)
    ref = x.float() @ q.dequantize().T + bias.float()
    got = q(x, bias).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # ... and the reference is close to the float weight it came from: half a step per element (a whole
    # step with bf16 scales, whose own rounding is up to 127 * 2^-9 of a step at the largest code).
    err = (q.dequantize() - w.float()).abs()
    steps = 0.5 if dtype == torch.float32 else 1.0
    assert (err <= q.scales.float()[:, None] * steps + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_int4_kernel_matches_its_dequantized_reference(out_f, in_f, tokens, dtype) -> None:
    g = torch.Generator().manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    q = METHODS["int4"]().quantize(w)
    assert isinstance(q, Int4Weight) and q.group_size == (
        64 if in_f == 576 else 128 if in_f % 128 == 0 else 64
    )
    deq = q.dequantize()
    ref = x.float() @ deq.T
    got = q(x).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * ref.abs().max().item())
    # Within half a quantization step of the float weight, group by group.
    step = w.float().view(out_f, -1, q.group_size).aminmax(dim=-1)
    width = (step.max - step.min).repeat_interleave(q.group_size, dim=1) / 15
    steps = 0.5 if dtype == torch.float32 else 1.0  # bf16 scales and zeros round too
    assert ((deq - w.float()).abs() <= width * steps + 1e-5).all()


def test_quantized_weights_are_smaller() -> None:
    w = torch.randn(512, 512)
    assert Int8Weight(w).nbytes < w.numel() * 4 / 3.5
    assert METHODS["int4"]().quantize(w).nbytes < w.numel() * 4 / 6


class _Cfg:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


def test_method_choice_and_refusals() -> None:
    assert resolve_method(None, _Cfg()) == "none"
    assert resolve_method("int4", _Cfg()) == "int4"
    with pytest.raises(
        ModelLoadError,
        match=r"'bitsandbytes'.*not supported yet.*supported --quantization methods: none, int8, int4, gguf, "
        r"fp8, gptq, awq, compressed-tensors",
    ):
        resolve_method(None, _Cfg({"quant_method": "bitsandbytes", "load_in_4bit": True}))
    assert resolve_method(None, _Cfg({"quant_method": "gptq", "bits": 4})) == "gptq"
    assert resolve_method(None, _Cfg({"quant_method": "awq", "bits": 4})) == "awq"
    assert resolve_method(None, _Cfg({"quant_method": "compressed-tensors"})) == "compressed-tensors"
    with pytest.raises(ModelLoadError, match=r"'int8' was asked for.*says 'fp8'"):
        resolve_method("int8", _Cfg({"quant_method": "fp8"}))
    with pytest.raises(
        ValueError,
        match="quantization must be one of none, int8, int4, gguf, fp8, gptq, awq, compressed-tensors, "
        "got 'bitsandbytes'",
    ):
        EngineConfig(quantization="bitsandbytes")
    with pytest.raises(ModelLoadError, match="'gguf' repacks a GGUF file's 4-bit blocks.*safetensors"):
        resolve_method("gguf", _Cfg(), "safetensors")
    assert resolve_method("gguf", _Cfg(), "gguf") == "gguf"


def test_quantize_model_replaces_nn_linear_and_keeps_the_math() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32, bias=False))
    x = torch.randn(3, 128)
    report = quantize_model(model, "int8")
    assert report.quantized == 2 and type(model[0]).__name__ == "QuantizedLinear"
    ref = torch.relu(x @ model[0].quant.dequantize().T + model[0].bias) @ model[2].quant.dequantize().T
    torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def _core(path, impl: str, quant: str | None) -> EngineCore:
    cfg = EngineConfig(
        model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, quantization=quant
    )
    return EngineCore(cfg)


class _DenseReference:
    """A quantized weight's dequantized float reference, multiplied by F.linear."""

    def __init__(self, q) -> None:
        self.weight, self.in_features, self.out_features = q.dequantize(), q.in_features, q.out_features

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, bias)


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_whole_model_quantized_equals_its_dequantized_reference(impl, method) -> None:
    """The quantized engine, then the same engine with every packing swapped for its dequantized float
    reference: the kernels are the only difference, so greedy tokens agree. Also: the weight bytes shrink,
    every linear and the LM head are quantized, and get_model_info says so."""
    src = cached_model_folder("qwen2", "tiny")
    core = _core(src, impl, method)
    info = core.model_info()
    dense_bytes = _core(src, impl, None).model_info().weight_bytes
    assert info.quantization == method and 0 < info.weight_bytes < dense_bytes
    quantized = [m for m in core.runner.model.modules() if getattr(m, "quant", None) is not None]
    n_layers = core.runner.text_config.num_hidden_layers
    # Per layer: q/k/v + o + gate/up + down (fused natively, four nn.Linear more in transformers), + head.
    assert len(quantized) == n_layers * (4 if impl == "native" else 7) + 1
    prompts = random_prompts(core.runner.vocab_size, [4, 11, 23], seed=5)
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    ours = drive_core(core, prompts, params)["ids"]
    for m in quantized:
        m.quant = _DenseReference(m.quant)
    core.flush_cache()
    assert drive_core(core, prompts, params)["ids"] == ours
