"""radixlm.testing writes model folders that transformers loads as if they came from the Hub."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest
import torch
from safetensors import safe_open

from radixlm.testing import (
    ARCHITECTURES,
    FORMAT_VERSION,
    REQUIRED_ARCHITECTURES,
    SIZES,
    cached_model_folder,
    make_config,
    make_model_folder,
)
from radixlm.testing import tokenizer as tk

TEXTS = [
    "The river was quiet, and the 3 wolves ran 12.5 km!",
    "café naïve résumé über 中文 日本 Привет 🙂🚀 €5",
    "Rare: Ω ß ø ł 한국어 ภาษาไทย 🦙🎉✨ → ½ °C",  # not merged in training: split mid-character
    "  leading spaces\ttabs\nnew lines\n\n and a trailing space ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_model_folder(arch, "tiny", root / arch) for arch in REQUIRED_ARCHITECTURES}


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_public_constants() -> None:
    assert REQUIRED_ARCHITECTURES == ("llama", "qwen2", "qwen3", "mistral", "gemma3")
    assert ARCHITECTURES[:5] == REQUIRED_ARCHITECTURES
    assert SIZES == ("tiny", "small", "0.5b")


@pytest.mark.parametrize("arch", REQUIRED_ARCHITECTURES)
def test_folder_loads_with_transformers(folders, arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = folders[arch]
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "tokenizer_config.json" in names

    config = AutoConfig.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    assert type(model)._supports_attention_backend
    assert config.vocab_size == len(tok) == tk.tokenizer_vocab_size()
    assert config.max_position_embeddings >= 2048
    assert config.hidden_size == 64 and config.num_attention_heads == 4 and config.num_key_value_heads == 2
    # EOS / BOS / PAD ids are real special tokens, in config and generation_config alike.
    special = set(tok.all_special_ids)
    gen = json.loads((path / "generation_config.json").read_text())
    assert config.eos_token_id == tok.eos_token_id == tk.IM_END_ID
    assert set(gen["eos_token_id"]) <= special and tok.eos_token_id in gen["eos_token_id"]
    assert {config.bos_token_id, config.pad_token_id, gen["pad_token_id"]} <= special
    assert model.dtype == torch.float32

    # Peaked logits: top-2 margins well above the 1e-3 tie threshold, and not one token everywhere.
    ids = tok(TEXTS[0] + " " + TEXTS[1], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3
    assert 3 < logits.std(dim=-1).mean() < 8
    assert len(set(logits.argmax(-1).tolist())) > len(ids[0]) // 3


def test_arch_specific_fields(folders) -> None:
    from transformers import AutoConfig

    def tensor_names(arch: str) -> set[str]:
        with safe_open(folders[arch] / "model.safetensors", "pt") as f:
            return set(f.keys())

    assert "model.layers.0.self_attn.q_proj.bias" in tensor_names("qwen2")
    assert "model.layers.0.self_attn.q_proj.bias" not in tensor_names("llama")
    assert "lm_head.weight" not in tensor_names("qwen2")  # tied, as in Qwen2.5-0.5B
    assert "lm_head.weight" in tensor_names("llama")
    assert "model.layers.0.self_attn.q_norm.weight" in tensor_names("qwen3")
    qwen3 = AutoConfig.from_pretrained(folders["qwen3"])
    assert qwen3.head_dim != qwen3.hidden_size // qwen3.num_attention_heads
    assert AutoConfig.from_pretrained(folders["mistral"]).sliding_window == 32
    gemma = AutoConfig.from_pretrained(folders["gemma3"])
    assert gemma.model_type == "gemma3_text" and gemma.architectures == ["Gemma3ForCausalLM"]
    assert gemma.sliding_window == 16 and gemma.num_hidden_layers >= 3
    assert set(gemma.layer_types) == {"sliding_attention", "full_attention"}
    # A sliding layer after a full one: per-layer window must come from layer_types, not a prefix.
    assert "sliding_attention" in gemma.layer_types[gemma.layer_types.index("full_attention") :]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip(folders, text: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["qwen2"])
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert None not in tok.convert_ids_to_tokens(ids)


def test_multibyte_chars_split_across_tokens(folders) -> None:
    """Incremental detokenization must see tokens that hold part of a UTF-8 character."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["qwen2"])
    ids = tok("🦙 한국어").input_ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "🦙 한국어"
    # ...while common multi-byte words are single tokens.
    assert len(tok(" café").input_ids) == 1


def test_chat_template(folders) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders["llama"])
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi 🙂"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt.endswith("<|im_end|>\n")
    ids = tok(text).input_ids
    assert ids.count(tk.IM_START_ID) == 5 and ids.count(tk.IM_END_ID) == 4


