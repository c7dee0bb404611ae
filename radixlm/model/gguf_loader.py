"""GGUF checkpoints: find the file, read its config, and stream its tensors under Hugging Face names.

A GGUF file (llama.cpp's format) holds the config, the tokenizer and the chat template as metadata, and the
weights in llama.cpp's names and block-quantized types. transformers reads the metadata (`gguf_file=` in
AutoConfig / AutoTokenizer), so config and tokenizer come from there (once per file: radixlm.gguf_metadata
keeps what it derived as a folder); the weights are read here with the
`gguf` library, dequantized one tensor at a time (peak memory: the model plus one float tensor), renamed to
the names a Hugging Face checkpoint of the same model uses, and handed to either implementation's
`load_weights` exactly as safetensors tensors are.

Name map (one block shown; `{i}` is the layer):

    token_embd.weight          model.embed_tokens.weight
    output_norm.weight         model.norm.weight
    output.weight              lm_head.weight               (absent when the embeddings are tied)
    blk.{i}.attn_norm          model.layers.{i}.input_layernorm
    blk.{i}.ffn_norm           model.layers.{i}.post_attention_layernorm
    blk.{i}.attn_q|k|v         model.layers.{i}.self_attn.q_proj|k_proj|v_proj      (+ .bias for Qwen2)
    blk.{i}.attn_output        model.layers.{i}.self_attn.o_proj
    blk.{i}.attn_q_norm|k_norm model.layers.{i}.self_attn.q_norm|k_norm              (Qwen3)
    blk.{i}.ffn_gate|up|down   model.layers.{i}.mlp.gate_proj|up_proj|down_proj

llama.cpp's converter reorders the rows of a Llama q/k projection (within each head, the two rotary
halves are interleaved, for its rotate-pairs RoPE); `_unpermute_rows` puts them back in Hugging Face order.
Qwen2 / Qwen3 files are written with the halves kept apart, so their rows are used as they are.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch

from radixlm.gguf_metadata import load_config
from radixlm.messages import ModelLoadError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
# general.architecture values this loader maps, and whether their q/k rows were permuted at conversion.
SUPPORTED_ARCHITECTURES: dict[str, bool] = {"llama": True, "mistral": True, "qwen2": False, "qwen3": False}
INSTALL_HINT = "install the gguf package to load GGUF files: pip install gguf (or radixlm[gguf])"

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_PER_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def is_gguf_file(path: Path) -> bool:
    return path.suffix.lower() == GGUF_SUFFIX and path.is_file()


def gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())


def single_gguf(folder: Path) -> Path:
    """The one .gguf file of a folder; several are an error that names them (which one is meant?)."""
    files = gguf_files(folder)
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise ModelLoadError(
            f"{folder} holds several GGUF files ({names}); pass the one to load as --model-path FILE.gguf"
        )
    return files[0]


def _reader(path: Path):
    try:
        import gguf
    except ImportError as exc:
        raise ModelLoadError(f"{path} is a GGUF file; {INSTALL_HINT}") from exc
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # a truncated or foreign file: the reader raises ValueError, struct errors...
        raise ModelLoadError(f"cannot read GGUF file {path}: {type(exc).__name__}: {exc}") from exc


def load_gguf_config(path: Path):
    """The Hugging Face config transformers derives from the file's metadata, with `architectures` set
    (GGUF metadata has no class name; the implementation choice needs one)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise ModelLoadError(str(exc)) from exc
    try:
        config = load_config(path)  # transformers' reading of the metadata, kept after the first time
    except ImportError as exc:
        raise ModelLoadError(f"{path} is a GGUF file; {INSTALL_HINT} ({exc})") from exc
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot read the config of GGUF file {path}: {exc}") from exc
    if not getattr(config, "architectures", None):
        cls_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if cls_name is None:
            raise ModelLoadError(f"GGUF file {path}: no causal-LM class for model_type {config.model_type!r}")
        config.architectures = [cls_name]
    return config


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face checkpoint name of a GGUF tensor name; None when the map has no entry."""
    m = _BLOCK_NAME.match(gguf_name)
    if m:
        block, kind, suffix = m.groups()
        part = _PER_BLOCK.get(kind)
        return None if part is None else f"model.layers.{block}.{part}.{suffix}"
    m = _TOP_NAME.match(gguf_name)
    if m:
        part = _TOP_LEVEL.get(m.group(1))
        return None if part is None else f"{part}.{m.group(2)}"
    return None


def _unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of the two rotary halves (rows of a q or k projection)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError("GGUF file has no general.architecture")
    return str(field.contents())


def dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as float32, in [rows, cols] order (GGUF lists dims innermost first)."""
    import numpy as np
    from gguf.quants import dequantize as gguf_dequantize

    array = gguf_dequantize(tensor.data, tensor.tensor_type)
    # F32 tensors come back as views of the read-only memory map; torch needs its own writable copy.
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C", copy=True))


def iter_gguf_tensors(path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 tensor) for every tensor of the file, one in memory at a time."""
    reader = _reader(path)
    arch = gguf_architecture(reader)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {path}: architecture {arch!r} is not supported by radixlm's GGUF loader; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (a safetensors checkpoint of it may load)"
        )
    permuted = SUPPORTED_ARCHITECTURES[arch]
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    logger.info(
        "GGUF file %s (%s): %d tensors (%s), dequantized to float at load",
        path.name,
        arch,
        len(reader.tensors),
        ", ".join(f"{n} {k}" for k, n in types.most_common()),
    )
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            if tensor.name.startswith("rope_"):  # precomputed rope tables; we compute our own
                continue
            raise ModelLoadError(f"GGUF file {path}: tensor {tensor.name!r} has no Hugging Face name here")
        weight = dequantize(tensor)
        if permuted and (".q_proj." in name or ".k_proj." in name):  # rows and biases alike
            weight = _unpermute_rows(weight, heads if ".q_proj." in name else kv_heads)
        yield name, weight
