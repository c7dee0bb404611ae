"""Weight quantization: one file per method; this module picks the method and applies it to a model.

Which method runs (`resolve_method`): the one asked for (EngineConfig.quantization), checked against the
checkpoint's `quantization_config` (config.json). A checkpoint quantized by a method radixlm cannot run is
refused by name with the supported list, never loaded as if its weights were float; asking for a method
that disagrees with the checkpoint's is refused naming both.

Methods here quantize at load (`int8`, `int4`): every linear's float shard is loaded by the layer's own
weight_loader (so tensor parallelism and fused q/k/v / gate/up shards work unchanged), then
`quantize_model` packs it and drops the float copy. The LM head is quantized too (its matmul only; a tied
embedding keeps its float rows for lookups): at the 0.5B shape it is over a quarter of the weight bytes a
decode step reads. `gguf` does the same on a GGUF file's weights, but finds each Q4_0 / Q4_1 block's own
integers again instead of rounding anew (gguf.py).

Checkpoint formats (`fp8`, `gptq`, `awq`, `compressed-tensors`) come with a reader that the runner puts
between the checkpoint and the layers: it turns each format's group of tensors (weight + weight_scale_inv;
qweight + qzeros + scales + g_idx; weight_packed + weight_scale + ...) into the float weight the layers'
loaders expect. fp8 stops there (dense compute); the integer formats keep the codes and scales aside
(repack.py) and `quantize_model` packs each linear from them after load into the int4 / int8 kernels, or
leaves it dense where the kernels cannot take the format, saying why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from radixlm.config import QUANTIZATION_METHODS
from radixlm.messages import ModelLoadError
from radixlm.model.quantization import awq, fp8, gptq
from radixlm.model.quantization.base import QuantizedWeight, WeightOnlyMethod
from radixlm.model.quantization.compressed_tensors import CompressedTensorsReader
from radixlm.model.quantization.gguf import GGUFRepack
from radixlm.model.quantization.int4 import Int4WeightOnly
from radixlm.model.quantization.int8 import Int8WeightOnly
from radixlm.model.quantization.repack import RepackingReader, linear_parts, packed_weight

logger = logging.getLogger(__name__)

METHODS: dict[str, type[WeightOnlyMethod]] = {
    "int8": Int8WeightOnly,
    "int4": Int4WeightOnly,
    "gguf": GGUFRepack,
}


class _FP8Reader:
    def __init__(self, hf_config) -> None:
        self.hf_config = hf_config

    def __call__(self, weights):
        return fp8.dequantize_stream(weights, self.hf_config)


# Checkpoint formats read here: their tensors are turned into float weights as they stream in (the integer
# formats also keep their codes aside, for the repack after load).
CHECKPOINT_STREAMS = {
    "fp8": _FP8Reader,
    "gptq": gptq.GPTQReader,
    "awq": awq.AWQReader,
    "compressed-tensors": CompressedTensorsReader,
}
assert set(METHODS) | set(CHECKPOINT_STREAMS) | {"none"} == set(QUANTIZATION_METHODS), (
    "QUANTIZATION_METHODS drifted"
)
# Checkpoint formats users ask about, for the refusal's wording ("not supported yet" vs "unknown").
KNOWN_CHECKPOINT_METHODS = (
    "bitsandbytes",
    "hqq",
    "eetq",
    "torchao",
)


def checkpoint_method(hf_config) -> str | None:
    """The quant_method of the config's quantization_config, or None for a float checkpoint."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' enum
    return str(method).lower().replace("_", "-") if method else "unknown"


def resolve_method(asked: str | None, hf_config, checkpoint_format: str = "safetensors") -> str:
    """The method that runs: 'none', or a key of METHODS. Raises ModelLoadError naming what is wrong."""
    from_checkpoint = checkpoint_method(hf_config)
    supported = ", ".join(QUANTIZATION_METHODS)
    if asked == "gguf" and checkpoint_format != "gguf":
        raise ModelLoadError(
            f"quantization 'gguf' repacks a GGUF file's 4-bit blocks, but this checkpoint is "
            f"{checkpoint_format}; use int8 or int4 to quantize float weights at load"
        )
    if checkpoint_format == "gguf":
        return asked or "none"  # GGUF metadata has no quantization_config: the blocks are the format
    if from_checkpoint in CHECKPOINT_STREAMS and asked in (None, from_checkpoint):
        return from_checkpoint
    if asked in CHECKPOINT_STREAMS and from_checkpoint is None:
        raise ModelLoadError(
            f"quantization {asked!r} reads {asked} checkpoints, but this one has no quantization_config; "
            "use int8 or int4 to quantize float weights at load"
        )
    if from_checkpoint is not None:
        known = "not supported yet" if from_checkpoint in KNOWN_CHECKPOINT_METHODS else "unknown"
        if asked not in (None, from_checkpoint):
            raise ModelLoadError(
                f"quantization {asked!r} was asked for, but the checkpoint's quantization_config says "
                f"{from_checkpoint!r}; leave --quantization unset or pass the checkpoint's method"
            )
        raise ModelLoadError(
            f"the checkpoint is quantized with {from_checkpoint!r} (quantization_config in config.json), "
            f"which radixlm does not run ({known}); supported --quantization methods: {supported} "
            "(int8 / int4 quantize a float checkpoint at load)"
        )
    return asked or "none"


