"""The Transformers modeling backend: any Transformers decoder, with attention routed through RadixAttention.

How it works (DESIGN.md, "The Transformers backend"):
1. The model class comes from transformers (AutoModelForCausalLM, or the config's `auto_map` class under
   trust_remote_code) and is built with parameters on the meta device.
2. A class without `_supports_attention_backend` is refused: its attention modules would not call ours.
3. Our attention function is registered with transformers' AttentionInterface as "radixlm" and the model is
   built with `attn_implementation="radixlm"`, so every attention module calls it. Since "radixlm" has no
   mask function registered, transformers builds no attention mask at all; causality comes from our backend.
4. Each step calls the base model once on all scheduled tokens packed as one sequence (batch 1), with
   `position_ids`, `use_cache=False`, and our ForwardBatch passed down through the model's **kwargs.
5. RoPE, norms, MLPs (MoE, parallel residuals, biases...) all stay transformers' own code.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from radixlm.layers.attention import RadixAttention
from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.loader import ModelLoadError, text_config
from radixlm.model.transformers_backend.tp_plan import TPSharding
from radixlm.model.transformers_backend.vocab_parallel import VocabSplit

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "radixlm"


def radixlm_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q [1, H, T, D], k/v [1, Hkv, T, D] -> ([1, T, H, Dv], None)."""
    forward_batch: ForwardBatch | None = kwargs.get("forward_batch")
    layers: list[RadixAttention] | None = kwargs.get("radixlm_layers")
    if forward_batch is None or layers is None:
        raise RuntimeError(
            f"{type(module).__name__} called the radixlm attention without a ForwardBatch; "
            "this model is only runnable through the radixlm engine"
        )
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; radixlm cannot find its KV cache")
    layer = layers[layer_idx]
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    overrides = {k_: kwargs[k_] for k_ in ("sliding_window", "softcap") if k_ in kwargs}
    out = layer(q, k, v, forward_batch, scaling=scaling, **overrides)
    return out.view(1, q.shape[0], layer.num_heads, layer.v_head_dim), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, radixlm_attention_forward)


def resolve_model_class(config, model_path: Path, trust_remote_code: bool) -> type:
    auto_map = getattr(config, "auto_map", None) or {}
    if "AutoModelForCausalLM" in auto_map:
        if not trust_remote_code:
            raise ModelLoadError(
                f"the model at {model_path} ships its own modeling code; pass trust_remote_code=True "
                f"(--trust-remote-code) if you trust it"
            )
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(model_path))
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(
            f"transformers has no causal-LM class for config {type(config).__name__} "
            f"(model_type {getattr(config, 'model_type', '?')!r})"
        ) from None


def check_supports_attention_backend(cls: type) -> None:
    if not getattr(cls, "_supports_attention_backend", False):
        raise ModelLoadError(
            f"{cls.__module__}.{cls.__name__} does not support transformers' attention interface "
            f"(_supports_attention_backend is not set), so its attention cannot be routed through radixlm; "
            f"this model cannot run with model_impl='transformers'"
        )


def _layer_windows(cfg, num_layers: int) -> list[int | None]:
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types[:num_layers]]
    return [window] * num_layers


