"""GPTQ checkpoints beyond 4-bit in input order, written here in the format's documented layout (qweight
packed along the input axis, qzeros along the output axis with v1 zero points, fp16 scales, g_idx):

- 8-bit symmetric per channel (group_size -1): repacked into the int8 kernel with the checkpoint's codes;
- 8-bit with groups: dequantized at load, and the log says why;
- 4-bit act-order (desc_act: a permuted g_idx): the columns sorted by group repacked into the int4 kernel,
  the input gathered in that order (pieces of a fused q/k/v or gate/up must share it, else they stay
  dense);

each greedy token-identical to transformers on the float checkpoint holding the matrix the checkpoint
stands for (float32). The reference dequantization here is written independently of radixlm's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.model.quantization.int4 import Int4Weight
from radixlm.model.quantization.int8 import Int8Weight
from radixlm.model.quantization.repack import PermutedInput
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy, random_prompts
from tests.quant_checkpoints import write_quantized_pair


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] values -> int32 [n * bits / 32, m]: 32 / bits consecutive rows per int32, low bits first."""
    per = 32 // bits
    n, m = values.shape
    v = values.to(torch.int64).view(n // per, per, m)
    packed = sum(v[:, j] << (bits * j) for j in range(per))
    return (packed - (packed >> 31 << 32)).to(torch.int32).contiguous()


def _quantize(w: torch.Tensor, bits: int, group: int, g_idx: torch.Tensor | None):
    """GPTQ tensors for w [out, in] and the dequantized weight, computed from (q, z, s) directly."""
    out_f, in_f = w.shape
    g = in_f if group == -1 else group
    if g_idx is None:
        g_idx = torch.arange(in_f) // g
    top = 2**bits - 1
    wt = w.T  # [in, out]: GPTQ's layout
    s = torch.stack([wt[g_idx == k].abs().amax(dim=0) for k in range(in_f // g)]) / (top / 2)
    s = s.half().float()
    z = torch.full_like(s, 2 ** (bits - 1))  # symmetric: the middle code
    q = torch.round(wt / s[g_idx] + z[g_idx]).clamp(0, top)
    deq = ((q - z[g_idx]) * s[g_idx]).T.contiguous()
    tensors = {
        "qweight": _pack(q, bits),
        "qzeros": _pack((z - 1).T, bits).T.contiguous(),  # v1: stored minus one
        "scales": s.half(),
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, deq


# Linears that read the same input: GPTQ's act-order comes from that input's Hessian, so they share it.
_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


def _write(tmp: Path, bits: int, group: int, act_order: str | None) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(11)
    orders: dict[str, torch.Tensor] = {}

    def quantize(stem: str, w: torch.Tensor):
        g_idx = None
        if act_order:  # each input column's group: a random balanced assignment, as desc_act gives
            leaf = stem.rsplit(".", 1)[-1]
            key = stem if act_order == "own" else stem.rsplit(".", 2)[0] + _INPUT.get(leaf, leaf)
            if key not in orders:
                orders[key] = torch.randperm(w.shape[1], generator=gen) // group
            g_idx = orders[key]
        return _quantize(w, bits, group, g_idx)

    config = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": bool(act_order), "sym": True}
    return write_quantized_pair(tmp, "gptq", quantize, config)


CASES = {
    "8bit-channel": (8, -1, None, "int8"),
    "8bit-g32": (8, 32, None, "8-bit groups or zero points"),
    "4bit-act-order": (4, 32, "shared", "int4 permuted"),  # q/k/v and gate/up share their input's order
    "4bit-act-order-own": (4, 32, "own", "fused pieces dense"),  # every linear its own order
}
SLOW = ("8bit-g32", "4bit-act-order-own")


# 8-bit groups take the same dense path as act-order: behind the slow marker, to keep CI short.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_gptq_8bit_and_act_order_match_transformers_on_the_dequantized_weights(tmp_path, case) -> None:
    bits, group, act_order, expect = CASES[case]
    q_dir, ref_dir = _write(tmp_path, bits, group, act_order)
    core = EngineCore(
        EngineConfig(model_path=str(q_dir), dtype="float32", inline_core=True, linear_kernel="dense")
    )
    assert core.model_info().quantization == "gptq"
    summary = core.runner.quant_report.summary()
    packed = [m.quant for m in core.runner.model.modules() if getattr(m, "quant", None) is not None]
    n_layers = core.runner.text_config.num_hidden_layers
    if expect == "int8":
        assert len(packed) == 4 * n_layers, summary
        assert all(isinstance(q, Int8Weight) for q in packed), summary
    elif expect == "int4 permuted":  # every linear on the int4 kernel, its input gathered in act order
        assert len(packed) == 4 * n_layers, summary
        assert all(isinstance(q, PermutedInput) and isinstance(q.inner, Int4Weight) for q in packed)
        ref = load_file(str(ref_dir / "model.safetensors"))
        for name, mod in core.runner.model.named_modules():
            if name.endswith(("o_proj", "down_proj")):  # unfused: one checkpoint weight each
                torch.testing.assert_close(mod.quant.dequantize(), ref[name + ".weight"], rtol=0, atol=1e-5)
    elif expect == "fused pieces dense":  # o_proj / down_proj repacked, fused q/k/v and gate/up not
        assert len(packed) == 2 * n_layers and all(isinstance(q, PermutedInput) for q in packed), summary
    else:
        assert not packed and expect in summary and "dequantized at load" in summary, summary
    prompts = random_prompts(core.runner.vocab_size, [4, 21], seed=2)
    ours = drive_core(core, prompts, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})["ids"]
    for prompt, got in zip(prompts, ours):
        ref_ids, margins = hf_greedy(ref_dir, prompt, 10)
        assert_greedy_match(got, ref_ids, margins, case)
