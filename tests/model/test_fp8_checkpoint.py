"""FP8 checkpoints (quant_method "fp8", `weight_scale_inv`), written here from the tiny random Qwen2:
per-block (weight_block_size) and per-tensor scales. Each loads and runs under both implementations with
the same greedy tokens as the float checkpoint holding the same dequantized weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.testing import cached_model_folder
from tests.parity_utils import drive_core, random_prompts

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E4M3_MAX = 448.0


def _quantize(w: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, scale_inv) with W ~= fp8 * scale_inv, each block's max at the e4m3 maximum."""
    if block is None:
        scale_inv = w.abs().max().clamp(min=1e-12) / E4M3_MAX
        return (w / scale_inv).to(torch.float8_e4m3fn), scale_inv.reshape(1)
    b0, b1 = block
    out_f, in_f = w.shape
    tiles = w.reshape(out_f // b0, b0, in_f // b1, b1)
    scale_inv = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX  # [out/b0, in/b1]
    q = (tiles / scale_inv[:, None, :, None]).reshape(out_f, in_f).to(torch.float8_e4m3fn)
    return q, scale_inv


def _reference(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int] | None) -> torch.Tensor:
    """The dequantized weight, computed independently of radixlm (a Kronecker expansion of the scales)."""
    if block is None:
        return q.float() * scale_inv.item()
    return q.float() * torch.kron(scale_inv, torch.ones(*block))


def _write(tmp: Path, block: list[int] | None) -> tuple[Path, Path]:
    src = cached_model_folder("qwen2", "tiny")
    fp8_dir, ref_dir = tmp / "fp8", tmp / "ref"
    for d in (fp8_dir, ref_dir):
        shutil.copytree(src, d)
    state = load_file(str(src / "model.safetensors"))
    fp8_state, ref_state = {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
            q, s = _quantize(t.float(), block)
            fp8_state[name], fp8_state[name[: -len("weight")] + "weight_scale_inv"] = q, s
            ref_state[name] = _reference(q, s, block)
        else:
            fp8_state[name] = ref_state[name] = t
    save_file(fp8_state, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref_state, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    if block is not None:
        cfg["quantization_config"]["weight_block_size"] = block
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    return fp8_dir, ref_dir


def _ids(path: Path, impl: str) -> tuple[list[list[int]], EngineCore]:
    core = EngineCore(EngineConfig(model_path=str(path), model_impl=impl, dtype="float32", inline_core=True))
    prompts = random_prompts(core.runner.vocab_size, [4, 13, 29], seed=8)
    ids = drive_core(core, prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})["ids"]
    return ids, core


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize("block", [[32, 32], None], ids=["block", "per-tensor"])
def test_fp8_checkpoint_matches_its_dequantized_float_checkpoint(tmp_path, impl, block) -> None:
    fp8_dir, ref_dir = _write(tmp_path, block)
    ours, core = _ids(fp8_dir, impl)
    assert core.model_info().quantization == "fp8"
    assert ours == _ids(ref_dir, impl)[0]


def test_fp8_refusals(tmp_path) -> None:
    fp8_dir, _ = _write(tmp_path, [32, 32])
    with pytest.raises(ModelLoadError, match=r"'int8' was asked for.*says 'fp8'"):
        EngineCore(EngineConfig(model_path=str(fp8_dir), inline_core=True, quantization="int8"))
    with pytest.raises(ModelLoadError, match="no quantization_config"):
        EngineCore(
            EngineConfig(model_path=str(cached_model_folder("qwen2")), inline_core=True, quantization="fp8")
        )
    cfg = json.loads((fp8_dir / "config.json").read_text())
    cfg["quantization_config"]["weight_block_size"] = [16, 16]  # the scales were written for 32 x 32
    (fp8_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"block scale shape .* in 16x16 blocks"):
        EngineCore(EngineConfig(model_path=str(fp8_dir), inline_core=True))
