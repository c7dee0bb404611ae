"""Native Llama-family decoder: Llama, Mistral, Qwen2 and Qwen3 in one file.

The four HF families share one block; what differs is small, and is written down per family in `_Variant`
(mirroring each family's HF modeling code):

    family    q/k/v bias          o_proj bias      mlp bias     q/k RMSNorm   sliding window
    Llama     attention_bias      attention_bias   mlp_bias     no            none
    Mistral   no                  no               no           no            config.sliding_window, every layer
    Qwen2     yes                 no               no           no            layers with layer_types "sliding_attention"
    Qwen3     attention_bias      attention_bias   no           per head      layers with layer_types "sliding_attention"

Per step the model sees one packed token axis T (all spans of all requests, see ForwardBatch): no padding,
no per-request Python loop. RoPE cos/sin are gathered once per step and shared by every layer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from radixlm.layers.activation import get_act_and_mul
from radixlm.layers.attention import RadixAttention
from radixlm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from radixlm.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from radixlm.layers.norm import RMSNorm
from radixlm.layers.rotary import get_rope, rotate_qk
from radixlm.model.forward_batch import ForwardBatch


@dataclass(frozen=True)
class _Variant:
    """How one HF family's decoder differs from Llama's."""

    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int | None, ...]  # one per layer; None = full attention


def _head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_type_windows(config: PretrainedConfig) -> tuple[int | None, ...]:
    # Qwen2/Qwen3 attention: `config.sliding_window if layer_type == "sliding_attention" else None`.
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return tuple(window if t == "sliding_attention" else None for t in types[: config.num_hidden_layers])


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        variant: _Variant,
        rotary_dim: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.head_dim = _head_dim(config)
        self.rotary_dim = rotary_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=variant.qkv_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim,
            config.hidden_size,
            bias=variant.o_bias,
            tp_rank=tp_rank,
            tp_size=tp_size,
        )
        if variant.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.attn = RadixAttention(
            layer_id,
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            sliding_window=variant.sliding_windows[layer_id],
        )

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        T = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head, before RoPE
            q = self.q_norm(q.view(T, -1, self.head_dim))
            k = self.k_norm(k.view(T, -1, self.head_dim))
        q, k = rotate_qk(q, k, cos, sin, self.head_dim, self.rotary_dim)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, bias: bool, *, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )
        self.act_fn = get_act_and_mul(config.hidden_act)
        self.down_proj = RowParallelLinear(
            inter, config.hidden_size, bias=bias, tp_rank=tp_rank, tp_size=tp_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        layer_id: int,
        variant: _Variant,
        rotary_dim: int,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(
            config, layer_id, variant, rotary_dim, tp_rank=tp_rank, tp_size=tp_size
        )
        self.mlp = LlamaMLP(config, variant.mlp_bias, tp_rank=tp_rank, tp_size=tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        forward_batch: ForwardBatch,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual stream is carried separately and added inside the next norm (same sums as HF's).
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, cos, sin, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(
        self, config: PretrainedConfig, variant: _Variant, *, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size
        )
        self.rotary_emb = get_rope(config, _head_dim(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config, i, variant, self.rotary_emb.rotary_dim, tp_rank=tp_rank, tp_size=tp_size
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        cos, sin = self.rope(positions, forward_batch)
        return self.decode(input_ids, cos, sin, forward_batch)

    def rope(self, positions: torch.Tensor, forward_batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's cos/sin rows, shared by every layer. Kept out of `decode` because it reads host lists
        and may grow the table: model/compiled_forward.py compiles `decode` alone."""
        # seq_lens bound every position, and reading them needs no device sync.
        max_pos = max(forward_batch.seq_lens_list, default=1) - 1
        return self.rotary_emb.cos_sin(positions, max_position=max_pos, dtype=self.embed_tokens.weight.dtype)

    def decode(
        self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, forward_batch: ForwardBatch | None
    ) -> torch.Tensor:
        """Embedding, every layer and the final norm: tensors in, tensors out (forward_batch reaches only the
        attention layers, and is None inside a compiled graph, where they read it from their owner)."""
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # HF checkpoint names -> (our fused parameter, shard id), nano-vllm style.
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # Buffers some checkpoints carry that we recompute (rotary tables).
    _skipped_suffixes = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")

    def __init__(self, config: PretrainedConfig, *, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.config = config
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = LlamaModel(config, self._variant(config), tp_rank=tp_rank, tp_size=tp_size)
        if self.tie_word_embeddings:
            # Share the *module*, not just the Parameter: `to_empty` after a meta-device build replaces
            # Parameter objects and would untie them, but both names still reach the same module.
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, tp_rank=tp_rank, tp_size=tp_size
            )

    @classmethod
    def _variant(cls, config: PretrainedConfig) -> _Variant:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return _Variant(
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=False,
            sliding_windows=(None,) * config.num_hidden_layers,
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        """[T] ids, [T] positions -> [T, hidden] hidden states after the final norm."""
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, hidden] -> [S, vocab] in the model's dtype (only the rows the engine samples)."""
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named checkpoint tensors; return the names of our parameters this call fully loaded.

        Pass every checkpoint file's tensors in one call (a chained iterator): a fused parameter counts as
        loaded only once all of its shards have arrived within the call.
        """
        params = dict(self.named_parameters())
        expected: dict[str, set] = defaultdict(set)
        for packed, shard in self.packed_modules_mapping.values():
            expected[packed].add(shard)
        seen: dict[str, set] = defaultdict(set)
        for name, tensor in weights:
            if name.endswith(self._skipped_suffixes) or (
                self.tie_word_embeddings and name == "lm_head.weight"
            ):
                continue
            target, shard = name, None
            for ckpt_name, (packed, shard_id) in self.packed_modules_mapping.items():
                if f".{ckpt_name}." in name:
                    target, shard = name.replace(f".{ckpt_name}.", f".{packed}."), shard_id
                    break
            param = params.get(target)
            if param is None:
                raise ValueError(
                    f"unexpected checkpoint tensor {name!r}: {type(self).__name__} has no parameter for it"
                )
            module_name, _, _ = target.rpartition(".")
            loader = getattr(self.get_submodule(module_name), "weight_loader", default_weight_loader)
            try:
                loader(param, tensor, shard)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            seen[target].add(shard)
        # A fused parameter counts only once every one of its shards has arrived.
        return {
            name for name, shards in seen.items() if shards >= expected.get(name.rsplit(".", 2)[-2], {None})
        }


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def _variant(cls, config: PretrainedConfig) -> _Variant:
        # HF MistralAttention has no biases and applies config.sliding_window to every layer.
        window = getattr(config, "sliding_window", None)
        return _Variant(False, False, False, False, (window,) * config.num_hidden_layers)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def _variant(cls, config: PretrainedConfig) -> _Variant:
        # HF Qwen2Attention: q/k/v always biased, o_proj never; the MLP is bias-free.
        return _Variant(True, False, False, False, _layer_type_windows(config))


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def _variant(cls, config: PretrainedConfig) -> _Variant:
        attention_bias = bool(getattr(config, "attention_bias", False))
        return _Variant(attention_bias, attention_bias, False, True, _layer_type_windows(config))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}
EntryClass = ARCHITECTURES