def test_same_seed_same_bytes_other_seed_other_weights(folders, tmp_path) -> None:
    again = make_model_folder("llama", "tiny", tmp_path / "again", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert _sha(again / name) == _sha(folders["llama"] / name), name
    other = make_model_folder("llama", "tiny", tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(folders["llama"] / "model.safetensors")
    with safe_open(other / "model.safetensors", "pt") as a, safe_open(again / "model.safetensors", "pt") as b:
        assert a.keys() == b.keys()
        name = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(a.get_tensor(name), b.get_tensor(name))
    assert _sha(other / "tokenizer.json") == _sha(again / "tokenizer.json")  # tokenizer ignores the seed


def test_global_rng_untouched(tmp_path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    make_model_folder("qwen3", "tiny", tmp_path / "m")
    assert torch.equal(torch.get_rng_state(), state)


def test_invalid_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="llama.*qwen2.*qwen3.*mistral.*gemma3"):
        make_model_folder("gpt5", "tiny", tmp_path)
    with pytest.raises(ValueError, match="tiny.*0.5b"):
        make_model_folder("llama", "7b", tmp_path)
    with pytest.raises(ValueError, match="bfloat16"):
        make_model_folder("llama", "tiny", tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="valid values"):
        cached_model_folder("nope")
    with pytest.raises(ValueError, match="valid values"):
        make_config("llama", "huge")
    assert not any(tmp_path.iterdir())  # nothing written on a bad argument


def test_cached_model_folder_builds_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RADIXLM_TEST_MODELS_DIR", str(tmp_path))
    path = cached_model_folder("qwen2")
    assert path == tmp_path / f"qwen2-tiny-s0-v{FORMAT_VERSION}"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert cached_model_folder("qwen2", "tiny", seed=0) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp dirs left behind


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_0_5b_config_shape(arch: str) -> None:
    """The 0.5b shape (Qwen2.5-0.5B) for every arch, checked without writing weights."""
    config = make_config(arch, "0.5b")
    assert config.hidden_size == 896 and config.num_hidden_layers == 24
    assert config.num_attention_heads == 14 and config.vocab_size == 151936
    assert config.tie_word_embeddings is True
    if arch != "gpt_neox":  # GPT-NeoX has no GQA
        assert config.num_key_value_heads == 2
    assert config.architectures and config.architectures[0].endswith("ForCausalLM")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_small_config_shape(arch: str) -> None:
    """The small shape (hidden 512, 8 layers, 8 heads, 2 KV heads, vocab 32k) for every arch."""
    config = make_config(arch, "small")
    assert config.hidden_size == 512 and config.num_hidden_layers == 8
    assert config.num_attention_heads == 8 and config.vocab_size == 32000
    assert config.max_position_embeddings == 32768
    assert getattr(config, "head_dim", None) in (None, 64)
    if arch != "gpt_neox":  # GPT-NeoX has no GQA
        assert config.num_key_value_heads == 2
    assert config.architectures and config.architectures[0].endswith("ForCausalLM")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_small_folder_loads_with_transformers(tmp_path, arch: str) -> None:
    """A small folder is complete: weights load with no missing keys and the tokenizer is padded to 32k."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_model_folder(arch, "small", tmp_path / arch)
    tok = AutoTokenizer.from_pretrained(path)
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert all(not v for v in info.values()), info
    assert len(tok) == model.config.vocab_size == 32000
    assert model.dtype == torch.bfloat16  # the default for small, as for 0.5b
    assert model.config.tie_word_embeddings is (arch == "qwen2")  # tied as in Qwen2.5, untied as in Llama
    assert json.loads((path / "radixlm_testing.json").read_text())["size"] == "small"
    ids = tok(TEXTS[0]).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    assert 2 < logits.std(dim=-1).mean() < 10  # calibrated like the other sizes (std ~LOGIT_STD)


def test_padded_tokenizer_decodes_every_id(tmp_path) -> None:
    """vocab_size above the trained vocabulary: every id decodes, and loading stays fast."""
    import time

    from transformers import AutoTokenizer

    tk.write_tokenizer(tmp_path, vocab_size=151936, model_max_length=32768)
    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 10  # ~0.2 s measured; 150k *added* tokens took 5+ s
    assert len(tok) == 151936
    tail = list(range(tk.tokenizer_vocab_size() - 5, 151936))
    assert None not in tok.convert_ids_to_tokens(tail)
    assert tok.decode([151935]) == f"<|extra_{151935 - tk.tokenizer_vocab_size()}|>"
    assert tok.decode(tok(TEXTS[1]).input_ids) == TEXTS[1]  # padding changes nothing for encode


def test_cli_writes_a_folder(tmp_path, capsys) -> None:
    from radixlm.testing.__main__ import main

    assert main(["--arch", "mistral", "--size", "tiny", "--out", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "radixlm_testing.json").read_text())
    assert meta["arch"] == "mistral" and meta["seed"] == 3 and meta["dtype"] == "float32"
