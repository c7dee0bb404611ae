"""4-bit GPTQ checkpoints written here in the format's documented layout (qweight / qzeros / scales /
g_idx, v1 zero points), symmetric and not: the linears are repacked as int4 holding exactly the matrix the
checkpoint stands for, and greedy tokens equal those of the float checkpoint holding that matrix (both
implementations). The reference dequantization below is written independently of radixlm's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.model.quantization.int4 import Int4Weight
from tests.parity_utils import drive_core, random_prompts
from tests.quant_checkpoints import write_quantized_pair

GROUP = 32


def _pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """[n, m] values 0..15 -> int32 [n / 8, m]: eight consecutive rows per int32, low bits first."""
    n, m = codes.shape
    c = codes.to(torch.int64).view(n // 8, 8, m)
    packed = sum(c[:, j] << (4 * j) for j in range(8))
    return (packed - (packed >> 31 << 32)).to(torch.int32).contiguous()  # two's complement into int32


def _quantize(w: torch.Tensor, sym: bool, g: torch.Generator):
    """GPTQ-format tensors for w [out, in], and the dequantized weight they stand for."""
    out_f, in_f = w.shape
    groups = w.T.reshape(in_f // GROUP, GROUP, out_f)  # [G, GROUP, out]: GPTQ works in input order
    if sym:
        s = groups.abs().amax(dim=1) / 7.5
        z = torch.full_like(s, 8).to(torch.int64)
    else:
        lo, hi = groups.amin(dim=1), groups.amax(dim=1)
        s = (hi - lo) / 15
        z = torch.round(-lo / s).clamp(0, 15).to(torch.int64)
    s = s.half().float()  # the checkpoint stores fp16 scales
    q = torch.round(groups / s[:, None] + z[:, None]).clamp(0, 15).to(torch.int64)  # [G, GROUP, out]
    deq = ((q - z[:, None]) * s[:, None]).reshape(in_f, out_f).T.contiguous()
    tensors = {
        "qweight": _pack_rows(q.reshape(in_f, out_f)),
        "qzeros": _pack_rows((z - 1).T).T.contiguous(),  # v1: stored minus one, packed along out
        "scales": s.half(),
        "g_idx": torch.arange(in_f, dtype=torch.int32) // GROUP,
    }
    return tensors, deq


def _write(tmp: Path, sym: bool) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(3)
    config = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": sym}
    return write_quantized_pair(tmp, "gptq", lambda _stem, w: _quantize(w, sym, g), config)


def _core(path: Path, impl: str) -> EngineCore:
    cfg = EngineConfig(
        model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, linear_kernel="dense"
    )
    return EngineCore(cfg)


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_gptq_repacks_exactly_and_matches_the_dequantized_checkpoint(tmp_path, impl, sym) -> None:
    q_dir, ref_dir = _write(tmp_path, sym)
    core, ref = _core(q_dir, impl), _core(ref_dir, impl)
    assert core.model_info().quantization == "gptq"
    dense = dict(ref.runner.model.named_modules())
    packed = [(n, m) for n, m in core.runner.model.named_modules() if getattr(m, "quant", None) is not None]
    n_layers = core.runner.text_config.num_hidden_layers
    assert len(packed) == n_layers * (4 if impl == "native" else 7)  # every linear; the head stays float
    for name, mod in packed:
        assert isinstance(mod.quant, Int4Weight) and mod.quant.group_size == GROUP
        torch.testing.assert_close(mod.quant.dequantize(), dense[name].weight, rtol=0, atol=1e-5)
    prompts = random_prompts(core.runner.vocab_size, [4, 13, 29], seed=9)
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    assert drive_core(core, prompts, params)["ids"] == drive_core(ref, prompts, params)["ids"]


def test_gptq_refusals(tmp_path) -> None:
    q_dir, _ = _write(tmp_path, True)
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (q_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"gptq: bits=3 is not supported \(supported: 4, 8\)"):
        EngineCore(EngineConfig(model_path=str(q_dir), inline_core=True))
    # 8-bit and act-order (desc_act) checkpoints load: tests/model/test_gptq_8bit_actorder.py.
