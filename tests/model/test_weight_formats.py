"""Checkpoint formats other than safetensors: pytorch_model.bin folders (single and sharded), folders that
hold a .gguf file, and the errors for folders that hold no weights radixlm reads (they name GGUF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.model import loader
from radixlm.testing import cached_model_folder
from tests.parity_utils import drive_core, random_prompts

PARAMS = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def _ids(path: Path, **options) -> list[list[int]]:
    core = EngineCore(EngineConfig(model_path=str(path), dtype="float32", inline_core=True, **options))
    prompts = random_prompts(core.runner.vocab_size, [5, 17], seed=11)
    return drive_core(core, prompts, PARAMS)["ids"]


def _without_weights(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(cached_model_folder("qwen2", "tiny"), dst)
    (dst / "model.safetensors").unlink()
    return dst


def _state_dict() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(cached_model_folder("qwen2", "tiny") / "model.safetensors"))


@pytest.mark.parametrize("sharded", [False, True])
def test_a_pytorch_model_bin_folder_loads_and_matches_safetensors(tmp_path: Path, sharded: bool) -> None:
    folder = _without_weights(tmp_path, "bin")
    state = _state_dict()
    if sharded:
        names = sorted(state)
        shards = {
            "pytorch_model-00001-of-00002.bin": names[::2],
            "pytorch_model-00002-of-00002.bin": names[1::2],
        }
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, folder / file)
        weight_map = {k: f for f, keys in shards.items() for k in keys}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    assert loader.checkpoint_format(folder) == "pt"
    assert _ids(folder) == _ids(cached_model_folder("qwen2", "tiny"))


def test_a_bin_file_holding_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a pickle that would run code on load does not."""
    folder = _without_weights(tmp_path, "evil")
    torch.save({"model.norm.weight": torch.ones(2), "x": Path("/")}, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        list(loader.iter_checkpoint(folder))


def test_a_folder_with_a_gguf_and_no_safetensors_is_gguf(tmp_path: Path) -> None:
    folder = tmp_path / "gguf-folder"
    folder.mkdir()
    (folder / "model-Q8_0.gguf").write_bytes(b"GGUF")
    assert loader.checkpoint_format(folder) == "gguf"
    assert loader.resolve_model_path(str(folder)) == folder / "model-Q8_0.gguf"
    (folder / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"several GGUF files \(model-Q8_0.gguf, other.gguf\)"):
        loader.resolve_model_path(str(folder))


def test_errors_name_gguf(tmp_path: Path) -> None:
    empty = _without_weights(tmp_path, "empty")
    with pytest.raises(ModelLoadError, match=r"no weights in .*safetensors.*pytorch_model\*\.bin.*GGUF"):
        loader.resolve_model_path(str(empty))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    with pytest.raises(ModelLoadError, match=r"config\.json.*\.gguf"):
        loader.load_config(no_config, trust_remote_code=False)
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(ModelLoadError, match=r"\.gguf file"):
        loader.resolve_model_path(str(text))
    with pytest.raises(ModelLoadError, match=r"load_format 'gguf': no such weights.*found: safetensors"):
        loader.resolve_model_path(str(cached_model_folder("qwen2", "tiny")), load_format="gguf")
    with pytest.raises(ValueError, match="load_format must be one of auto, safetensors, pt, gguf"):
        EngineConfig(load_format="ggml")


def test_a_quantization_config_is_never_ignored(tmp_path: Path) -> None:
    """A checkpoint quantized by a method radixlm does not run is refused by name, before any weight is
    read; one that claims a method it runs over float weights is refused once the load finds none."""
    folder = tmp_path / "bnb"
    shutil.copytree(cached_model_folder("qwen2", "tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelLoadError, match=r"quantized with 'bitsandbytes'.*supported --quantization methods"
    ):
        EngineCore(EngineConfig(model_path=str(folder), inline_core=True))
    with pytest.raises(ModelLoadError, match=r"'int4' was asked for.*says 'bitsandbytes'"):
        EngineCore(EngineConfig(model_path=str(folder), inline_core=True, quantization="int4"))
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="awq: the checkpoint holds no quantized linear"):
        EngineCore(EngineConfig(model_path=str(folder), inline_core=True))
