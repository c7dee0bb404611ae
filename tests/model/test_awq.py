"""AWQ checkpoints (AutoAWQ's 4-bit GEMM layout) packed here by the documented layout: qweight / qzeros
packed along the output axis in AWQ's column order [0, 2, 4, 6, 1, 3, 5, 7], fp16 scales, asymmetric zeros.

- the packing is read back by a dequantization written here, independently of radixlm, and by the
  compressed-tensors library's own AutoAWQ converter + decompressor (the two agree exactly);
- radixlm repacks every linear into the int4 kernel holding exactly that matrix;
- greedy tokens equal transformers' on the float checkpoint holding the dequantized weights (fp32).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.model.quantization.int4 import Int4Weight
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy, random_prompts
from tests.quant_checkpoints import write_quantized_pair

GROUP = 32
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] values 0..15 -> int32 [rows, cols / 8], AutoAWQ's pack loop: slot k of pack j holds
    column 8 * j + AWQ_ORDER[k]."""
    rows, cols = values.shape
    v = values.to(torch.int64).view(rows, cols // 8, 8)
    packed = sum(v[:, :, AWQ_ORDER[k]] << (4 * k) for k in range(8))
    return (packed - (packed >> 31 << 32)).to(torch.int32).contiguous()  # two's complement into int32


def unpack_awq_reference(packed: torch.Tensor) -> torch.Tensor:
    """The inverse, written as AutoAWQ's unpack_awq + reverse_awq_order do it (shift, then reorder)."""
    shifts = torch.arange(0, 32, 4)
    slots = (packed.to(torch.int64)[:, :, None] >> shifts[None, None, :]) & 0xF
    slots = slots.view(packed.shape[0], -1)
    reverse = torch.arange(slots.shape[1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    return slots[:, reverse]


def _quantize(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """AWQ tensors for w [out, in] (asymmetric min-max per group of GROUP inputs) and their dequantization."""
    out_f, in_f = w.shape
    groups = w.T.reshape(in_f // GROUP, GROUP, out_f)  # [G, GROUP, out]: AWQ works on [in, out]
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    s = ((hi - lo) / 15).half().float()  # fp16 scales in the checkpoint
    z = torch.round(-lo / s).clamp(0, 15)
    q = torch.round(groups / s[:, None] + z[:, None]).clamp(0, 15).reshape(in_f, out_f)
    tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": s.half()}
    # The reference reads the packed tensors back (not q / z), so a packing mistake would show.
    qr, zr = unpack_awq_reference(tensors["qweight"]).float(), unpack_awq_reference(tensors["qzeros"]).float()
    gi = torch.arange(in_f) // GROUP
    deq = ((qr - zr[gi]) * s[gi]).T.contiguous()
    return tensors, deq


def _write(tmp: Path) -> tuple[Path, Path, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    awq_parts, deq_by_stem = {}, {}

    def quantize(stem: str, w: torch.Tensor):
        tensors, deq = _quantize(w)
        awq_parts[stem], deq_by_stem[stem] = tensors, deq
        return tensors, deq

    config = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    q_dir, ref_dir = write_quantized_pair(tmp, "awq", quantize, config)
    return q_dir, ref_dir, awq_parts, deq_by_stem


def test_awq_packing_agrees_with_the_compressed_tensors_converter(tmp_path) -> None:
    converters = pytest.importorskip("compressed_tensors.entrypoints.convert.converters.autoawq")
    from compressed_tensors.compressors import BaseCompressor

    from radixlm.model.quantization.awq import AWQReader

    _, _, awq_parts, deq = _write(tmp_path)
    conv = converters.AutoAWQConverter(bits=4, group_size=GROUP, zero_point=True)
    scheme = conv._build_quant_config().config_groups["config_group_0"]
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    reader = AWQReader(
        SimpleNamespace(quantization_config={"quant_method": "awq", "bits": 4, "group_size": GROUP})
    )
    for stem, tensors in list(awq_parts.items())[:3]:
        ct_tensors = conv.process({f"{stem}.{k}": v for k, v in tensors.items()})
        local = {k.rpartition(".")[2]: v for k, v in ct_tensors.items()}
        theirs = compressor.decompress(local, scheme)["weight"].float()
        # The library multiplies in fp16 (the scales' dtype): equal up to that rounding, far below the
        # smallest step between codes (one scale), so every code is the same.
        step = tensors["scales"].float().min().item()
        assert (theirs - deq[stem]).abs().max().item() < min(1e-4, step / 4)
        ours = dict(reader((f"{stem}.{k}", v) for k, v in tensors.items()))[f"{stem}.weight"]
        torch.testing.assert_close(ours, deq[stem], rtol=0, atol=1e-6)  # radixlm's reader == both


def _core(path: Path, impl: str) -> EngineCore:
    cfg = EngineConfig(
        model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, linear_kernel="dense"
    )
    return EngineCore(cfg)


@pytest.mark.parametrize("impl", ["native", pytest.param("transformers", marks=pytest.mark.slow)])
def test_awq_repacks_exactly_and_matches_transformers_on_the_dequantized_weights(tmp_path, impl) -> None:
    q_dir, ref_dir, _, deq = _write(tmp_path)
    core = _core(q_dir, impl)
    assert core.model_info().quantization == "awq"
    packed = [(n, m) for n, m in core.runner.model.named_modules() if getattr(m, "quant", None) is not None]
    n_layers = core.runner.text_config.num_hidden_layers
    assert len(packed) == n_layers * (4 if impl == "native" else 7)  # every linear; the head stays float
    for _, mod in packed:
        assert isinstance(mod.quant, Int4Weight) and mod.quant.group_size == GROUP
    if impl == "transformers":  # unfused: each linear is one checkpoint module
        for name, mod in packed:
            torch.testing.assert_close(
                mod.quant.dequantize(), deq[name.removeprefix("hf.")], rtol=0, atol=1e-5
            )
    prompts = random_prompts(core.runner.vocab_size, [4, 13, 29], seed=9)
    ours = drive_core(core, prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})["ids"]
    for prompt, got in zip(prompts, ours):
        ref_ids, margins = hf_greedy(ref_dir, prompt, 12)
        assert_greedy_match(got, ref_ids, margins, f"awq {impl}")


def test_awq_refusals(tmp_path) -> None:
    q_dir, _, _, _ = _write(tmp_path)
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"]["version"] = "gemv"
    (q_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"awq: version 'gemv' is not supported \(supported: gemm"):
        _core(q_dir, "native")
    cfg["quantization_config"].update(version="gemm", bits=3)
    (q_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="awq: bits=3 is not supported"):
        _core(q_dir, "native")
