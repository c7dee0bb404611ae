"""A quantized checkpoint and its dequantized float twin, written side by side from the tiny qwen2 folder:
the GPTQ, AWQ and act-order tests differ only in how one linear's weight is packed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from radixlm.testing import cached_model_folder

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (module name, float weight) -> (the checkpoint tensors that replace the weight, by suffix; its dequantization)
Quantize = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def write_quantized_pair(
    tmp: Path, name: str, quantize: Quantize, quantization_config: dict[str, Any]
) -> tuple[Path, Path]:
    """tmp/name: every decoder linear's weight replaced by quantize()'s tensors, with quantization_config in
    config.json; tmp/ref: the same model with those weights dequantized (the float oracle). Linears are
    visited in checkpoint order, so a seeded quantize() gives the same tensors every run."""
    src = cached_model_folder("qwen2", "tiny")
    q_dir, ref_dir = tmp / name, tmp / "ref"
    for d in (q_dir, ref_dir):
        shutil.copytree(src, d)
    q_state, ref_state = {}, {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        stem, _, kind = key.rpartition(".")
        if kind == "weight" and stem.rsplit(".", 1)[-1] in LINEARS:
            tensors, deq = quantize(stem, t.float())
            q_state.update({f"{stem}.{k}": v.contiguous() for k, v in tensors.items()})
            ref_state[key] = deq
        else:
            q_state[key] = ref_state[key] = t
    save_file(q_state, str(q_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(ref_state, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((q_dir / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (q_dir / "config.json").write_text(json.dumps(cfg))
    return q_dir, ref_dir