@dataclass
class QuantReport:
    method: str
    quantized: int = 0
    dense: dict[str, str] = field(default_factory=dict)  # module name -> why it stayed dense
    detail: str = ""

    def summary(self) -> str:
        if self.method == "none":
            return "quantization: none"
        kept = (
            f"; {len(self.dense)} kept dense ({next(iter(self.dense.values()))}, ...)" if self.dense else ""
        )
        detail = f" ({self.detail})" if self.detail else ""
        if self.method in CHECKPOINT_STREAMS and not self.quantized:
            return f"quantization {self.method}:{detail}"
        head = " (LM head included)" if self.method in METHODS else ""
        return f"quantization {self.method}: {self.quantized} linears{head}{detail}{kept}"


def _targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Our linears, torch's nn.Linear (the Transformers backend) and the LM head."""
    from radixlm.layers.linear import LinearBase

    head = getattr(model, "lm_head", None)
    found = []
    for name, mod in model.named_modules():
        if isinstance(mod, (LinearBase, nn.Linear)) or (mod is head and hasattr(mod, "compute_logits")):
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype.is_floating_point:
                found.append((name, mod))
    return found


def streams_checkpoint(method: str) -> bool:
    """Whether the method regroups the checkpoint's tensors as they stream by (and so holds them)."""
    return method in CHECKPOINT_STREAMS


def checkpoint_reader(method: str, hf_config, tp_size: int = 1):
    """A callable turning the checkpoint's tensor stream into what the layers load (a format's groups of
    tensors into float weights); the identity for float checkpoints."""
    reader = CHECKPOINT_STREAMS.get(method)
    if reader is None:
        return lambda weights: weights
    if isinstance(reader, type) and issubclass(reader, RepackingReader) and tp_size > 1:
        raise ModelLoadError(
            f"{method} checkpoints under tensor parallelism are not supported yet; use tp_size 1"
        )
    return reader(hf_config)


def load_dtype(method: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype weights are loaded in: the model's, except for `gguf`, which needs the dequantized blocks
    exactly (float32) to find their integers; the model is cast to its dtype after quantization."""
    return torch.float32 if method == "gguf" else dtype


def quantize_model(
    model: nn.Module, method: str, dtype: torch.dtype | None = None, reader: object = None
) -> QuantReport:
    """Replace every linear's float weight by the method's packing, for activations of `dtype`. Call after
    the weights loaded, on the model's device, before layers.packed_linear.prepack_linears (which skips
    quantized ones)."""
    report = QuantReport(method)
    if method == "none":
        return report
    if isinstance(reader, RepackingReader):
        return _repack(model, reader, dtype, report)
    if method in CHECKPOINT_STREAMS:
        report.detail = f"{method} checkpoint dequantized at load; dense matmuls in the model's dtype"
        return report
    impl = METHODS[method]()
    with torch.inference_mode():
        for name, mod in _targets(model):
            why = impl.unsupported(mod.weight)
            if why is not None:
                report.dense[name] = why
                continue
            qweight = impl.quantize(mod.weight, dtype)
            _install(model, name, mod, qweight)
            report.quantized += 1
    if isinstance(impl, GGUFRepack):
        report.detail = impl.describe()
    if report.quantized == 0:
        raise ModelLoadError(
            f"quantization {method}: no linear layer of this model can use it ({report.dense})"
        )
    return report


def _repack(
    model: nn.Module, reader: RepackingReader, dtype: torch.dtype | None, report: QuantReport
) -> QuantReport:
    """Every linear whose checkpoint pieces the kernels take: packed from their own codes and scales
    (repack.py); the rest stays dense (dequantized at load, and the reader says why)."""
    report.detail = reader.describe()
    if not reader.parts:  # e.g. an fp8 compressed-tensors checkpoint: dequantized, nothing to pack
        if not reader.dense_notes:
            raise ModelLoadError(f"{reader.method}: the checkpoint holds no quantized linear")
        return report
    with torch.inference_mode():
        for name, mod, parts in linear_parts(model, reader, _targets(model)):
            if parts is None:
                report.dense[name] = "not repacked (see above)"
                continue
            _install(model, name, mod, packed_weight(parts, dtype or mod.weight.dtype))
            report.quantized += 1
    if report.quantized == 0:
        raise ModelLoadError(
            f"{reader.method}: no linear of the model matched the checkpoint's quantized tensors"
        )
    return report


def _install(model: nn.Module, name: str, mod: nn.Module, qweight: QuantizedWeight) -> None:
    from radixlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from radixlm.layers.linear import QuantizedLinear

    if type(mod) is nn.Linear:  # the Transformers backend's: replaced by our module holding the packing
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = QuantizedLinear(qweight, mod.bias)
        # Hooks installed on the module (tensor parallelism's all-reduce of a row-parallel output) stay.
        new._forward_hooks.update(mod._forward_hooks)
        new._forward_pre_hooks.update(mod._forward_pre_hooks)
        setattr(parent, attr, new)
        return
    mod.quant = qweight
    # An embedding still looks its rows up in the float weight; an untied head (ParallelLMHead) never does.
    if not isinstance(mod, VocabParallelEmbedding) or type(mod) is ParallelLMHead:
        mod.weight = None


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the model's quantized weights (their parameters are counted elsewhere)."""
    return sum(q.nbytes for m in model.modules() if (q := getattr(m, "quant", None)) is not None)


__all__ = ["METHODS", "QuantReport", "QuantizedWeight", "quantize_model", "quantized_bytes", "resolve_method"]
