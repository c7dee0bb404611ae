"""Complete Hugging Face model folders with random weights, written locally.

Why these exist
---------------
No test, benchmark or demo in radixlm may download anything: CI and dev machines have no Hub
access, and a test that depends on the network is a flaky test. Yet the engine's job is to take a
Hugging Face model folder (config.json, generation_config.json, model.safetensors, tokenizer files,
chat template) and serve it. So we write such folders ourselves:

- the config comes from the real transformers config class, saved with `save_pretrained`, so it is
  exactly what a Hub folder of that architecture holds;
- the weights are made by the real transformers model class (`AutoModelForCausalLM.from_config`,
  seeded init) and saved with `model.save_pretrained`, so tensor names, tying and the on-disk
  layout (including MoE experts, saved per expert as on the Hub) are what a real checkpoint has;
- the tokenizer is a byte-level BPE trained here in a fraction of a second (see tokenizer.py).

Transformers is our oracle: greedy output must match `generate` on the same folder token for token,
except at steps whose top-2 logit margin is below 1e-3. Random models have flat logits, so the
weights are reshaped after init (see `_shape_weights`) to make tests sharp:
- the final norm is scaled so logits have a std of ~`LOGIT_STD` units (ties become rare), with
  random signs so that tied-embedding models do not just echo their input token;
- q/k projections are scaled so attention is peaked, not uniform (mask and position bugs show);
- norm weights and biases are randomised around their neutral values, so an implementation that
  drops a bias, ignores a norm weight or gets Gemma's `1 + w` convention wrong gives other tokens.

Sizes: `tiny` (hidden 64, 2-4 layers, vocab 2048, float32) runs in milliseconds on CPU; `small`
(hidden 512, 8 layers, 8 heads, 2 KV heads, head_dim 64, intermediate 1408, vocab 32000, ~40M
parameters, bfloat16 by default) is a real transformer shape that still decodes a batch of 256 on a
laptop CPU, for overhead benchmarks where tiny's forward is too small to be a fair yardstick; `0.5b`
has the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads, 2 KV heads, vocab 151936, tied
embeddings) for every architecture, in bfloat16 by default, for benchmarks and GPU runs.
All are deterministic: the same (arch, size, seed, dtype) gives byte-identical files.
Note that bf16 logits are quantised (steps of 0.0625 near 10), so exact top-2 ties do occur with
0.5b in bf16; load it in float32 for parity-style checks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib
from typing import Any

import torch

from radixlm.testing import tokenizer as _tok

# Bump when the contents of a folder change, so cached folders from an older version are not reused.
FORMAT_VERSION = 2

# The first five are the natively supported architectures that tests must cover; the rest exercise
# the Transformers backend ("any decoder"): softcapping, parallel residual, partial rotary, fused
# projections, MoE, extra multipliers.
ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma3",
    "gemma2",
    "gpt_neox",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmo2",
    "granite",
)
REQUIRED_ARCHITECTURES: tuple[str, ...] = ARCHITECTURES[:5]
SIZES: tuple[str, ...] = ("tiny", "small", "0.5b")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_DTYPE = {"tiny": "float32", "small": "bfloat16", "0.5b": "bfloat16"}

# Target std of the logits over the vocabulary. The top-2 gap of N Gaussians is ~std/sqrt(2 ln N),
# so P(gap < 1e-3) per step is ~1e-3 * 4 / LOGIT_STD: rare, while sampling is still not one-hot.
LOGIT_STD = 5.0
# Target std of pre-softmax attention scores (default init gives ~0.03: near-uniform attention).
ATTN_SCORE_STD = 1.5
# Perturbation of norm weights around their neutral value, and std of biases (init leaves 0).
NORM_STD = 0.1
BIAS_STD = 0.05

_SLIDING, _FULL = "sliding_attention", "full_attention"


def _common(size: str) -> dict[str, Any]:
    """Shape fields shared by all architectures of a size (head_dim is set per arch: not all accept it)."""
    if size == "tiny":
        return dict(
            vocab_size=_tok.tokenizer_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
    if size == "small":
        # Qwen2-like proportions (intermediate ~2.75x hidden, 4 query heads per KV head) with a
        # Llama-sized vocabulary; the tokenizer is padded up to it as for 0.5b. Untied by default
        # (qwen2, qwen3, gemma and granite tie anyway), so llama's LM head is its own matrix.
        return dict(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=False,
        )
    return dict(  # Qwen2.5-0.5B
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    )


def _arch_kwargs(arch: str, size: str) -> tuple[type, dict[str, Any]]:
    """The transformers config class and its kwargs for (arch, size)."""
    import transformers as tf

    tiny = size == "tiny"
    kw = _common(size)
    hd = 16 if tiny else 64
    if arch == "llama":
        return tf.LlamaConfig, {**kw, "head_dim": hd, "rms_norm_eps": 1e-5}
    if arch == "qwen2":
        # q/k/v biases are always on in Qwen2; tied embeddings as in Qwen2.5-0.5B.
        return tf.Qwen2Config, {**kw, "tie_word_embeddings": True, "rope_theta": 1e6}
    if arch == "qwen3":
        # head_dim deliberately != hidden/heads in tiny (as in real Qwen3), plus q/k norm.
        return tf.Qwen3Config, {**kw, "head_dim": 32 if tiny else hd, "tie_word_embeddings": True}
    if arch == "mistral":
        # A small window so any prompt over 32 tokens exercises sliding attention.
        return tf.MistralConfig, {**kw, "head_dim": hd, "sliding_window": 32 if tiny else 4096}
    if arch == "gemma3":
        layers = 4 if tiny else kw["num_hidden_layers"]
        # 2 sliding : 1 full, with a sliding layer after the full one (catches "first k layers").
        pattern = 3 if tiny else 6
        layer_types = [_FULL if (i + 1) % pattern == 0 else _SLIDING for i in range(layers)]
        return tf.Gemma3TextConfig, {
            **kw,
            "num_hidden_layers": layers,
            "head_dim": hd,
            "tie_word_embeddings": True,
            "sliding_window": 16 if tiny else 512,
            "layer_types": layer_types,
            # Older loaders read the pattern instead of layer_types; keep the two consistent.
            "sliding_window_pattern": pattern,
            # != head_dim in tiny: the attention scaling transformers passes must be honoured.
            "query_pre_attn_scalar": 2 * hd if tiny else hd,
            "architectures": ["Gemma3ForCausalLM"],
        }
    if arch == "gemma2":
        layers = 3 if tiny else kw["num_hidden_layers"]
        return tf.Gemma2Config, {
            **kw,
            "num_hidden_layers": layers,
            "head_dim": hd,
            "tie_word_embeddings": True,
            "sliding_window": 16 if tiny else 4096,
            "layer_types": [_SLIDING if i % 2 == 0 else _FULL for i in range(layers)],
            "query_pre_attn_scalar": hd,
            # Real Gemma2 uses 50: scores here are a few units, so 5 makes the cap matter.
            "attn_logit_softcapping": 5.0 if tiny else 50.0,
            "final_logit_softcapping": 30.0,
        }
    if arch == "gpt_neox":
        # No GQA in GPT-NeoX; parallel residual, rotary on 1/4 of head_dim, biases everywhere.
        kw = {k: v for k, v in kw.items() if k != "num_key_value_heads"}
        kw["intermediate_size"] = 4 * kw["hidden_size"]
        return tf.GPTNeoXConfig, {
            **kw,
            "use_parallel_residual": True,
            "attention_bias": True,
            "hidden_act": "gelu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        }
    if arch == "phi3":
        # Fused qkv_proj and gate_up_proj; rotary on half of head_dim (as Phi-4-mini does with 0.75).
        return tf.Phi3Config, {
            **kw,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        }
    if arch == "mixtral":
        return tf.MixtralConfig, {
            **kw,
            "head_dim": hd,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": kw["intermediate_size"] if tiny else kw["intermediate_size"] // 2,
        }
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig, {
            **kw,
            "num_experts": 4 if tiny else 8,
            "num_experts_per_tok": 2,
            # 0.5b: 1216 and 2432 (a quarter and half of its dense intermediate); small alike.
            "moe_intermediate_size": 64 if tiny else kw["intermediate_size"] // 4,
            "shared_expert_intermediate_size": 128 if tiny else kw["intermediate_size"] // 2,
            "decoder_sparse_step": 1,
            "norm_topk_prob": False,
            "rope_theta": 1e6,
        }
    if arch == "qwen3_moe":
        # Qwen3's q/k norms and head_dim, experts in every layer but the last, which keeps a dense MLP
        # (mlp_only_layers), so both MLP kinds are exercised.
        return tf.Qwen3MoeConfig, {
            **kw,
            "head_dim": 32 if tiny else hd,
            "num_experts": 4 if tiny else 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64 if tiny else kw["intermediate_size"] // 4,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [kw["num_hidden_layers"] - 1],
            "norm_topk_prob": True,
        }
    if arch == "olmo2":
        # Post-norm blocks and q/k norm over the whole projection.
        return tf.Olmo2Config, kw
    if arch == "granite":
        # Every multiplier away from 1 (values like granite-3.0-2b's), so each one matters.
        return tf.GraniteConfig, {
            **kw,
            "tie_word_embeddings": True,
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 1.0 / hd,
            "logits_scaling": 8.0,
        }
    raise AssertionError(arch)  # unreachable: _check validated arch


def _check(arch: str, size: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid values: {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid values: {', '.join(SIZES)}")


def make_config(arch: str, size: str = "tiny"):
    """The transformers config a folder of (arch, size) gets, without writing anything.

    Cheap (no weights): tests can check shape fields of the small and 0.5b sizes with it.
    """
    _check(arch, size)
    cls, kwargs = _arch_kwargs(arch, size)
    rope_theta = kwargs.pop("rope_theta", None)
    if rope_theta is not None and "rope_parameters" not in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = cls(
        bos_token_id=_tok.ENDOFTEXT_ID,
        eos_token_id=_tok.IM_END_ID,
        pad_token_id=_tok.ENDOFTEXT_ID,
        **kwargs,
    )
    if not config.architectures:
        config.architectures = [_causal_lm_class_name(config)]
    return config


def _causal_lm_class_name(config) -> str:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)].__name__


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    base = model.base_model
    for name in ("norm", "final_layer_norm", "final_layernorm", "ln_f"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise RuntimeError(f"no final norm found in {type(base).__name__}")


_QK_SUFFIXES = (".q_proj.weight", ".k_proj.weight")
# Fused projections whose q and k rows cannot be scaled alone: the whole matrix is scaled (v too,
# which only makes attention outputs larger; harmless).
_FUSED_QKV_SUFFIXES = (".qkv_proj.weight", ".query_key_value.weight")


@torch.no_grad()
def _shape_weights(model: torch.nn.Module, config, seed: int) -> float:
    """Reshape a freshly initialised model for sharp tests (see module docstring). Returns the logit scale.

    Works on the model's own init: norm weights are detected by being 1-D and initialised to all
    ones (scale = w) or all zeros (Gemma: scale = 1 + w), so each arch's convention is respected.
    """
    gen = torch.Generator().manual_seed(seed + 1_000_003)  # independent of the init stream
    std = float(getattr(config, "initializer_range", 0.02))
    qk_scale = math.sqrt(ATTN_SCORE_STD / config.hidden_size) / std
    norm_centres: dict[str, float] = {}

    def randn_like(p: torch.Tensor, s: float) -> torch.Tensor:
        # Drawn in float32 and cast: the same numbers whatever dtype the weights are stored in.
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(s).to(p.dtype)

    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.copy_(randn_like(p, BIAS_STD))
        elif p.ndim == 1:
            centre = p.float().mean().item()
            if not (p == centre).all() or centre not in (0.0, 1.0):
                raise RuntimeError(f"{name}: expected a norm weight initialised to 0 or 1")
            norm_centres[name] = centre
            p.copy_(randn_like(p, NORM_STD).add_(centre))
        elif name.endswith(_QK_SUFFIXES) or name.endswith(_FUSED_QKV_SUFFIXES):
            p.mul_(qk_scale)

    # Granite multiplies embeddings by embedding_multiplier (12) and every block output by
    # residual_multiplier (0.22): at init the embedding would drown the layers and the model would
    # ignore its context. Shrink the embedding table (tied or not) to undo that ratio.
    emb_mult = getattr(config, "embedding_multiplier", None)
    res_mult = getattr(config, "residual_multiplier", None)
    if emb_mult and res_mult:
        model.get_input_embeddings().weight.mul_(res_mult / emb_mult)

    # Scale the final norm so that logits have std ~LOGIT_STD. This leaves the residual stream and
    # the (possibly tied) embedding alone, so the layers keep their weight relative to the token
    # embedding; only the last step is sharpened. Measured pre-softcap: the cap is monotonic.
    # A fixed token sequence; 96 tokens for small models, 40 for big ones (bf16 matmuls on CPU are slow).
    n_tokens = 96 if config.hidden_size <= 256 else 40
    ids = (torch.arange(n_tokens) * 37 + 11) % min(config.vocab_size, _tok.tokenizer_vocab_size())
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        logits = model(input_ids=ids[None], use_cache=False).logits.float()
    finally:
        if softcap is not None:
            config.final_logit_softcapping = softcap
    scale = LOGIT_STD / logits[0, 8:].std(dim=-1).mean().item()  # skip the first, context-poor positions
    # Two significant digits: matmul results can differ in the last bits with the thread count, and
    # the files must be byte-identical on every machine.
    scale = float(f"{scale:.2g}")
    norm = _final_norm(model)
    for pname, p in norm.named_parameters():
        full = next(n for n, q in model.named_parameters() if q is p)
        factor = scale
        if pname == "weight":
            # Random signs: with tied embeddings, logit_t = e_t . (g * h) and h contains e_t, so an
            # all-positive g gives the current token a sqrt(hidden)-sigma bonus and the model just
            # repeats its input. With random signs the sum over e_t^2 * g cancels.
            signs = torch.randint(0, 2, p.shape, generator=gen).mul_(2).sub_(1)
            factor = signs.to(torch.float32) * scale
        if pname == "weight" and norm_centres.get(full) == 0.0:
            p.copy_(((1.0 + p.float()) * factor - 1.0).to(p.dtype))  # Gemma: output * (1 + w)
        else:
            p.copy_((p.float() * factor).to(p.dtype))
    return scale


@contextlib.contextmanager
def _quiet_progress_bars():
    """No "Writing model shards" bar in test logs; the caller's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _write_folder(arch: str, size: str, out: pathlib.Path, seed: int, dtype: str) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = make_config(arch, size)
    torch_dtype = _DTYPES[dtype]
    # The model's own init, seeded, without touching the caller's global RNG state.
    # Mixed with the arch name so that, say, llama and mistral (same modules) differ for one seed: a
    # test that loads the wrong folder should not pass by luck.
    init_seed = zlib.crc32(f"{arch}:{seed}".encode())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    # Calibrated in the weights' own dtype: bf16 is fine for a std estimate, and a float32 copy of
    # 0.5b would cost 2 GB.
    logit_scale = _shape_weights(model, model.config, init_seed)
    with _quiet_progress_bars():
        model.save_pretrained(out, max_shard_size="100GB")
    # One file, named as single-file Hub checkpoints are (save_pretrained would shard above 50GB).
    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"expected a single model.safetensors in {out}")
    config = model.config
    # Multiple EOS ids, as in Qwen2.5-Instruct's generation_config: engines must stop on any.
    GenerationConfig(
        bos_token_id=_tok.ENDOFTEXT_ID,
        eos_token_id=[_tok.IM_END_ID, _tok.ENDOFTEXT_ID],
        pad_token_id=_tok.ENDOFTEXT_ID,
    ).save_pretrained(out)
    _tok.write_tokenizer(out, vocab_size=config.vocab_size, model_max_length=config.max_position_embeddings)
    meta = {
        "generator": "radixlm.testing.make_model_folder",
        "arch": arch,
        "size": size,
        "seed": seed,
        "dtype": dtype,
        "format_version": FORMAT_VERSION,
        "logit_scale": logit_scale,
    }
    (out / "radixlm_testing.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_model_folder(
    arch: str,
    size: str,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "auto",
) -> pathlib.Path:
    """Write a complete HF model folder for (arch, size) with seeded random weights into `out`.

    The folder holds config.json, generation_config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json (with a ChatML chat template) and special_tokens_map.json, and loads with
    AutoConfig / AutoTokenizer / AutoModelForCausalLM.from_pretrained. `out` is created if needed;
    existing files in it are overwritten. dtype: "float32", "bfloat16", "float16", or "auto"
    (float32 for tiny, bfloat16 for small and 0.5b). Returns `out` as a Path.
    """
    _check(arch, size)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if dtype == "auto":
        dtype = _DEFAULT_DTYPE[size]
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid values: auto, {', '.join(_DTYPES)}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_folder(arch, size, out, seed, dtype)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors comes out 0600; a shared cache should be readable like the rest
    return out


