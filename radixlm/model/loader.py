"""Model loading: local folder or Hub id -> config -> module built without memory -> weights streamed in.

The module is built with its *parameters* on the meta device and its *buffers* real: parameters would cost
memory and random-init time only to be overwritten, while buffers such as rotary `inv_freq` are computed in
`__init__` and are not in checkpoints. Each checkpoint tensor is then read one at a time from safetensors and
handed to the model's `load_weights`, so peak memory is the model plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from radixlm.messages import ModelLoadError
from radixlm.model import gguf_loader
from radixlm.model.lazy_tensor import LazyTensor

logger = logging.getLogger(__name__)

HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def resolve_model_path(model_path: str, revision: str | None = None, load_format: str = "auto") -> Path:
    """A local folder as is (its .gguf file when it holds GGUF weights); a .gguf file as is; otherwise a
    Hub id, downloaded (or found in the local HF cache)."""
    if not model_path:
        from radixlm.testing import cached_model_folder

        path = cached_model_folder("qwen2", "tiny")
        logger.info("no model given: using the locally written demo model at %s", path)
        return path
    local = Path(model_path).expanduser()
    if local.is_dir():
        return gguf_loader.single_gguf(local) if checkpoint_format(local, load_format) == "gguf" else local
    if gguf_loader.is_gguf_file(local):
        if load_format not in ("auto", "gguf"):
            raise ModelLoadError(
                f"model_path {model_path!r} is a GGUF file, but load_format is {load_format!r}"
            )
        return local
    if local.exists():
        raise ModelLoadError(
            f"model_path {model_path!r} is a file; expected a model folder, a .gguf file or a Hub id"
        )
    if model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise ModelLoadError(f"model_path {model_path!r}: no such folder")
    return _download_from_hub(model_path, revision)


def _download_from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as exc:  # the hub raises many types: offline, not found, gated, bad revision
        raise ModelLoadError(
            f"could not get model {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"If this machine is offline, download the model elsewhere and pass its local folder, "
            f"e.g. --model-path /path/to/{repo_id.split('/')[-1]}"
        ) from exc


def load_config(path: Path, *, trust_remote_code: bool, revision: str | None = None):
    from transformers import AutoConfig

    if gguf_loader.is_gguf_file(path):
        return gguf_loader.load_gguf_config(path)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path / 'config.json'} not found: a model folder needs a config.json (or holds one .gguf file)"
        )
    if not trust_remote_code and "auto_map" in json.loads((path / "config.json").read_text()):
        raise ModelLoadError(
            f"the model at {path} ships its own modeling code (auto_map in config.json); "
            f"pass trust_remote_code=True (--trust-remote-code) if you trust it"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"the model at {path} needs its own code: pass trust_remote_code=True (--trust-remote-code)"
            ) from exc
        raise ModelLoadError(f"cannot read the config of {path}: {exc}") from exc


def text_config(config):
    """Multimodal configs nest the language model's config; everything we size from lives there."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(config, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    cfg_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = DTYPES.get(cfg_dtype)
    return cfg_dtype if isinstance(cfg_dtype, torch.dtype) else torch.float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here; use --device cpu")
    return torch.device(device)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Parameters registered inside go to the meta device; buffers stay where they were created."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def materialize_params(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give meta parameters real (uninitialized) storage, for loaders that copy into them; buffers are kept."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                dt = dtype if param.dtype.is_floating_point else param.dtype
                module._parameters[name] = nn.Parameter(
                    torch.empty(param.shape, dtype=dt, device=device), requires_grad=False
                )


def checkpoint_format(path: Path, load_format: str = "auto") -> str:
    """Which weights a model path holds: "safetensors", "pt" (pytorch_model*.bin) or "gguf"; load_format
    other than auto insists on one. A path with none of them is an error that lists what was looked for."""
    if gguf_loader.is_gguf_file(path):
        found = ["gguf"]
    else:
        found = [
            fmt
            for fmt, present in (
                ("safetensors", any(path.glob("*.safetensors"))),
                ("pt", any(path.glob("pytorch_model*.bin"))),
                ("gguf", bool(gguf_loader.gguf_files(path))),
            )
            if present
        ]
    if load_format != "auto":
        if load_format not in found:
            raise ModelLoadError(
                f"load_format {load_format!r}: no such weights in {path} (found: {', '.join(found) or 'none'})"
            )
        return load_format
    if not found:
        raise ModelLoadError(
            f"no weights in {path}: looked for *.safetensors, pytorch_model*.bin and a .gguf (GGUF) file"
        )
    return found[0]


def pt_files(path: Path) -> list[Path]:
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("pytorch_model*.bin"))
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f} is listed in pytorch_model.bin.index.json but missing")
    return files


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f} is listed in model.safetensors.index.json but missing")
    return files


def iter_checkpoint(
    path: Path, config=None, load_format: str = "auto", lazy: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, tensor) pairs: one tensor in memory at a time (one shard at a time for .bin files,
    which torch.load reads whole). GGUF tensors come dequantized, under Hugging Face names.

    lazy: safetensors tensors come as LazyTensors (model/lazy_tensor.py) that read only the part a weight
    loader narrows them to (a tensor-parallel rank's slice); each must be used before the next is asked for.
    """
    fmt = checkpoint_format(path, load_format)
    if fmt == "gguf":
        yield from gguf_loader.iter_gguf_tensors(path, config)
        return
    if fmt == "pt":
        for file in pt_files(path):
            # weights_only: a .bin file is a pickle; only tensors and plain containers may come out of it.
            shard = torch.load(file, map_location="cpu", weights_only=True)
            yield from shard.items()
            del shard
        return
    from safetensors import safe_open

    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, (LazyTensor(f, name) if lazy else f.get_tensor(name))


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint is missing tensor(s): {shown}")


def default_mem_bytes(device: torch.device) -> int:
    """Free memory now: device memory on CUDA, available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if hasattr(os, "sysconf") and os.path.exists("/proc/meminfo"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def total_mem_bytes(device: torch.device) -> int | None:
    """The device's total memory (RAM on CPU), for --mem-fraction-static; None where it is unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    if os.path.exists("/proc/meminfo"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def eos_token_ids(model_path: Path, config=None) -> list[int]:
    """The model's end-of-sequence ids: generation_config.json's and config.json's, merged (a GGUF file's
    come from its metadata, through `config`)."""
    ids: set[int] = set()
    if gguf_loader.is_gguf_file(model_path) and config is not None:
        value = getattr(config, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)])
    for source in (model_path / "generation_config.json", model_path / "config.json"):
        if source.is_file():
            value = json.loads(source.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)