class TransformersCausalLM(nn.Module):
    """Wraps a Transformers *ForCausalLM with the native-model interface the runner uses."""

    def __init__(
        self,
        config,
        model_path: Path,
        *,
        trust_remote_code: bool,
        dtype: torch.dtype,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        """tp_size > 1: this rank's shard, built from the config's base_model_tp_plan (see tp_plan.py)."""
        super().__init__()
        from radixlm.model.loader import params_on_meta

        cls = resolve_model_class(config, model_path, trust_remote_code)
        check_supports_attention_backend(cls)
        _register_attention()
        config._attn_implementation = ATTN_IMPLEMENTATION
        self.tp: TPSharding | None = None
        self._global_config = config
        if tp_size > 1:
            self.tp = TPSharding(cls, config, text_config(config), tp_rank, tp_size)
            config = self.tp.local_config
        with params_on_meta():
            self.hf = cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
        self.hf.eval()
        self.vocab: VocabSplit | None = None
        self._vocab_params: set[str] = set()
        if self.tp is not None:
            self.tp.validate(self.hf.base_model)
            self._split_vocabulary(tp_rank, tp_size)
        self.config = config
        cfg = text_config(config)
        self.text_config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        windows = _layer_windows(cfg, self.num_layers)
        # Scaling is passed by transformers at every call; this default only documents the usual value.
        self.attn_layers = [
            RadixAttention(
                i,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.head_dim**-0.5,
                sliding_window=windows[i],
                softcap=softcap,
            )
            for i in range(self.num_layers)
        ]
        self._model_cls = cls
        self._model_path = model_path
        self._dtype = dtype
        self._trust_remote_code = trust_remote_code
        self._renamings, self._needs_converters = _conversion_mapping(self.hf)

    def _split_vocabulary(self, rank: int, size: int) -> None:
        """Embedding and LM head rows split across the ranks (still on meta: the checkpoint fills them)."""
        in_emb, out_emb = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        modules = [m for m in (in_emb, out_emb) if m is not None]
        owned = {id(getattr(m, a)) for m in modules for a in ("weight", "bias") if getattr(m, a, None) is not None}
        self._vocab_params = {n for n, p in self.hf.named_parameters(remove_duplicate=False) if id(p) in owned}
        self.vocab = VocabSplit(in_emb.weight.shape[0], rank, size)
        for module, what in ((in_emb, "input embedding"), (out_emb, "LM head")):
            if module is not None:
                self.vocab.resize(module, what)
        self.vocab.wrap_embedding(in_emb)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        out = self.hf.base_model(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            forward_batch=forward_batch,
            radixlm_layers=self.attn_layers,
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the sampled rows only, with the model's final-logit transforms."""
        logits = self.hf.get_output_embeddings()(hidden)
        if self.vocab is not None:
            logits = self.vocab.gather_logits(logits)
        cfg = self.text_config
        logit_scale = getattr(cfg, "logit_scale", None)  # Cohere multiplies
        if logit_scale is not None and not isinstance(logit_scale, bool):
            logits = logits * logit_scale
        logits_scaling = getattr(cfg, "logits_scaling", None)  # Granite divides
        if logits_scaling:
            logits = logits / logits_scaling
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        renamed = True
        if self._needs_converters:
            # The checkpoint format differs from the modules (e.g. per-expert MoE tensors that transformers fuses
            # on load). transformers' own loader knows every such converter; re-implementing them would drift.
            if self.tp is None:
                return self._load_with_transformers()
            # Under tensor parallelism the whole model loads once through transformers, and its converted
            # tensors (already in module names and layouts) are sliced into this rank's model like a checkpoint.
            whole = self._from_pretrained(self._global_config)
            weights, renamed = ((n, p.data) for n, p in whole.named_parameters()), False
        params = dict(self.hf.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self._renamed(name) if renamed else name
            if name not in params:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} does not match any parameter of {type(self.hf).__name__}"
                )
            param = params[name]
            if self.tp is not None:
                tensor = self._tp_slice(name, tensor)
            if tuple(param.shape) != tuple(tensor.shape):
                split = (
                    f" (this rank's slice for tensor parallelism over {self.tp.size} ranks: "
                    f"{type(self.hf).__name__} does not size this module from the head and MLP counts the split "
                    "divides, so it cannot be split; use tp_size 1)"
                    if self.tp
                    else ""
                )
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}{split}, "
                    f"the model expects {tuple(param.shape)}"
                )
            _set_parameter(
                self.hf, name, tensor.to(param.dtype if param.dtype.is_floating_point else tensor.dtype)
            )
            loaded.add("hf." + name)
        self._tie_if_needed(loaded)
        if self.tp is not None:
            self.tp.install_all_reduce(self.hf.base_model)
        return loaded

    def _tp_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        assert self.tp is not None and self.vocab is not None
        if name in self._vocab_params:
            return self.vocab.slice(tensor)
        prefix = self.hf.base_model_prefix + "."
        if not name.startswith(prefix):
            return tensor  # the LM head and anything outside the base model stay whole
        param = name[len(prefix) :]
        module = param.rpartition(".")[0]
        if self.tp.is_experts(module):  # fused expert tensors are parameters of the experts module itself
            shard = self.tp.expert_shard_for(self.hf.base_model.get_submodule(module), param, tensor)
        else:
            shard = self.tp.shard_for(module, tensor.shape[0])
        return tensor if shard is None else self.tp.slice_tensor(shard, name, tensor).contiguous()

    def _renamed(self, name: str) -> str:
        if not self._renamings:
            return name
        from transformers.core_model_loading import apply_renamings

        return apply_renamings(name, self._renamings)

    def _load_with_transformers(self) -> set[str]:
        logger.info(
            "%s: the checkpoint needs transformers' weight converters; loading through from_pretrained",
            self._model_cls.__name__,
        )
        self.hf = self._from_pretrained(self.config)
        return {"hf." + n for n, _ in self.hf.named_parameters(remove_duplicate=False)}

    def _from_pretrained(self, config) -> nn.Module:
        return self._model_cls.from_pretrained(
            str(self._model_path),
            config=config,
            dtype=self._dtype,
            attn_implementation=ATTN_IMPLEMENTATION,
            trust_remote_code=self._trust_remote_code,
        ).eval()

    def _tie_if_needed(self, loaded: set[str]) -> None:
        out_emb = self.hf.get_output_embeddings()
        in_emb = self.hf.get_input_embeddings()
        if out_emb is None or not getattr(self.text_config, "tie_word_embeddings", False):
            return
        if out_emb.weight.device.type == "meta":
            out_emb.weight = in_emb.weight
        for n, p in self.hf.named_parameters(remove_duplicate=False):
            if p is in_emb.weight:
                loaded.add("hf." + n)


def _conversion_mapping(model: nn.Module) -> tuple[list, bool]:
    """transformers' checkpoint renamings for this model, and whether it also needs tensor converters."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:  # older 5.x layouts: checkpoints then use the module names as they are
        return [], False
    mapping = get_model_conversion_mapping(model) or []
    renamings = [m for m in mapping if not isinstance(m, WeightConverter)]
    return renamings, len(renamings) != len(mapping)


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