def cache_root() -> pathlib.Path:
    env = os.environ.get("RADIXLM_TEST_MODELS_DIR")
    if env:
        return pathlib.Path(env)
    return pathlib.Path.home() / ".cache" / "radixlm" / "test-models"


def cached_model_folder(arch: str, size: str = "tiny", *, seed: int = 0) -> pathlib.Path:
    """A model folder from `make_model_folder` (default dtype), built once and then reused.

    Lives in $RADIXLM_TEST_MODELS_DIR (default ~/.cache/radixlm/test-models) as
    <arch>-<size>-s<seed>-v<FORMAT_VERSION>. Built in a temp dir next to it and renamed into place,
    so a folder that exists is complete, and concurrent builders (pytest-xdist, parallel
    processes) race harmlessly: the first rename wins and the others discard their copy.
    """
    _check(arch, size)
    root = cache_root()
    final = root / f"{arch}-{size}-s{seed}-v{FORMAT_VERSION}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{final.name}.", suffix=f".{uuid.uuid4().hex[:8]}", dir=root)
    )
    try:
        make_model_folder(arch, size, tmp, seed=seed)
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        with contextlib.suppress(FileExistsError, OSError):
            # Fails (ENOTEMPTY/EEXIST) if another process got there first: theirs is as good.
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if not (final / "config.json").is_file():
        raise RuntimeError(f"could not create {final}")
    return final


__all__: list[str] = [
    "ARCHITECTURES",
    "REQUIRED_ARCHITECTURES",
    "SIZES",
    "FORMAT_VERSION",
    "make_model_folder",
    "cached_model_folder",
    "make_config",
    "cache_root",
]
