"""GGUF files written here with the `gguf` library's own writer and quantizer, from the tiny random Llama
and Qwen2: radixlm's load of each matches transformers' own GGUF load of it (greedy, float32, both
implementations).

The files are written the way llama.cpp's converter writes them: a Llama's q/k rows permuted for its
rotate-pairs RoPE (Qwen2's are not; its q/k/v biases are written too), projections in Q8_0 / Q4_0 / Q4_1
blocks, norms and biases in F32. So this covers the name map, the q/k un-permute and each block type's
dequantization against an independent reader (transformers') without SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.model.gguf_loader import hf_name
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, drive_core, random_prompts

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF load needs it

MAX_NEW = 12
# Which block type each projection is written in (the rest F32): all three llama.cpp types we read. q/k/v
# mix Q4_0 and Q4_1 inside the fused native qkv_proj, so `--quantization gguf` must fit each block alone.
QTYPES = {
    "attn_q": "Q4_1",
    "attn_k": "Q4_0",
    "attn_v": "Q4_1",
    "attn_output": "Q8_0",
    "ffn_gate": "Q4_1",
    "ffn_up": "Q4_1",
}


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter order for a Llama q/k projection (what gguf_loader undoes)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_gguf(src: Path, out: Path, arch: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(src)
    state = load_file(str(src / "model.safetensors"))
    to_gguf = {}
    stems = [f"blk.{i}.{k}" for i in range(cfg.num_hidden_layers) for k in _BLOCK_KINDS]
    for stem in [*stems, "token_embd", "output_norm", "output"]:
        for suffix in (".weight", ".bias"):  # Qwen2's q/k/v carry biases
            to_gguf[hf_name(stem + suffix)] = stem + suffix
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for hf, tensor in state.items():
        name = to_gguf[hf]
        t = tensor.float()
        if arch == "llama" and ".attn_q." in name:  # llama.cpp permutes Llama's q/k only
            t = _permute_rows(t, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            t = _permute_rows(t, cfg.num_key_value_heads)
        kind = name.split(".")[-2]
        qtype = getattr(gguf.GGMLQuantizationType, QTYPES.get(kind, "F32") if t.dim() == 2 else "F32")
        data = t.numpy()
        if qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_BLOCK_KINDS = (
    "attn_norm",
    "ffn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def written(request, tmp_path_factory) -> Path:
    src = cached_model_folder(request.param, "tiny")
    out = tmp_path_factory.mktemp("gguf") / f"tiny-{request.param}.gguf"
    _write_gguf(src, out, request.param)
    return out


_HF_MODELS: dict[Path, torch.nn.Module] = {}


def _hf_greedy(path: Path, prompt: list[int]) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    model = _HF_MODELS[path]
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.logits]
    return out.sequences[0, len(prompt) :].tolist(), margins


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_written_gguf_matches_transformers_gguf_load(written: Path, impl: str) -> None:
    core = EngineCore(
        EngineConfig(model_path=str(written), model_impl=impl, dtype="float32", inline_core=True)
    )
    assert core.model_info().checkpoint_format == "gguf"
    prompts = random_prompts(core.runner.vocab_size, [3, 9, 30], seed=4)
    ids = drive_core(core, prompts, {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True})["ids"]
    for prompt, ours in zip(prompts, ids):
        ref, margins = _hf_greedy(written, prompt)
        assert_greedy_match(ours, ref, margins, f"{impl} len {len(prompt)}")


@pytest.mark.parametrize("impl", ["native", "transformers"])
def test_quantization_gguf_repacks_4bit_blocks_exactly(written: Path, impl: str) -> None:
    """`--quantization gguf`: every weight made of Q4_0 / Q4_1 blocks becomes int4 holding the very same
    matrix (fused q/k/v mixing both types included); the others (Q8_0, F32) become int8."""
    from radixlm.model.quantization.int4 import Int4Weight
    from radixlm.model.quantization.int8 import Int8Weight

    def core(quant):
        cfg = EngineConfig(
            model_path=str(written),
            model_impl=impl,
            dtype="float32",
            inline_core=True,
            quantization=quant,
            linear_kernel="dense",
        )
        return EngineCore(cfg)

    dense = dict(core(None).runner.model.named_modules())
    quantized = core("gguf")
    assert quantized.model_info().quantization == "gguf"
    kinds = {}
    for name, mod in quantized.runner.model.named_modules():
        q = getattr(mod, "quant", None)
        if q is None:
            continue
        kinds[name.rsplit(".", 1)[-1]] = type(q)
        if isinstance(q, Int4Weight):
            assert q.group_size == 32
            torch.testing.assert_close(q.dequantize(), dense[name].weight, rtol=0, atol=1e-6)
    if impl == "native":
        assert kinds["qkv_proj"] is Int4Weight and kinds["gate_up_proj"] is Int4Weight
        assert kinds["o_proj"] is Int8Weight and kinds["down_proj"] is Int8Weight
    else:
        assert {kinds[k] for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")} == {Int4Weight}
        assert kinds["o_proj"] is Int8Weight and kinds["down_proj"] is Int8Weight
