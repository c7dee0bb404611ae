"""The Transformers modeling backend: any Transformers decoder, with attention routed through RadixAttention.

How it works (DESIGN.md, "The Transformers backend"):
1. The model class comes from transformers (AutoModelForCausalLM, or the config's `auto_map` class under
   trust_remote_code) and is built with parameters on the meta device.
2. A class without `_supports_attention_backend` is refused: its attention modules would not call ours.
3. Our attention function is registered with transformers' AttentionInterface as "radixlm" and the model is
   built with `attn_implementation="radixlm"`, so every attention module calls it. Since "radixlm" has no
   mask function registered, transformers builds no attention mask at all; causality comes from our backend.
4. Each step calls the base model once on all scheduled tokens packed as one sequence (batch 1), with
   `position_ids` and `use_cache=False`; our ForwardBatch reaches the attention function beside the call
   (a thread-local _Step), since not every model passes **kwargs down to its attention modules.
5. RoPE, norms, MLPs (MoE, parallel residuals, biases...) all stay transformers' own code.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from radixlm.kv.kv_pool import LayerKV
from radixlm.layers.attention import RadixAttention
from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.lazy_tensor import materialize
from radixlm.model.loader import ModelLoadError, text_config
from radixlm.model.transformers_backend.tp_plan import TPSharding
from radixlm.model.transformers_backend.vocab_parallel import VocabSplit

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "radixlm"


@dataclass
class _Step:
    """What the attention function needs during one radixlm forward. It travels beside the model's call,
    not through its kwargs: not every model passes **kwargs down to its attention modules."""

    forward_batch: ForwardBatch | None
    layers: list[list[RadixAttention]]
    calls: list[int]
    probe: dict[int, list[tuple[int, int, int, int]]] | None = None


_current = threading.local()  # .step: the _Step of the forward running on this thread


@contextlib.contextmanager
def _stepping(step: _Step):
    _current.step = step
    try:
        yield
    finally:
        _current.step = None


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
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise RuntimeError(f"{type(module).__name__} has no layer_idx; radixlm cannot find its KV cache")
    step: _Step | None = getattr(_current, "step", None)
    if step is None:
        raise RuntimeError(
            f"{type(module).__name__} called the radixlm attention outside a radixlm forward; "
            "this model is only runnable through the radixlm engine"
        )
    if step.probe is not None:  # TransformersCausalLM.measure_attention: record the shapes, answer zeros
        step.probe.setdefault(layer_idx, []).append((query.shape[1], key.shape[1], key.shape[-1], value.shape[-1]))
        return query.new_zeros(1, query.shape[2], query.shape[1], value.shape[-1]), None
    forward_batch = step.forward_batch
    # A layer may attend more than once per forward (DiffLlama: the same keys against two value halves);
    # each call has its own KV in the pool, in call order.
    layer = step.layers[layer_idx][step.calls[layer_idx]]
    step.calls[layer_idx] += 1
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    overrides = {k_: kwargs[k_] for k_ in ("sliding_window", "softcap") if k_ in kwargs}
    sinks = kwargs.get("s_aux")  # gpt-oss's attention sinks: a learned logit per head
    out = layer(q, k, v, forward_batch, scaling=scaling, sinks=sinks, **overrides)
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
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )

    # The class the checkpoint names, when it is one of transformers' causal LMs: a text config saved from
    # a composite model (Mllama's, Emu3's) has no mapping entry of its own.
    named = (getattr(config, "architectures", None) or [None])[0]
    causal = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in (v if isinstance(v, (list, tuple)) else [v])}
    if named in causal:
        import transformers

        cls = getattr(transformers, named, None)
        if cls is not None:
            return cls
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


def _layer_chunks(cfg, num_layers: int) -> list[int | None]:
    """Llama 4's chunked layers: a query attends only inside its chunk of attention_chunk_size positions.
    transformers builds that from a mask function, which radixlm does not call, so it is read here."""
    chunk = getattr(cfg, "attention_chunk_size", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    return [chunk if i < len(layer_types) and layer_types[i] == "chunked_attention" else None for i in range(num_layers)]


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
        model_cls: type | None = None,
    ) -> None:
        """tp_size > 1: this rank's shard, built from the config's base_model_tp_plan (see tp_plan.py).
        model_cls: the transformers class to build instead of the causal LM (pooling models, encoder.py)."""
        super().__init__()
        from radixlm.model.loader import params_on_meta

        cls = model_cls or resolve_model_class(config, model_path, trust_remote_code)
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
            self.tp.validate(self._decoder)
            self._split_vocabulary(tp_rank, tp_size)
        self.config = config
        self.text_config = text_config(config)
        self.max_context: int | None = None  # a cap below the config's, when running the model needs one
        self._drop_sparse_indexers()
        # Built by measure_attention() once the weights are in: head counts and sizes are what the model's
        # attention modules pass, which the config does not always say (MLA, per-layer head sizes).
        self.attn_layers: list[RadixAttention] = []
        self._model_cls = cls
        self._model_path = model_path
        self._dtype = dtype
        self._trust_remote_code = trust_remote_code
        self._renamings, self._needs_converters = _conversion_mapping(self.hf)

    def _drop_sparse_indexers(self) -> None:
        """DeepSeek sparse attention (DSA): an indexer picks each query's top index_topk keys from a key
        cache of its own, which radixlm does not keep. Over a context of at most index_topk tokens it
        picks every key, so dense attention is the same computation: run the layers without their
        indexers and cap the context there."""
        topk = getattr(self.text_config, "index_topk", None)
        dropped = []
        for name, mod in self.hf.named_modules():
            if getattr(mod, "indexer", None) is not None and isinstance(mod.indexer, nn.Module):
                if not isinstance(topk, int) or topk <= 0:
                    raise ModelLoadError(
                        f"{type(mod).__name__} has a sparse-attention indexer but the config has no index_topk; "
                        "radixlm cannot run it"
                    )
                mod.indexer = None
                dropped.append(f"{name}.indexer." if name else "indexer.")
        # The checkpoint still holds the indexers' weights: they are skipped at load.
        self._dropped_prefixes = tuple(dropped)
        if dropped:
            self.max_context = topk
            logger.info(
                "%s: sparse-attention indexers not run (radixlm keeps no indexer cache); dense attention is "
                "the same up to index_topk, so the context is capped at %d tokens", type(self.hf).__name__, topk,
            )  # fmt: skip

    def measure_attention(self) -> None:
        """Run one token through the model with attention answering zeros, recording what each layer's
        attention module passes (heads, KV heads, key and value sizes), and build our attention layers to
        match. Every tensor-parallel rank calls this at the same point (it runs the model's collectives)."""
        cfg = self.text_config
        num_layers = cfg.num_hidden_layers
        probe: dict[int, list[tuple[int, int, int, int]]] = {}
        device = next(self.hf.parameters()).device
        try:
            with torch.inference_mode(), _stepping(_Step(None, [], [], probe)):
                self._decoder(
                    input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                    position_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                    use_cache=False,
                )
        except Exception as exc:
            raise ModelLoadError(
                f"{self._model_cls.__name__}: a forward pass through radixlm's attention failed "
                f"({type(exc).__name__}: {exc}); the model needs something radixlm does not give its layers "
                "(an attention mask, a cache of its own)"
            ) from exc
        missing = [i for i in range(num_layers) if i not in probe]
        if missing:
            raise ModelLoadError(
                f"{self._model_cls.__name__}: layer(s) {missing} do not call transformers' attention interface "
                "(linear attention, state-space or convolution mixers keep a state radixlm's KV cache does "
                "not hold), so radixlm cannot run this model"
            )
        softcap = getattr(cfg, "attn_logit_softcapping", None)
        windows = _layer_windows(cfg, num_layers)
        chunks = _layer_chunks(cfg, num_layers)
        # Scaling is passed by transformers at every call; this default only documents the usual value.
        self.attn_layers = []  # one per attention call, in (layer, call) order: the KV pool's layers
        self._layer_calls: list[list[RadixAttention]] = []
        for i in range(num_layers):
            calls = []
            for heads, kv_heads, dim, v_dim in probe[i]:
                attn = RadixAttention(
                    len(self.attn_layers), heads, kv_heads, dim, dim**-0.5, v_head_dim=v_dim,
                    sliding_window=windows[i], softcap=softcap, attention_chunk=chunks[i],
                )  # fmt: skip
                self.attn_layers.append(attn)
                calls.append(attn)
            self._layer_calls.append(calls)

    def kv_layout(self) -> list[LayerKV]:
        """This rank's K/V row shape per layer, as measured."""
        if not self.attn_layers:
            raise RuntimeError("measure_attention() runs after the weights load, before the KV pool")
        return [LayerKV(a.num_kv_heads, a.head_dim, a.v_head_dim) for a in self.attn_layers]

    def _head(self) -> nn.Module:
        """The module that turns hidden states into logits: the output embedding, or the top-level module
        holding it when the head does more (BERT's `cls`: dense, activation and norm, then the decoder)."""
        out_emb = self.hf.get_output_embeddings()
        for _, child in self.hf.named_children():
            if child is out_emb:
                return child
            if any(m is out_emb for m in child.modules()) and child is not self._decoder:
                return child
        return out_emb

    def _head_outside_lm_head(self) -> bool:
        """Whether the model's forward runs modules of its own between the decoder and the LM head that
        _head() does not hold (ModernBERT's `head`, ELECTRA's `generator_predictions`)."""
        if getattr(self, "_extra_head", None) is None:
            out_emb, decoder, head = self.hf.get_output_embeddings(), self._decoder, self._head()
            self._extra_head = any(
                child is not decoder and child is not head and child is not out_emb
                and any(True for _ in child.parameters())
                for child in self.hf.children()
            )  # fmt: skip
        return self._extra_head

    def _logits_through_model(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own forward from given hidden states: its decoder swapped for a module that returns
        them, so whatever it does after the decoder (and only that) runs."""
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

        name = decoder_name(self.hf)
        decoder = self.hf._modules[name]
        self.hf._modules[name] = _GivenHidden(Output(last_hidden_state=hidden.unsqueeze(0)))
        try:
            dummy = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=hidden.device)
            return self.hf(input_ids=dummy, use_cache=False).logits[0]
        finally:
            self.hf._modules[name] = decoder

    @property
    def _decoder(self) -> nn.Module:
        return getattr(self.hf, decoder_name(self.hf))

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
        step = _Step(forward_batch, self._layer_calls, [0] * len(self._layer_calls))
        with _stepping(step):
            out = self._decoder(
                input_ids=input_ids.unsqueeze(0), position_ids=positions.unsqueeze(0), use_cache=False
            )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the sampled rows only, with the model's final-logit transforms."""
        if self._head_outside_lm_head():
            logits = self._logits_through_model(hidden)
            return self.vocab.gather_logits(logits) if self.vocab is not None else logits
        logits = self._head()(hidden)
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
        buffers = dict(self.hf.named_buffers())
        loaded: set[str] = set()
        for name, tensor in weights:
            name = self._renamed(name) if renamed else name
            if self._dropped_prefixes and name.startswith(self._dropped_prefixes):
                continue
            if name not in params and name in buffers:  # a persistent buffer (xIELU's beta): saved, loaded
                _set_buffer(self.hf, name, materialize(tensor).to(buffers[name].dtype))
                continue
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
                self.hf, name, materialize(tensor).to(param.dtype if param.dtype.is_floating_point else tensor.dtype)
            )
            loaded.add("hf." + name)
        self._tie_if_needed(loaded)
        if self.tp is not None:
            self.tp.install_all_reduce(self._decoder)
        return loaded

    def _tp_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        assert self.tp is not None and self.vocab is not None
        if name in self._vocab_params:
            return self.vocab.slice(tensor)
        prefix = decoder_name(self.hf) + "."
        if not name.startswith(prefix):
            return tensor  # the LM head and anything outside the base model stay whole
        param = name[len(prefix) :]
        module = param.rpartition(".")[0]
        if self.tp.is_experts(module):  # fused expert tensors are parameters of the experts module itself
            shard = self.tp.expert_shard_for(self._decoder.get_submodule(module), param, tensor)
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
        self._drop_sparse_indexers()  # a new model object: its indexers are back
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
        """Tie what the model ties (embeddings when the config says so, BERT's decoder bias...) to what
        the checkpoint held, with transformers' own mapping, and count the aliases as loaded."""
        out_emb = self.hf.get_output_embeddings()
        in_emb = self.hf.get_input_embeddings()
        if out_emb is not None and getattr(self.text_config, "tie_word_embeddings", False):
            if out_emb.weight.device.type == "meta":
                out_emb.weight = in_emb.weight
        named = list(self.hf.named_parameters(remove_duplicate=False))
        missing = {n for n, p in named if "hf." + n not in loaded and p.device.type == "meta"}
        if missing:
            self.hf.tie_weights(missing_keys=missing, recompute_mapping=True)
            named = list(self.hf.named_parameters(remove_duplicate=False))
        have = {id(p) for n, p in named if "hf." + n in loaded}
        loaded.update("hf." + n for n, p in named if id(p) in have)


class _GivenHidden(nn.Module):
    """Stands in for a decoder stack and returns the hidden states it was given."""

    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args, **kwargs):
        return self.output


def decoder_name(model: nn.Module) -> str:
    """The attribute holding the decoder stack (the "base model" the LM head sits on).

    Usually `base_model_prefix`; some classes (Llama 4's text-only causal LM) name a prefix they do not
    have, and keep the stack in `model`.
    """
    for name in (model.base_model_prefix, "model"):
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    raise ModelLoadError(
        f"{type(model).__name__}: no decoder module at {model.base_model_prefix!r} or 'model'; "
        "radixlm cannot find the layers under its LM head"
    )


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


def _set_buffer(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    (root.get_submodule(module_name) if module_name else root)._buffers[attr] = value


def _set_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name) if module_name else root
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)
