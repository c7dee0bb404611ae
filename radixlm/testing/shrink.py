"""Shrink any transformers config to a tiny one, generically: the census's model builder.

The config class's defaults are the real model's shape (often billions of parameters). Every size field
the config has is set to a tiny value (layers, hidden size, heads, MLP and expert widths, MLA ranks,
vocabulary), per-layer lists are cut to the new layer count keeping one of each kind (sliding and full
attention, dense and MoE), and the same is done to every sub-config (text, vision, audio...). Fields a
config does not have are left alone; the config class's own __init__ then derives the rest.
"""

from __future__ import annotations

from typing import Any

NUM_LAYERS = 2
# Size fields by name, as the configs spell them (transformers maps older aliases to these).
TINY: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 64,
    "ffn_hidden_size": 128,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
    "max_window_layers": NUM_LAYERS,
    "first_k_dense_replace": 1,
    "decoder_sparse_step": 1,
    "sliding_window": 16,
    "attention_chunk_size": 16,
    "hidden_size_per_layer_input": 16,
    "vocab_size_per_layer_input": 256,
    "laurel_rank": 8,
    "altup_num_inputs": 2,
    "global_head_dim": 16,
    "num_global_key_value_heads": 2,
    "projection_dim": 64,
    "vision_output_dim": 64,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
}
# Fields a smaller value breaks: ranks and counts that must stay below another size, kept only when
# the default is not None (None means "off", e.g. no q LoRA in DeepSeek-V2-Lite).
KEEP_NONE = {"q_lora_rank", "sliding_window", "attention_chunk_size", "kv_lora_rank"}
LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layer")


def _shrunk_list(values: list, n: int) -> list:
    """A per-layer list cut to n entries, keeping each distinct kind once where it can."""
    out: list = []
    for v in values:
        if v not in out and len(out) < n:
            out.append(v)
    while len(out) < n:
        out.append(values[len(out) % len(values)])
    return out


def shrunk_kwargs(defaults: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Overrides for one config's to_dict() (no sub-configs)."""
    kw: dict[str, Any] = {}
    old_layers = next((defaults[f] for f in LAYER_COUNT_FIELDS if isinstance(defaults.get(f), int)), None)
    for field in LAYER_COUNT_FIELDS:
        if isinstance(defaults.get(field), int):
            kw[field] = NUM_LAYERS
    for field, tiny in TINY.items():
        value = defaults.get(field)
        if field not in defaults or (value is None and field in KEEP_NONE):
            continue
        if isinstance(value, bool) or (value is not None and not isinstance(value, int)):
            continue
        kw[field] = tiny if value is None else min(value, tiny) if field.endswith("_rank") else tiny
    if "vocab_size" in defaults:
        kw["vocab_size"] = vocab_size
        # Special ids inside the new vocabulary (embedding padding_idx and generate check them).
        for field, tid in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
            if field in defaults and defaults[field] is not None:
                kw[field] = tid
    if old_layers:
        for field, value in defaults.items():
            if isinstance(value, list) and len(value) == old_layers and field not in kw:
                kw[field] = _shrunk_list(value, NUM_LAYERS)
    for field in ("mlp_only_layers", "moe_layers_idx"):
        if isinstance(defaults.get(field), list):
            kw[field] = [i for i in defaults[field] if i < NUM_LAYERS]
    for field, value in defaults.items():  # per-layer overrides keyed by layer index (Gemma 4)
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            kept = {k: v for k, v in value.items() if int(k) < NUM_LAYERS}
            kw[field] = kept or {0 if isinstance(next(iter(value)), int) else "0": next(iter(value.values()))}
    if "vocab_size_per_layer_input" in kw:  # a second embedding the token ids index
        kw["vocab_size_per_layer_input"] = vocab_size
    if isinstance(defaults.get("num_kv_shared_layers"), int):  # layers reading earlier layers' KV
        kw["num_kv_shared_layers"] = 0
    _keep_equalities(defaults, kw)
    return kw


# Fields whose equality in the real model is structural (MHA: heads == KV heads; MLA: head_dim is the
# rotary part), kept equal after shrinking: the first field of the group that is equal sets the value.
EQUAL_GROUPS = (
    ("num_attention_heads", "num_key_value_heads"),
    ("qk_rope_head_dim", "head_dim", "qk_nope_head_dim", "v_head_dim", "global_head_dim"),
)


def _keep_equalities(defaults: dict[str, Any], kw: dict[str, Any]) -> None:
    for group in EQUAL_GROUPS:
        present = [f for f in group if f in kw and isinstance(defaults.get(f), int)]
        for i, leader in enumerate(present):
            for other in present[i + 1 :]:
                if defaults[other] == defaults[leader]:
                    kw[other] = kw[leader]


def shrink_config(config_cls: type, vocab_size: int):
    """A tiny instance of config_cls: its defaults with every size field (and sub-config) shrunk."""
    defaults = config_cls().to_dict()
    kw = shrunk_kwargs(defaults, vocab_size)
    for name in getattr(config_cls, "sub_configs", {}) or {}:
        sub = defaults.get(name)
        if isinstance(sub, dict):
            kw[name] = {**sub, **shrunk_kwargs(sub, vocab_size)}
    return config_cls(**kw)
