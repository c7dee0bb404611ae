"""Loading and the Transformers backend: remote code, refusals, model_impl choice, checkpoint errors, bf16."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import AddRequest
from radixlm.model.loader import ModelLoadError
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, hf_greedy, random_prompts

REMOTE_CONFIG = """
from transformers import LlamaConfig


class RemoteLlamaConfig(LlamaConfig):
    model_type = "remote_llama"
"""

REMOTE_MODELING = """
import torch
from transformers import LlamaForCausalLM, LlamaModel

from .configuration_remote import RemoteLlamaConfig


class RemoteLlamaModel(LlamaModel):
    config_class = RemoteLlamaConfig


class RemoteLlamaForCausalLM(LlamaForCausalLM):
    config_class = RemoteLlamaConfig
    _supports_attention_backend = SUPPORTS

    def __init__(self, config):
        super().__init__(config)
        self.model = RemoteLlamaModel(config)
        self.post_init()
"""


def _remote_folder(tmp_path: Path, supports: bool) -> Path:
    src = cached_model_folder("llama", "tiny")
    dst = tmp_path / ("remote" if supports else "remote_refused")
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "remote_llama"
    cfg["architectures"] = ["RemoteLlamaForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_remote.RemoteLlamaConfig",
        "AutoModelForCausalLM": "modeling_remote.RemoteLlamaForCausalLM",
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "configuration_remote.py").write_text(REMOTE_CONFIG)
    (dst / "modeling_remote.py").write_text(REMOTE_MODELING.replace("SUPPORTS", str(supports)))
    return dst


def _core(path, **kw) -> EngineCore:
    kw.setdefault("dtype", "float32")
    return EngineCore(EngineConfig(model_path=str(path), inline_core=True, max_total_tokens=2048, **kw))


def _greedy(core: EngineCore, prompt: list[int], n: int) -> list[int]:
    core.add_request(AddRequest(["x"], prompt, {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}))
    out: list[int] = []
    while core.has_work():
        for o in core.step():
            out += o.new_token_ids
    return out


def test_remote_code_model_matches_transformers_and_needs_the_flag(tmp_path: Path) -> None:
    path = _remote_folder(tmp_path, supports=True)
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        _core(path)
    core = _core(path, trust_remote_code=True)
    assert core.runner.choice.impl == "transformers"
    assert "own code" in core.runner.choice.reason
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    assert type(hf).__name__ == "RemoteLlamaForCausalLM"
    for p in random_prompts(core.runner.vocab_size, [7, 40], seed=11):
        ref, margins = _hf_remote_greedy(hf, p, 16)
        assert_greedy_match(_greedy(core, p, 16), ref, margins, "remote code")


def _hf_remote_greedy(hf, prompt, n):
    hf.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    margins = [float(torch.topk(lg[0], 2).values.diff().abs()) for lg in out.logits]
    return out.sequences[0, len(prompt) :].tolist(), margins


def test_class_without_attention_backend_is_refused_by_name(tmp_path: Path) -> None:
    path = _remote_folder(tmp_path, supports=False)
    with pytest.raises(ModelLoadError, match="RemoteLlamaForCausalLM.*_supports_attention_backend"):
        _core(path, trust_remote_code=True)


def test_model_impl_choice_and_reason() -> None:
    core = _core(cached_model_folder("llama"))
    assert core.runner.choice.impl == "native" and "native" in core.runner.choice.reason
    core = _core(cached_model_folder("gemma3"))
    assert core.runner.choice.impl == "transformers" and "Gemma3ForCausalLM" in core.runner.choice.reason
    with pytest.raises(ModelLoadError, match="model_impl='native'.*Gemma3ForCausalLM"):
        _core(cached_model_folder("gemma3"), model_impl="native")


def test_offline_hub_id_gives_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="radixlm-test/no-such-model.*local folder"):
        _core("radixlm-test/no-such-model")


def _tampered(tmp_path: Path, edit) -> Path:
    dst = tmp_path / "tampered"
    shutil.copytree(cached_model_folder("qwen2"), dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("impl", ["native", "transformers"])
@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "down_proj"),
        (
            lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)),
            "model.layers.0.extra.weight",
        ),
        (lambda t: t.__setitem__("model.norm.weight", torch.ones(3)), "model.norm.weight"),
    ],
    ids=["missing", "unexpected", "misshaped"],
)
def test_checkpoint_errors_name_the_tensor(tmp_path: Path, impl: str, edit, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _core(_tampered(tmp_path, edit), model_impl=impl)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    src = cached_model_folder("llama")
    dst = tmp_path / "sharded"
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, max_shard_size="100KB")
    assert (dst / "model.safetensors.index.json").is_file()
    prompt = random_prompts(2048, [12], seed=4)[0]
    for impl in ("native", "transformers"):
        assert _greedy(_core(dst, model_impl=impl), prompt, 8) == _greedy(
            _core(src, model_impl=impl), prompt, 8
        )


@pytest.mark.parametrize("arch,impl", [("qwen2", "native"), ("gemma3", "transformers")])
def test_bfloat16_agrees_on_leading_tokens(arch: str, impl: str) -> None:
    path = cached_model_folder(arch)
    core = _core(path, dtype="bfloat16", model_impl=impl)
    assert core.runner.dtype == torch.bfloat16
    agree = 0
    prompts = random_prompts(core.runner.vocab_size, [10, 25, 50, 80], seed=8)
    for p in prompts:
        ref, _ = hf_greedy(path, p, 8, dtype=torch.bfloat16)
        ours = _greedy(core, p, 8)
        agree += ours[:4] == ref[:4]
    assert agree >= len(prompts) - 1, "bfloat16 output should agree with transformers on the leading tokens"
